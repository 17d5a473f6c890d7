"""Megatron distributed checkpoints (torch_dist) that are never half-written.

Layout of `--save DIR`:
    DIR/iter_0000100/                  a complete checkpoint (model, optimizer, scheduler, RNG, data position)
    DIR/latest_checkpointed_iteration.txt   the newest complete one; written last, atomically

A save goes to `iter_N.tmp`, which becomes `iter_N` only after every rank has finished; the marker
is replaced (write + rename) after that. A crash at any point leaves the previous checkpoint and
marker untouched. Model and optimizer are sharded by global keys, so a checkpoint loads into any
TP/PP/EP/DP layout; RNG states are restored only into the same layout.
"""

import dataclasses
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import StrictHandling
from megatron.core.optimizer import distrib_optimizer

from megatron_dsv3.training.ema import ema_sharded_state_dict

TRACKER_FILE = "latest_checkpointed_iteration.txt"
# megatron-core 0.16.1 cannot load 'fully_reshardable' distributed-optimizer state into torch's Adam
# (its per-parameter "step" breaks the copy); with Apex/TE's fused Adam it reshards over any layout.
OPTIMIZER_SHARDING = {
    "distrib_optim_sharding_type": "fully_reshardable" if distrib_optimizer.HAVE_APEX_OR_TE else "dp_reshardable"
}


def sharded_metadata() -> dict:
    """What megatron-core's sharded_state_dict needs to know about the layout (MTP with PP needs it)."""
    return {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_latest_iteration(root: str):
    """The iteration the marker names, or None when `root` holds no complete checkpoint."""
    try:
        with open(os.path.join(root, TRACKER_FILE)) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    if not text.isdigit():
        raise SystemExit(f"error: {os.path.join(root, TRACKER_FILE)} is corrupt ({text!r}); "
                         "point it at a complete iter_* directory or remove it")
    return int(text)


def _layout() -> dict:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "ep": parallel_state.get_expert_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_state() -> ShardedObject:
    state = {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": {k: v.clone() for k, v in _tracker().get_states().items()},
    }
    return ShardedObject("rng_state", state, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _tracker():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


def _sharded_state_dict(chunks, optimizer, scheduler, is_loading: bool, with_optimizer=True, with_rng=True,
                        ema=None):
    metadata = sharded_metadata()
    state = {}
    if len(chunks) == 1:
        state["model"] = chunks[0].module.sharded_state_dict(metadata=metadata)
        model_state = state["model"]
    else:
        model_state = {}  # per chunk: two chunks of one rank may hold the same key (DualPipeV's tied embedding)
        for index, chunk in enumerate(chunks):
            state[f"model{index}"] = chunk.module.sharded_state_dict(metadata=metadata)
            model_state[index] = state[f"model{index}"]
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata=OPTIMIZER_SHARDING
        )
        state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_state()
    if ema is not None:
        states = {0: state["model"]} if len(chunks) == 1 else model_state
        state["ema"] = ema_sharded_state_dict(ema, states)
    return state


def save_checkpoint(args, iteration, consumed_samples, chunks, optimizer, scheduler, ema=None) -> None:
    root = args.save
    final = checkpoint_dir(root, iteration)
    if read_latest_iteration(root) == iteration and os.path.isdir(final):
        return  # this exact state is already saved
    staging = final + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted save
        os.makedirs(staging)
    dist.barrier()
    state = _sharded_state_dict(chunks, optimizer, scheduler, is_loading=False, ema=ema)
    state.update(
        iteration=iteration,
        consumed_samples=consumed_samples,
        layout=_layout(),
        use_distributed_optimizer=args.use_distributed_optimizer,
        optimizer_sharding=OPTIMIZER_SHARDING["distrib_optim_sharding_type"],
        model_config=dataclasses.asdict(args.model_config),
        has_ema=ema is not None,
    )
    dist_checkpointing.save(state, staging)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        marker = os.path.join(root, TRACKER_FILE)
        with open(marker + ".tmp", "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker + ".tmp", marker)
        print(f"saved checkpoint {final}", flush=True)
    dist.barrier()


def _materialize_optimizer_state(optimizer) -> None:
    """The distributed optimizer describes its checkpoint from its Adam state, which a fresh optimizer
    lacks: megatron-core fills it with placeholders (a zero-gradient step) that the load then replaces.
    Runs before the model is loaded, so the step cannot touch the restored weights."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(sub, "_init_optimizer_states_with_dummy_values") and not sub.optimizer.state:
            sub._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """Without Apex/TE, megatron-core 0.16.1's distributed optimizer restores torch Adam's per-parameter `step`
    from the placeholder state (1) into one tensor shared by all parameters (which Adam then increments once per
    parameter). Give each parameter its own step, the one saved with its param group."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in sub.optimizer.param_groups:
            if group.get("step") is None:
                continue
            for param in group["params"]:
                state = sub.optimizer.state.get(param, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype)


def load_checkpoint(args, chunks, optimizer, scheduler, ema=None):
    """Resume from the newest complete checkpoint in `--load`; returns (iteration, consumed_samples)."""
    iteration = read_latest_iteration(args.load)
    if iteration is None:
        if dist.get_rank() == 0:
            print(f"no checkpoint in {args.load}: training from scratch", flush=True)
        return 0, 0
    path = checkpoint_dir(args.load, iteration)
    if not os.path.isdir(path):
        raise SystemExit(f"error: {TRACKER_FILE} names iteration {iteration} but {path} is missing")
    common = dist_checkpointing.load_common_state_dict(path)
    same_layout = common.get("layout") == _layout()
    load_optim = not args.no_load_optim
    if load_optim and common.get("use_distributed_optimizer") != args.use_distributed_optimizer:
        raise SystemExit(
            f"error: {path} was saved {'with' if common.get('use_distributed_optimizer') else 'without'} "
            "--use-distributed-optimizer; launch the same way, or pass --no-load-optim"
        )
    saved, now = common.get("layout", {}), _layout()
    if load_optim and any(saved.get(k) != now[k] for k in ("tp", "pp", "ep")):
        raise SystemExit(
            f"error: the optimizer state in {path} was saved at layout {saved} and reshards over data "
            f"parallelism only (now {now}); pass --no-load-optim to load the weights into this layout"
        )
    load_rng = same_layout and not args.no_load_rng
    if load_optim:
        _materialize_optimizer_state(optimizer)
    if ema is not None and not common.get("has_ema"):
        raise SystemExit(f"error: {path} holds no EMA (saved without --ema-decay); resume without --ema-decay")
    state = _sharded_state_dict(chunks, optimizer, scheduler, True, with_optimizer=load_optim, with_rng=load_rng,
                                ema=ema)
    loaded = dist_checkpointing.load(state, path, strict=StrictHandling.LOG_UNEXPECTED)
    for index, chunk in enumerate(chunks):
        chunk.module.load_state_dict(loaded["model"] if len(chunks) == 1 else loaded[f"model{index}"])
    if load_optim:
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if ema is not None:
        ema.load_state_dict(loaded["ema"])
    if load_rng:
        rng = loaded["rng_state"]
        random.setstate(rng["random"])
        np.random.set_state(rng["np"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        _tracker().set_states(rng["tracker"])
    if dist.get_rank() == 0:
        note = "" if same_layout else f" (saved at layout {common.get('layout')}; RNG state not restored)"
        print(f"loaded checkpoint {path} at iteration {iteration}{note}", flush=True)
    return iteration, common["consumed_samples"]
