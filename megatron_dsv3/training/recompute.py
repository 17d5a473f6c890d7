"""Selective recompute (--recompute-granularity selective --recompute-modules ...): megatron-core's own, checked
before the model is built.

The output-discarding modules (`layernorm`, `moe_act`: megatron's CheckpointWithoutOutput, which frees the output
after the forward and rebuilds it in the backward) enter Transformer Engine's FP8 state even with FP8 off in
megatron-core 0.16.1. On CPU hosts platform.enable_cpu_execution switches that branch off; a GPU host needs
Transformer Engine for them.
"""

import torch

from megatron_dsv3.fp8.recipes import probe_machine

OUTPUT_DISCARDING_WITHOUT_FP8 = ("layernorm", "moe_act")


def validate_recompute_args(args) -> None:
    """Raises ValueError with one line naming the flag and the fix."""
    modules = args.recompute_modules or []
    if modules and args.recompute_granularity != "selective":
        raise ValueError(f"--recompute-modules {' '.join(modules)} needs --recompute-granularity selective")
    need_te = [m for m in modules if m in OUTPUT_DISCARDING_WITHOUT_FP8]
    if need_te and torch.cuda.is_available() and probe_machine().te is None:
        raise ValueError(f"--recompute-modules {' '.join(need_te)} needs Transformer Engine on a GPU host "
                         "(megatron-core's CheckpointWithoutOutput uses its FP8 state): install transformer-engine "
                         f"or drop {' '.join(need_te)}")
