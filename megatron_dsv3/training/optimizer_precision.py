"""Precision of the optimizer state: Megatron-LM's `--use-precision-aware-optimizer` flags.

DeepSeek-V3 keeps Adam's moments in BF16 and the master weights in FP32 (report §3.3.3):
`--use-precision-aware-optimizer --exp-avg-dtype bf16 --exp-avg-sq-dtype bf16 --main-params-dtype fp32`
with `--use-distributed-optimizer`. megatron-core's precision-aware distributed optimizer runs them, on
Transformer Engine's FusedAdam where TE is installed and on `PrecisionAwareAdam` (torch) where it is not
(`platform.precision_aware_optimizer_config`). The moments are checkpointed in their dtype.
"""

import torch

from megatron_dsv3 import platform

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.uint8}
# flag -> Megatron-LM's choices; without TE only fp32/bf16 (TE's FusedAdam scales fp16/fp8 states)
DTYPE_FLAGS = {
    "main_grads_dtype": ("fp32", "bf16"),
    "main_params_dtype": ("fp32", "fp16"),
    "exp_avg_dtype": ("fp32", "fp16", "bf16", "fp8"),
    "exp_avg_sq_dtype": ("fp32", "fp16", "bf16", "fp8"),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_optimizer_precision_args(parser) -> None:
    g = parser.add_argument_group("optimizer precision")
    g.add_argument("--use-precision-aware-optimizer", action="store_true",
                   help="keep the optimizer state in the dtypes below (needs --use-distributed-optimizer)")
    for name, choices in DTYPE_FLAGS.items():
        g.add_argument(_flag(name), choices=choices, default="fp32",
                       help=f"dtype of {name.removesuffix('_dtype').replace('_', ' ')} "
                            "with --use-precision-aware-optimizer")


def validate_optimizer_precision_args(args) -> None:
    """Raises ValueError (one line naming the flag and the fix)."""
    changed = [name for name in DTYPE_FLAGS if getattr(args, name) != "fp32"]
    if not args.use_precision_aware_optimizer:
        if changed:
            name = changed[0]
            raise ValueError(f"{_flag(name)} {getattr(args, name)} needs --use-precision-aware-optimizer "
                             "(without it the optimizer state is fp32)")
        return
    if not args.use_distributed_optimizer:
        raise ValueError("--use-precision-aware-optimizer needs --use-distributed-optimizer (megatron-core keeps "
                         "low-precision optimizer state only in the distributed optimizer's shards)")
    if args.main_grads_dtype != "fp32":
        raise ValueError(f"--main-grads-dtype {args.main_grads_dtype} is not supported: this trainer reduces and "
                         "keeps gradients in fp32; use --main-grads-dtype fp32")
    if not platform.have_te_fused_adam():
        for name in changed:
            if getattr(args, name) != "bf16":
                raise ValueError(f"{_flag(name)} {getattr(args, name)} needs Transformer Engine's FusedAdam "
                                 "(scaled fp16/fp8 state); without TE use bf16 or fp32")


def optimizer_config(args, **fields):
    """megatron-core's OptimizerConfig(**fields) with this job's optimizer precision."""
    precision = {"use_precision_aware_optimizer": args.use_precision_aware_optimizer,
                 **{name: DTYPES[getattr(args, name)] for name in DTYPE_FLAGS}}
    return platform.precision_aware_optimizer_config(precision, **fields)
