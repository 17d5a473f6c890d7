"""The one place where megatron-core is made to run on a machine without a GPU.

megatron-core 0.16.1 assumes CUDA throughout: `device="cuda"` literals (schedules, optimizer, grad
buffers, checkpoint savers), `torch.cuda.current_device()` as a device, `torch.cuda.synchronize()`,
the CUDA RNG tracker, and `param.type() == "torch.cuda.FloatTensor"` checks. On a CPU-only host
`enable_cpu_execution()` maps all of these onto the CPU, explicitly and once per process:

- a `TorchFunctionMode` rewrites CUDA device arguments of torch calls to "cpu", makes
  `Tensor.cuda()` a no-op and reports CPU tensors' `.type()` as their CUDA names;
- `torch.cuda.current_device/synchronize/get_rng_state/set_rng_state/manual_seed` act on the CPU;
- megatron's RNG tracker reads and writes the CPU generator;
- MLA's Transformer Engine check is switched off (TE never works on a CPU host);
- output-discarding recompute (`--recompute-modules layernorm moe_act`) skips its Transformer Engine branch.

Every patched symbol is listed in `PATCHED_SYMBOLS`; `tests/test_platform.py` fails if megatron-core
moves one of them. On a GPU host nothing is patched.

The mode costs every torch call a Python detour (about 1.5 µs). The model's forward needs none of it (no CUDA
literal on its path; `torch.cuda.current_device` and the RNG functions are patched at module level), so
`cpu_mapping_suspended()` lifts the mode there (models/gpt_builder.py); whatever runs around it (schedules,
optimizer, checkpointing) and the backward keep it.

Without Triton (every CPU host, a GPU image without it), MLA's fused RoPE (`apply_rope_fusion`, on unless
--no-rope-fusion) runs models/mla_rope.py's torch functions in the place of megatron-core's Triton kernels:
`use_mla_rope_fusion` patches the `MLA_ROPE_PATCHED_SYMBOLS`. With Triton on a GPU nothing is patched.

Without Transformer Engine (any host), `--use-precision-aware-optimizer` runs megatron-core's own precision-aware
distributed optimizer on `PrecisionAwareAdam` (torch) in the place of TE's FusedAdam: `precision_aware_optimizer_config`
builds the OptimizerConfig and patches the `TORCH_ADAM_PATCHED_SYMBOLS`. With TE nothing is patched.
"""

import contextlib
import importlib

import torch
from torch.overrides import TorchFunctionMode

PATCHED_SYMBOLS = [
    "torch.cuda.current_device",
    "torch.cuda.synchronize",
    "torch.cuda.get_rng_state",
    "torch.cuda.set_rng_state",
    "torch.cuda.manual_seed",
    "megatron.core.tensor_parallel.random._get_cuda_rng_state",
    "megatron.core.tensor_parallel.random._set_cuda_rng_state",
    "megatron.core.transformer.multi_latent_attention.HAVE_TE",
    "megatron.core.tensor_parallel.CheckpointWithoutOutput",
]

TORCH_ADAM_PATCHED_SYMBOLS = [
    "megatron.core.optimizer.Adam",
    "megatron.core.optimizer.USING_PYTORCH_OPTIMIZER",
    "megatron.core.optimizer.is_te_min_version",
    "megatron.core.optimizer.distrib_optimizer.Adam",
]

MLA_ROPE_PATCHED_SYMBOLS = [
    "megatron.core.transformer.multi_latent_attention.fused_apply_mla_rope_for_q",
    "megatron.core.transformer.multi_latent_attention.fused_apply_mla_rope_for_kv",
]

_CPU = torch.device("cpu")
_mode = None  # the _CudaToCpuMode, once entered


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Runs torch calls written for CUDA on the CPU. Every torch call in the process passes through it: the common
    case (no `device` argument, none of the three tensor methods it maps) returns at the first test."""

    _MAPPED = frozenset((torch.Tensor.cuda, torch.Tensor.type, torch.Tensor.to))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not kwargs and func not in self._MAPPED:
            return func(*args)
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


def _cpu_get_rng_state(*_args, **_kwargs):
    return torch.random.get_rng_state()


def _cpu_set_rng_state(new_state, *_args, **_kwargs):
    torch.random.set_rng_state(new_state)


def _checkpoint_without_output_without_te():
    """megatron-core's CheckpointWithoutOutput with its Transformer Engine branch off.

    0.16.1 sets `self.fp8 = fp8 is not None`, so the default fp8=False (input/pre-MLP norm and MoE activation
    recompute) enters TE's FP8 state (FP8GlobalStateManager, fp8_autocast), which does not exist without TE:
    NameError at the first forward. Without TE no FP8 runs through TE, so the branch has nothing to restore;
    --fp8-emulation's linears keep no FP8 state between calls (current scaling), so their recompute is exact.
    """
    from megatron.core.tensor_parallel.random import CheckpointWithoutOutput

    class CheckpointWithoutOutputWithoutTE(CheckpointWithoutOutput):
        def __init__(self, fp8=False):
            super().__init__(fp8)
            self.fp8 = False

    return CheckpointWithoutOutputWithoutTE


def _resolve(path: str):
    module_path, _, attr = path.rpartition(".")
    module = importlib.import_module(module_path)
    return module, attr


def _patch(path: str, replacement) -> None:
    module, attr = _resolve(path)
    if not hasattr(module, attr):
        raise RuntimeError(
            f"platform shim: {path} is gone from this megatron-core/torch version; "
            "update megatron_dsv3/platform.py"
        )
    setattr(module, attr, replacement)


def enable_cpu_execution() -> bool:
    """Apply the CPU mapping if this host has no CUDA device. Returns True if applied."""
    global _mode
    if _mode is not None:
        return True
    if torch.cuda.is_available():
        return False
    replacements = {
        "torch.cuda.current_device": lambda: _CPU,
        "torch.cuda.synchronize": lambda *a, **k: None,
        "torch.cuda.get_rng_state": _cpu_get_rng_state,
        "torch.cuda.set_rng_state": _cpu_set_rng_state,
        "torch.cuda.manual_seed": lambda seed: torch.random.manual_seed(seed),
        "megatron.core.tensor_parallel.random._get_cuda_rng_state": _cpu_get_rng_state,
        "megatron.core.tensor_parallel.random._set_cuda_rng_state": _cpu_set_rng_state,
        # a stand-in TELinear makes MLA's isinstance check raise without Transformer Engine
        "megatron.core.transformer.multi_latent_attention.HAVE_TE": False,
        # megatron's layers look it up as tensor_parallel.CheckpointWithoutOutput at each forward
        "megatron.core.tensor_parallel.CheckpointWithoutOutput": _checkpoint_without_output_without_te(),
    }
    assert list(replacements) == PATCHED_SYMBOLS
    for path, replacement in replacements.items():
        _patch(path, replacement)
    _mode = _CudaToCpuMode()
    _mode.__enter__()
    return True


@contextlib.contextmanager
def cpu_mapping_suspended():
    """Torch calls inside skip the CPU mapping mode; other torch-function modes (a test's counters) stay."""
    stack = [] if _mode is None else torch.overrides._get_current_function_mode_stack()  # None: a GPU host
    if _mode not in stack:
        yield
        return
    _set_mode_stack([m for m in stack if m is not _mode], len(stack))
    try:
        yield
    finally:
        _set_mode_stack(stack, len(stack) - 1)


def _set_mode_stack(modes, depth: int) -> None:
    for _ in range(depth):
        torch._C._pop_torch_function_stack()
    for mode in modes:
        torch._C._push_on_torch_function_stack(mode)


def current_device() -> torch.device:
    """The device this process computes on: its GPU, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return _CPU


def use_mla_rope_fusion() -> bool:
    """Make megatron-core's MLA fused-RoPE path runnable here; returns True (the config's apply_rope_fusion)."""
    from megatron.core.fusions.fused_mla_yarn_rope_apply import HAVE_TRITON

    if torch.cuda.is_available() and HAVE_TRITON:
        return True
    from megatron_dsv3.models import mla_rope

    replacements = {
        "megatron.core.transformer.multi_latent_attention.fused_apply_mla_rope_for_q": mla_rope.apply_mla_rope_for_q,
        "megatron.core.transformer.multi_latent_attention.fused_apply_mla_rope_for_kv": mla_rope.apply_mla_rope_for_kv,
    }
    assert list(replacements) == MLA_ROPE_PATCHED_SYMBOLS
    for path, replacement in replacements.items():
        _patch(path, replacement)
    return True


def have_te_fused_adam() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return distrib_optimizer.USING_TE_OPTIMIZER


def precision_aware_optimizer_config(precision: dict, **fields):
    """megatron-core's OptimizerConfig(**fields, **precision), `precision` holding use_precision_aware_optimizer and
    the main_grads/main_params/exp_avg/exp_avg_sq dtypes.

    With TE, megatron-core validates and runs them itself. Without, its __post_init__ demands TE's FusedAdam
    (RuntimeError) and asks TE's version (None: TypeError), so the config is validated without the precision
    fields (`optimizer_precision.validate_optimizer_precision_args` checked them) and they are set after, with
    megatron-core's derived switch: master weights and decoupled gradients in the optimizer (no TE FP8 params
    exist here), no int16 remainders of BF16 weights (a TE kernel). get_megatron_optimizer then builds
    PrecisionAwareAdam with FusedAdam's keyword arguments (USING_PYTORCH_OPTIMIZER False) and without TE's
    version-gated store_param_remainders (is_te_min_version False), and the distributed optimizer accepts it
    as its Adam.
    """
    from megatron.core.optimizer import OptimizerConfig

    if not precision["use_precision_aware_optimizer"] or have_te_fused_adam():
        return OptimizerConfig(**fields, **precision)
    from megatron_dsv3.training.precision_aware_adam import PrecisionAwareAdam

    replacements = {
        "megatron.core.optimizer.Adam": PrecisionAwareAdam,
        "megatron.core.optimizer.USING_PYTORCH_OPTIMIZER": False,
        "megatron.core.optimizer.is_te_min_version": lambda *a, **k: False,
        "megatron.core.optimizer.distrib_optimizer.Adam": PrecisionAwareAdam,  # its check of the Adam class
    }
    assert list(replacements) == TORCH_ADAM_PATCHED_SYMBOLS
    for path, replacement in replacements.items():
        _patch(path, replacement)
    config = OptimizerConfig(**fields)
    for name, value in precision.items():
        setattr(config, name, value)
    config.store_param_remainders = False
    config.use_precision_aware_optimizer_no_fp8_or_ds_fp8 = True
    return config
