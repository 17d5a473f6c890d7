"""Command-line arguments of pretrain_dsv3.py (Megatron-LM's flag names) and their validation.

Every field of the chosen `--model` preset is also a flag (`--num-layers`, `--moe-router-topk`, ...).
`validate_args` runs before any process-group work and stops at the first inconsistency with a
message that names the flags and the fix.
"""

import argparse
import dataclasses
import os
import typing
from functools import partial

import torch

from megatron_dsv3.data.fim import add_fim_args, validate_fim_args
from megatron_dsv3.fp8.recipes import add_fp8_args, validate_fp8_args
from megatron_dsv3.training.batch_schedule import (
    add_batch_schedule_args, check_every_stage, validate_batch_schedule_args,
)
from megatron_dsv3.training.lr_schedule import add_lr_schedule_args, validate_lr_schedule_args
from megatron_dsv3.training.ema import add_ema_args, validate_ema_args
from megatron_dsv3.training.evaluate import add_eval_args, validate_eval_args
from megatron_dsv3.models.presets import MODEL_FIELDS, PRESETS, DSv3ModelConfig, get_preset
from megatron_dsv3.models.transformer_config import transformer_config_from_args
from megatron_dsv3.pipeline.dualpipe import add_pipeline_output_args, validate_pipeline_output_args
from megatron_dsv3.pipeline.placement import (
    DUAL_SCHEDULES, add_dual_placement_args, validate_dual_pipeline, validate_dual_placement_args,
)
from megatron_dsv3.training.input_checks import ArgumentParser, add_safety_args, fail, validate_input_args
from megatron_dsv3.training.optimizer_precision import (
    add_optimizer_precision_args, validate_optimizer_precision_args,
)
from megatron_dsv3.training.recompute import validate_recompute_args
from megatron_dsv3.training.token_schedules import add_token_schedule_args, validate_token_schedule_args

PIPELINE_SCHEDULES = ("1f1b", "interleaved", "dualpipe", "dualpipev")
TOKEN_DISPATCHERS = ("alltoall", "hierarchical")


def _parse_moe_layer_freq(text: str):
    """Megatron syntax: an int, or a Python list expression such as ([0]*3+[1]*58)."""
    if text.strip().lstrip("-").isdigit():
        return int(text)
    value = eval(text, {"__builtins__": {}}, {})  # same syntax Megatron-LM accepts
    if not isinstance(value, list) or any(v not in (0, 1) for v in value):
        raise argparse.ArgumentTypeError(f"--moe-layer-freq: expected an int or a 0/1 list, got {text!r}")
    return value


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    return parse


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (each overrides the --model preset)")
    group.add_argument("--model", default="tiny", choices=sorted(PRESETS), help="architecture preset")
    hints = typing.get_type_hints(DSv3ModelConfig)
    for field in dataclasses.fields(DSv3ModelConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        if field.name == "moe_layer_freq":
            group.add_argument(flag, type=_parse_moe_layer_freq, default=argparse.SUPPRESS)
        elif kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            group.add_argument(flag, type=_optional(base), default=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Pretrain a DeepSeek-V3-class model on Megatron-Core (launch with torchrun).",
        allow_abbrev=False,
    )
    _add_model_args(parser)

    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None)
    g.add_argument("--pipeline-schedule", choices=PIPELINE_SCHEDULES, default=None,
                   help="default: interleaved when --num-layers-per-virtual-pipeline-stage is set, else 1f1b")
    g.add_argument("--overlap-moe-expert-parallel-comm", action="store_true",
                   help="dualpipe/dualpipev: in each overlapped F&B pair, run one micro-batch's expert all-to-all "
                        "while the other computes (forward and backward alternate at every all-to-all)")
    g.add_argument("--moe-token-dispatcher-type", choices=TOKEN_DISPATCHERS, default="alltoall",
                   help="hierarchical: node-limited two-stage all-to-all (each token crosses to ≤ "
                        "--moe-router-group-topk nodes once, then fans out inside the node)")
    g.add_argument("--moe-grouped-gemm", action="store_true",
                   help="routed experts as one grouped GEMM per projection: Transformer Engine's with TE, else "
                        "torch._grouped_mm (Hopper GPUs, CPU); same checkpoints as the per-expert loop")
    g.add_argument("--simulated-gpus-per-node", type=int, default=None,
                   help="treat every N consecutive ranks as one node (default: the launch's LOCAL_WORLD_SIZE)")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="ZeRO-1 over data parallel")
    g.add_argument("--distributed-backend", choices=("nccl", "gloo"), default=None,
                   help="default: nccl with GPUs, gloo without")

    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=2)
    g.add_argument("--global-batch-size", type=int, default=8)
    g.add_argument("--seq-length", type=int, default=64)
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--no-rope-fusion", action="store_true",
                   help="MLA's RoPE op by op instead of fused (Triton kernels on GPUs, models/mla_rope.py elsewhere)")
    g.add_argument("--max-skipped-nonfinite-steps", type=int, default=0,
                   help="skip up to N optimizer steps whose loss/gradients hold NaN/Inf; stop at the next one")
    g.add_argument("--exit-interval", type=int, default=None, help="save and exit after iterations divisible by N")
    g.add_argument("--exit-duration-in-mins", type=float, default=None, help="save and exit after this many minutes")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--recompute-modules", nargs="+", default=None,
                   help="selective recompute: e.g. layernorm mla_up_proj moe_act core_attn")

    g = parser.add_argument_group("data")
    g.add_argument("--mock-data", action="store_true", help="synthetic tokens (the default without --data-path)")
    g.add_argument("--data-path", nargs="+", default=None, help="prefix, or blended: W1 PREFIX1 W2 PREFIX2 ...")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--tokenizer-type", choices=("NullTokenizer", "HuggingFaceTokenizer"), default="NullTokenizer")
    g.add_argument("--tokenizer-model", default=None, help="tokenizer.json file or directory (HuggingFaceTokenizer)")
    g.add_argument("--data-cache-path", default=None)

    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--load", default=None, help="checkpoint directory to resume from")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--ckpt-format", choices=("torch_dist",), default="torch_dist")

    g = parser.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--wandb-project", default=None, help="wandb project (WANDB_MODE=offline works without network)")
    g.add_argument("--wandb-exp-name", default=None)
    g.add_argument("--wandb-save-dir", default=None)
    g.add_argument("--metrics-jsonl", default=None, help="append one JSON line of metrics per logged iteration")
    add_batch_schedule_args(parser)
    add_token_schedule_args(parser)
    add_lr_schedule_args(parser)
    add_pipeline_output_args(parser)
    add_dual_placement_args(parser)
    add_fp8_args(parser)
    add_safety_args(parser)
    add_optimizer_precision_args(parser)
    add_ema_args(parser)
    add_eval_args(parser)
    add_fim_args(parser)
    return parser


def model_config_from_args(args) -> DSv3ModelConfig:
    overrides = {name: getattr(args, name) for name in MODEL_FIELDS if hasattr(args, name)}
    return get_preset(args.model).replace(**overrides)


def parse_args(argv=None, world_size=None):
    args = build_parser().parse_args(argv)
    args.model_config = model_config_from_args(args)
    args.world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    validate_args(args)
    return args


_fail = fail  # one line, printed by rank 0 only


def validate_args(args) -> None:
    """All flag consistency checks; runs before torch.distributed is initialized."""
    validate_input_args(args)
    m = args.model_config
    if args.distributed_backend == "nccl" and not torch.cuda.is_available():
        _fail("--distributed-backend nccl needs GPUs; use gloo on CPU")
    args.distributed_backend = args.distributed_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    try:
        validate_fp8_args(args, m.num_layers)
        validate_recompute_args(args)
        validate_ema_args(args)
        validate_optimizer_precision_args(args)
    except ValueError as e:
        _fail(str(e))
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    world = args.world_size
    if world % (tp * pp):
        _fail(f"WORLD_SIZE {world} is not divisible by --tensor-model-parallel-size {tp} × "
              f"--pipeline-model-parallel-size {pp}; launch a multiple of {tp * pp} processes")
    args.data_parallel_size = dp = world // (tp * pp)
    if (dp * tp) % ep:
        _fail(f"--expert-model-parallel-size {ep} must divide data-parallel × tensor-parallel ranks "
              f"({dp} × {tp}) of each pipeline stage")
    if args.moe_token_dispatcher_type == "hierarchical":
        m = args.model_config = _node_limited_routing(args, m, ep)
    if m.num_experts is not None:
        if m.num_experts % ep:
            _fail(f"--num-experts {m.num_experts} is not divisible by --expert-model-parallel-size {ep}")
        if tp > 1:
            _fail("--tensor-model-parallel-size > 1 with MoE needs sequence parallelism, which needs "
                  "Transformer Engine on GPUs; DeepSeek-V3 trains with TP=1: use EP and PP instead")
        g, gk, k = m.moe_router_num_groups, m.moe_router_group_topk, m.moe_router_topk
        if k > m.num_experts:
            _fail(f"--moe-router-topk {k} exceeds --num-experts {m.num_experts}")
        if g:
            if m.num_experts % g:
                _fail(f"--num-experts {m.num_experts} is not divisible by --moe-router-num-groups {g}")
            if not gk or gk > g:
                _fail(f"--moe-router-group-topk must be in 1..--moe-router-num-groups ({g}), got {gk}")
            if k > gk * (m.num_experts // g):
                _fail(f"--moe-router-topk {k} exceeds the experts in --moe-router-group-topk {gk} groups "
                      f"of {m.num_experts // g}")
        elif gk:
            _fail("--moe-router-group-topk needs --moe-router-num-groups")
        if m.moe_ffn_hidden_size is None:
            _fail("--num-experts needs --moe-ffn-hidden-size")
        try:
            m.moe_layer_pattern
        except ValueError as e:
            _fail(str(e))
    if m.moe_router_score_function not in ("sigmoid", "softmax"):
        _fail(f"--moe-router-score-function must be sigmoid or softmax, got {m.moe_router_score_function!r}")
    validate_batch_schedule_args(args, _fail)
    _validate_pipeline_split(args, m.num_layers, pp)
    try:
        validate_pipeline_output_args(args)
        validate_dual_placement_args(args)
    except ValueError as e:
        _fail(str(e))
    if args.overlap_moe_expert_parallel_comm:
        if args.pipeline_schedule not in DUAL_SCHEDULES:
            _fail("--overlap-moe-expert-parallel-comm overlaps the F&B pairs of --pipeline-schedule dualpipe or "
                  f"dualpipev, not {args.pipeline_schedule}")
        if ep == 1 or m.num_experts is None:
            _fail("--overlap-moe-expert-parallel-comm needs an MoE model with --expert-model-parallel-size > 1 "
                  "(there is no expert all-to-all to overlap)")
    if args.seq_length > m.max_position_embeddings:
        _fail(f"--seq-length {args.seq_length} exceeds --max-position-embeddings {m.max_position_embeddings}")
    if args.global_batch_size % (args.micro_batch_size * dp):
        _fail(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
              f"{args.micro_batch_size} × data-parallel size {dp}")
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * dp)
    if m.mtp_num_layers:
        if m.mtp_num_layers < 0:
            _fail("--mtp-num-layers must be positive")
        if args.seq_length <= m.mtp_num_layers:
            _fail(f"--seq-length {args.seq_length} leaves no target for --mtp-num-layers {m.mtp_num_layers}")
    if args.save_interval and not args.save:
        _fail("--save-interval needs --save DIR")
    if args.data_path and args.mock_data:
        _fail("--mock-data and --data-path exclude each other")
    args.mock_data = not args.data_path
    problem = validate_fim_args(args)
    if problem:
        _fail(problem)
    if args.tokenizer_type == "HuggingFaceTokenizer" and not args.tokenizer_model:
        _fail("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model PATH (tokenizer.json or its directory)")
    if args.bf16 and not torch.cuda.is_available():
        _fail("--bf16 mixed precision needs GPUs; on CPU train in fp32 (drop --bf16)")
    if args.recompute_method and args.recompute_granularity != "full":
        _fail("--recompute-method needs --recompute-granularity full")
    if args.recompute_granularity == "full" and not (args.recompute_method and args.recompute_num_layers):
        _fail("--recompute-granularity full needs --recompute-method and --recompute-num-layers")
    validate_lr_schedule_args(args, _fail)
    validate_token_schedule_args(args, _fail)
    problem = validate_eval_args(args)
    if problem:
        _fail(problem)
    try:  # megatron-core's own checks (e.g. which --recompute-modules it supports), as one line
        transformer_config_from_args(args)
    except (ValueError, AssertionError) as e:
        _fail(f"megatron-core rejects these flags: {e}")


def _node_limited_routing(args, m, ep: int) -> DSv3ModelConfig:
    """Groups of the router = the EP group's nodes; a token may use M = --moe-router-group-topk of them
    (the preset's M, capped at the node count, unless given explicitly)."""
    if m.num_experts is None:
        _fail("--moe-token-dispatcher-type hierarchical needs an MoE model (--num-experts)")
    per_node = args.simulated_gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if ep % per_node and per_node % ep:
        _fail(f"--expert-model-parallel-size {ep} is not aligned with nodes of {per_node} GPUs: make it a "
              "multiple or a divisor of the GPUs per node (--simulated-gpus-per-node on CPU)")
    nodes = max(1, ep // per_node)
    explicit = getattr(args, "moe_router_num_groups", None)
    if explicit is not None and explicit != nodes:
        _fail(f"--moe-router-num-groups {explicit} must equal the {nodes} node(s) spanned by "
              f"--expert-model-parallel-size {ep} with {per_node} GPUs per node (or leave it unset)")
    group_topk = getattr(args, "moe_router_group_topk", None) or min(m.moe_router_group_topk or nodes, nodes)
    if group_topk > nodes:
        _fail(f"--moe-router-group-topk {group_topk} (M) exceeds the {nodes} node(s) the expert-parallel group spans; "
              f"use M ≤ {nodes} or a larger --expert-model-parallel-size")
    return m.replace(moe_router_num_groups=nodes, moe_router_group_topk=group_topk)


def _validate_pipeline_split(args, num_layers: int, pp: int) -> None:
    first, last = args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers
    vpp_layers = args.num_layers_per_virtual_pipeline_stage
    schedule = args.pipeline_schedule or ("interleaved" if vpp_layers else "1f1b")
    args.pipeline_schedule = schedule
    if (first or last) and pp == 1:
        _fail("--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1")
    middle_stages = pp - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    if middle_layers < 0 or (middle_stages == 0 and middle_layers) or (middle_stages and middle_layers % middle_stages):
        _fail(f"--num-layers {num_layers} does not split over --pipeline-model-parallel-size {pp} "
              f"(first stage {first}, last stage {last}): the remaining {middle_layers} layers must divide "
              f"evenly over {middle_stages} stages; set --decoder-first/last-pipeline-num-layers")
    args.virtual_pipeline_model_parallel_size = None
    if schedule in DUAL_SCHEDULES:
        check_every_stage(args, lambda n, flags: validate_dual_pipeline(
            schedule, pp, num_layers, n, virtual_stages=vpp_layers, uneven_first_last=bool(first or last),
            batch_flags=flags), _fail)
        return
    if schedule == "interleaved":
        if pp < 2 or not vpp_layers:
            _fail("--pipeline-schedule interleaved needs --pipeline-model-parallel-size ≥ 2 and "
                  "--num-layers-per-virtual-pipeline-stage")
        if pp == 2 and args.distributed_backend == "gloo":
            _fail("--pipeline-schedule interleaved with --pipeline-model-parallel-size 2 sends activations and "
                  "gradients to the same peer in one batch, which gloo cannot tell apart; use PP ≥ 3 on CPU")
        if first or last:
            _fail("--num-layers-per-virtual-pipeline-stage cannot be combined with uneven "
                  "--decoder-first/last-pipeline-num-layers")
        per_stage = num_layers // pp
        if per_stage % vpp_layers:
            _fail(f"{per_stage} layers per pipeline stage are not divisible by "
                  f"--num-layers-per-virtual-pipeline-stage {vpp_layers}")
        args.virtual_pipeline_model_parallel_size = per_stage // vpp_layers
        check_every_stage(args, partial(_check_interleaved_microbatches, pp), _fail)
    elif vpp_layers:
        _fail("--num-layers-per-virtual-pipeline-stage needs --pipeline-schedule interleaved")


def _check_interleaved_microbatches(pp: int, num_microbatches: int, batch_flags: str) -> None:
    if num_microbatches % pp:
        raise ValueError(f"--pipeline-schedule interleaved needs the number of micro-batches to be a multiple of "
                         f"--pipeline-model-parallel-size {pp}, got {num_microbatches}; adjust {batch_flags}")
