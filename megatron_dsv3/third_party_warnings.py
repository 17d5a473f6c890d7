"""Warnings of megatron-core 0.16.1 and torch that ask nothing of the user, silenced for the whole process
(`megatron_dsv3/__init__.py` does it before megatron-core is imported), and the one line said instead.

- Without Transformer Engine and Apex, five megatron-core modules each warn, on every rank, that they fall back
  to torch (optimizers, norms, multi-tensor kernels): `absent_backends_line` says it once.
- DistributedOptimizer.zero_grad reads `.grad` of its fp32 shard views, non-leaf tensors (megatron-core's own
  comment there: "throws grad-access warning").
- MLA with `apply_rope_fusion` warns that the fusion "only supports training" and is experimental: it means
  megatron-core's inference engine (KV caches), which nothing here uses; evaluation runs the training forward.
- megatron-core calls torch.distributed's deprecated `reduce_scatter_tensor` / `all_gather_into_tensor`.
- Mock data: megatron-core's GPTDataset logs, once per split, that it cannot cache the indexes of generated
  samples (real data gets a default cache directory).
"""

import importlib.util
import logging
import re
import warnings

_SILENCED = (
    (UserWarning, r"(Transformer Engine and Apex are|Apex is) not installed"),
    (UserWarning, r"apply_rope_fusion for multi-latent attention only supports training"),
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"),
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated"),
)
_SILENCED_LOGS = {"megatron.core.datasets.gpt_dataset": r"Unable to save MockGPTDataset indexes"}
_OPTIONAL_BACKENDS = {"Transformer Engine": "transformer_engine", "Apex": "apex"}


class _DropMessage(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def silence() -> None:
    for category, message in _SILENCED:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, message in _SILENCED_LOGS.items():
        logging.getLogger(name).addFilter(_DropMessage(message))


def absent_backends_line():
    """One line naming the optional backends that are not installed and what that means; None if both are."""
    absent = [name for name, module in _OPTIONAL_BACKENDS.items() if importlib.util.find_spec(module) is None]
    if not absent:
        return None
    verb = "is" if len(absent) == 1 else "are"
    return (f"note: {' and '.join(absent)} {verb} not installed: megatron-core uses its torch implementations "
            "(optimizer, norms, multi-tensor kernels); fused GPU kernels and --fp8-format need Transformer Engine")
