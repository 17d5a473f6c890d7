"""FP8 flags (Megatron-LM's spellings), their validation, and the Transformer Engine recipe they select.

`--fp8-format {e4m3,hybrid}` switches FP8 on; `--fp8-recipe` picks the scaling:
    delayed     per-tensor scale from an amax history      TE DelayedScaling      (SM ≥ 8.9)
    tensorwise  per-tensor scale from the current amax     TE Float8CurrentScaling (TE ≥ 2.2, SM ≥ 8.9)
    blockwise   DeepSeek-V3: 1×128 activation/gradient     TE Float8BlockScaling   (TE ≥ 2.3, SM ≥ 9.0,
                tiles, 128×128 weight blocks                                        CUDA ≥ 12.9)
    mxfp8       32-element blocks with E8M0 scales         TE MXFP8BlockScaling    (TE ≥ 2.1, SM ≥ 10.0)
`--fp8-emulation` runs the blockwise recipe's numerics in plain PyTorch (megatron_dsv3.fp8.blockwise)
on any machine; it is for studying numerics, not a speed path.

FP8 covers the GEMMs of the decoder layers' linear layers (MLA projections, dense and expert MLPs).
As in DeepSeek-V3 (§3.3.1) these stay in high precision: the embedding, the output head, the MoE
gate/router, the normalizations and the attention core (softmax(QKᵀ)·V); master weights, weight
gradients and optimizer states are not FP8 either. `--first-last-layers-bf16` also keeps the first
`--num-layers-at-start-in-bf16` and last `--num-layers-at-end-in-bf16` decoder layers out of FP8.
"""

import argparse
import re
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

import torch

FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
TE_RECIPE_CLASSES = {
    "delayed": "DelayedScaling",
    "tensorwise": "Float8CurrentScaling",
    "blockwise": "Float8BlockScaling",
    "mxfp8": "MXFP8BlockScaling",
}


class Requirement(NamedTuple):
    te: Tuple[int, int]
    sm: Tuple[int, int]
    cuda: Optional[Tuple[int, int]] = None


REQUIREMENTS = {
    "delayed": Requirement(te=(1, 0), sm=(8, 9)),
    "tensorwise": Requirement(te=(2, 2), sm=(8, 9)),
    "blockwise": Requirement(te=(2, 3), sm=(9, 0), cuda=(12, 9)),
    "mxfp8": Requirement(te=(2, 1), sm=(10, 0)),
}


def add_fp8_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("FP8")
    g.add_argument("--fp8-format", choices=FP8_FORMATS, default=None,
                   help="train the decoder layers' linear GEMMs in FP8 (off when unset): e4m3 everywhere, or "
                        "hybrid (E4M3 forward, E5M2 gradients)")
    g.add_argument("--fp8-recipe", choices=FP8_RECIPES, default=None,
                   help="scaling: delayed / tensorwise (per tensor), blockwise (DeepSeek-V3: 1×128 activation "
                        "tiles, 128×128 weight blocks), mxfp8 (32-element blocks); default delayed, or blockwise "
                        "with --fp8-emulation")
    g.add_argument("--fp8-emulation", action="store_true",
                   help="emulate the blockwise recipe's numerics in plain PyTorch (any machine, no Transformer "
                        "Engine); a numerics emulation, slower than BF16, not a speed path")
    g.add_argument("--no-fp8-activation-storage", dest="fp8_activation_storage", action="store_false",
                   help="with --fp8-emulation: the FP8 linears save their high-precision input for the weight-gradient "
                        "instead of its FP8 tiles (DeepSeek-V3 §3.3.3's low-precision storage off; same numerics)")
    g.add_argument("--first-last-layers-bf16", action="store_true",
                   help="keep the first and last decoder layers in high precision when training in FP8")
    g.add_argument("--num-layers-at-start-in-bf16", type=int, default=1,
                   help="with --first-last-layers-bf16: decoder layers at the start kept out of FP8")
    g.add_argument("--num-layers-at-end-in-bf16", type=int, default=1,
                   help="with --first-last-layers-bf16: decoder layers at the end kept out of FP8")


def _version(text: Optional[str]) -> Optional[Tuple[int, int]]:
    numbers = re.findall(r"\d+", text or "")
    return (int(numbers[0]), int(numbers[1])) if len(numbers) >= 2 else None


def _dotted(version: Tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


@dataclass(frozen=True)
class Fp8Machine:
    """What this process can run FP8 kernels with."""

    sm: Optional[Tuple[int, int]]  # compute capability of the current GPU; None without one
    gpu_name: str
    cuda: Optional[Tuple[int, int]]  # CUDA version torch was built with
    te: Optional[Tuple[int, int]]  # Transformer Engine version; None when it cannot be imported
    te_problem: str  # why it cannot ("" when it can)

    def meets(self, need: Requirement) -> bool:
        return (
            self.te is not None and self.te >= need.te
            and self.sm is not None and self.sm >= need.sm
            and (need.cuda is None or (self.cuda is not None and self.cuda >= need.cuda))
        )

    def describe(self) -> str:
        gpu = f"an SM {_dotted(self.sm)} GPU ({self.gpu_name})" if self.sm else "no CUDA GPU"
        cuda = f"CUDA {_dotted(self.cuda)}" if self.cuda else "a CPU-only PyTorch"
        te = f"Transformer Engine {_dotted(self.te)}" if self.te else "no usable Transformer Engine"
        te += f" ({self.te_problem})" if self.te_problem else ""
        return f"{gpu}, {cuda} and {te}"


def _transformer_engine_version() -> Tuple[Optional[Tuple[int, int]], str]:
    try:  # on a machine without CUDA the import raises RuntimeError/OSError, not only ImportError
        import transformer_engine
        import transformer_engine.pytorch  # noqa: F401  (the part that needs the GPU stack)
    except Exception as e:  # noqa: BLE001  any failure means "not available"
        return None, f"import failed with {type(e).__name__}"
    version = _version(getattr(transformer_engine, "__version__", None))
    return version, "" if version else "unknown version"


def probe_machine() -> Fp8Machine:
    gpu = torch.cuda.is_available()
    te, te_problem = _transformer_engine_version()
    return Fp8Machine(
        sm=torch.cuda.get_device_capability() if gpu else None,
        gpu_name=torch.cuda.get_device_name() if gpu else "",
        cuda=_version(torch.version.cuda),
        te=te,
        te_problem=te_problem,
    )


def validate_fp8_args(args, num_layers: Optional[int] = None) -> None:
    """Raises ValueError (one line naming the flags and the fix); resolves args.fp8_recipe when FP8 is on.

    Runs before any process-group work. `num_layers` (the decoder layers) bounds the BF16 layer counts.
    """
    if args.fp8_format is None:
        for flag, value in (("--fp8-recipe", args.fp8_recipe), ("--fp8-emulation", args.fp8_emulation),
                            ("--first-last-layers-bf16", args.first_last_layers_bf16)):
            if value:
                raise ValueError(f"{flag} needs --fp8-format {{e4m3,hybrid}}, the flag that switches FP8 on")
        if not args.fp8_activation_storage:
            raise ValueError("--no-fp8-activation-storage needs FP8 training: add --fp8-format e4m3 --fp8-emulation, "
                             "or drop the flag")
        return
    args.fp8_recipe = args.fp8_recipe or ("blockwise" if args.fp8_emulation else "delayed")
    if args.first_last_layers_bf16:
        start, end = args.num_layers_at_start_in_bf16, args.num_layers_at_end_in_bf16
        if start < 0 or end < 0:
            raise ValueError("--num-layers-at-start-in-bf16 and --num-layers-at-end-in-bf16 must be ≥ 0")
        if num_layers is not None and start + end >= num_layers:
            raise ValueError(f"--num-layers-at-start-in-bf16 {start} + --num-layers-at-end-in-bf16 {end} leave "
                             f"none of the {num_layers} layers in FP8; lower them or drop --fp8-format")
    if not (args.fp8_emulation or args.fp8_activation_storage):
        raise ValueError("--no-fp8-activation-storage switches the emulated FP8 linears' storage; add --fp8-emulation "
                         "(Transformer Engine's FP8 layers decide what they keep themselves) or drop the flag")
    if args.fp8_emulation:
        if args.fp8_recipe != "blockwise":
            raise ValueError(f"--fp8-emulation only emulates --fp8-recipe blockwise (DeepSeek-V3's recipe), "
                             f"got --fp8-recipe {args.fp8_recipe}; run that recipe on a GPU with Transformer Engine")
        if args.fp8_format != "e4m3":
            raise ValueError("--fp8-emulation emulates DeepSeek-V3's all-E4M3 recipe; use --fp8-format e4m3")
        return
    need, machine = REQUIREMENTS[args.fp8_recipe], probe_machine()
    if not machine.meets(need):
        cuda = f" with CUDA ≥ {_dotted(need.cuda)}" if need.cuda else ""
        fix = ("add --fp8-emulation to emulate the numerics on CPU" if args.fp8_recipe == "blockwise" else
               "use such a machine, or --fp8-recipe blockwise --fp8-emulation to emulate DeepSeek-V3's recipe")
        raise ValueError(f"--fp8-recipe {args.fp8_recipe} needs Transformer Engine ≥ {_dotted(need.te)} and an "
                         f"SM ≥ {_dotted(need.sm)} GPU{cuda}; this machine has {machine.describe()}; {fix}")


def build_te_fp8_recipe(args):
    """The Transformer Engine recipe object for validated GPU flags (TE's defaults for everything else)."""
    if args.fp8_emulation:
        raise ValueError("--fp8-emulation uses megatron_dsv3.fp8.blockwise, not a Transformer Engine recipe")
    from transformer_engine.common import recipe

    fp8_format = {"e4m3": recipe.Format.E4M3, "hybrid": recipe.Format.HYBRID}[args.fp8_format]
    return getattr(recipe, TE_RECIPE_CLASSES[args.fp8_recipe])(fp8_format=fp8_format)


def fp8_config_fields(args) -> dict:
    """TransformerConfig fields for validated flags. On GPUs these are megatron-core's own (fp8, fp8_recipe,
    first/last BF16 layers): its TransformerBlock then enters TE's fp8_autocast per layer (outside it for the
    BF16 ones) and its expert MLPs pad tokens for FP8. With --fp8-emulation megatron's `fp8` stays off (it
    would call into TE) and the spec builds the emulated FP8 linear layers instead."""
    if args.fp8_format is None:
        return {}
    fields = dict(first_last_layers_bf16=args.first_last_layers_bf16,
                  num_layers_at_start_in_bf16=args.num_layers_at_start_in_bf16,
                  num_layers_at_end_in_bf16=args.num_layers_at_end_in_bf16)
    if args.fp8_emulation:
        return dict(fields, fp8_emulation=True, fp8_activation_storage=args.fp8_activation_storage)
    return dict(fields, fp8=args.fp8_format, fp8_recipe=args.fp8_recipe)


def layer_uses_fp8(layer_number: int, config) -> bool:
    """Whether decoder layer `layer_number` (1-based and global, as in Megatron) runs its GEMMs in FP8 under
    `config` (a DSv3TransformerConfig: megatron's `fp8` or our `fp8_emulation`, and the first/last BF16 layers)."""
    if not 1 <= layer_number <= config.num_layers:
        raise ValueError(f"layer_number {layer_number} is outside 1..{config.num_layers}")
    if not (config.fp8 or config.fp8_emulation):
        return False
    if not config.first_last_layers_bf16:
        return True
    return config.num_layers_at_start_in_bf16 < layer_number <= config.num_layers - config.num_layers_at_end_in_bf16
