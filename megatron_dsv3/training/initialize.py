"""Process groups and seeds: torch.distributed (nccl with GPUs, gloo without) + megatron parallel_state."""

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_dsv3.moe.topology import destroy_ep_topology, initialize_ep_topology, set_gpus_per_node
from megatron_dsv3.platform import enable_cpu_execution
from megatron_dsv3.third_party_warnings import absent_backends_line


def initialize_single_process() -> None:
    """One rank, no launcher (conversion checks, benchmarks, tests): a gloo group of one and parallel_state."""
    enable_cpu_execution()
    if not dist.is_initialized():  # a one-rank group needs no rendezvous port
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(0)


def initialize_distributed(args) -> None:
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # megatron's jit_fuser compiles: 15 s/step on CPU
    enable_cpu_execution()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend=args.distributed_backend,
            rank=int(os.environ.get("RANK", "0")),
            world_size=args.world_size,
            timeout=timedelta(minutes=10),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
    )
    if dist.get_rank() == 0 and (line := absent_backends_line()):
        print(line, flush=True)
    set_gpus_per_node(args.simulated_gpus_per_node)
    if args.moe_token_dispatcher_type == "hierarchical":
        initialize_ep_topology()
    set_seed(args.seed)


def set_seed(seed: int) -> None:
    """Same weights on every data-parallel replica; megatron's tracker offsets TP/EP streams."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    destroy_ep_topology()
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
