"""Warnings of megatron-core 0.16.1 and torch that ask nothing of the user, silenced for the whole process
(`megatron_dsv3/__init__.py` does it before megatron-core is imported), and the one line said instead.

- Without Transformer Engine and Apex, five megatron-core modules each warn, on every rank, that they fall back
  to torch (optimizers, norms, multi-tensor kernels): `absent_backends_line` says it once.
- DistributedOptimizer.zero_grad reads `.grad` of its fp32 shard views, non-leaf tensors (megatron-core's own
  comment there: "throws grad-access warning").
- megatron-core calls torch.distributed's deprecated `reduce_scatter_tensor` / `all_gather_into_tensor`.
"""

import importlib.util
import warnings

_SILENCED = (
    (UserWarning, r"(Transformer Engine and Apex are|Apex is) not installed"),
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"),
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated"),
)
_OPTIONAL_BACKENDS = {"Transformer Engine": "transformer_engine", "Apex": "apex"}


def silence() -> None:
    for category, message in _SILENCED:
        warnings.filterwarnings("ignore", message=message, category=category)


def absent_backends_line():
    """One line naming the optional backends that are not installed and what that means; None if both are."""
    absent = [name for name, module in _OPTIONAL_BACKENDS.items() if importlib.util.find_spec(module) is None]
    if not absent:
        return None
    verb = "is" if len(absent) == 1 else "are"
    return (f"note: {' and '.join(absent)} {verb} not installed: megatron-core uses its torch implementations "
            "(optimizer, norms, multi-tensor kernels); fused GPU kernels and --fp8-format need Transformer Engine")
