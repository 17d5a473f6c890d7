"""RMSNorm for the spec: y = x / sqrt(mean(x²) + ε) · g   (DeepSeek-V3 §2; Zhang & Sennrich 2019).

Transformer Engine's fused RMSNorm where TE is installed (megatron-core's TENorm); otherwise torch's
`F.rms_norm` (one fused kernel on CUDA) with the weight `g` in the training dtype (`params_dtype`: BF16 under
--bf16), not FP32 as megatron-core's WrappedTorchNorm builds it. Same parameter name (`weight`) either way,
so checkpoints do not depend on which one ran.
"""

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


def transformer_engine_norm():
    """megatron-core's TENorm if Transformer Engine imports, else None."""
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE, TENorm
    except ImportError:
        return None
    return TENorm if HAVE_TE else None


class TorchRMSNorm(MegatronModule):
    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__(config=config)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class RMSNorm:
    """The RMSNorm module this build runs (see the module docstring); a class, as megatron's build_module
    calls classes (it returns plain functions uncalled)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-6, **kwargs):
        te_norm = transformer_engine_norm() if torch.cuda.is_available() else None
        if te_norm is not None:
            return te_norm(config, hidden_size, eps, **kwargs)
        return TorchRMSNorm(config, hidden_size, eps)
