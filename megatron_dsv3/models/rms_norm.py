"""RMSNorm for the spec: y = x / sqrt(mean(x²) + ε) · g   (DeepSeek-V3 §2; Zhang & Sennrich 2019).

Transformer Engine's fused RMSNorm where TE is installed (megatron-core's TENorm); otherwise torch's fused
RMSNorm kernels (aten `_fused_rms_norm` and, on GPUs, its backward) with the weight `g` in the training dtype
(`params_dtype`: BF16 under --bf16), not FP32 as megatron-core's WrappedTorchNorm builds it. Same parameter name
(`weight`) either way, so checkpoints do not depend on which one ran.

The torch norm is one autograd node, as TE's is (torch's own decomposes into several, each adding a piece of
∂x): x's gradient is then the sum of two terms, the norm's and the residual's, which is exact in either order.
So a recomputed norm (--recompute-modules layernorm) gives bit-equal gradients.
"""

import torch
from megatron.core.transformer.module import MegatronModule


def transformer_engine_norm():
    """megatron-core's TENorm if Transformer Engine imports, else None."""
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE, TENorm
    except ImportError:
        return None
    return TENorm if HAVE_TE else None


class RMSNormFunction(torch.autograd.Function):
    """y = x̂·g, x̂ = x·r, r = 1/sqrt(mean(x²) + ε);  backward with ĝ = ∂y·g (in at least FP32):
        ∂x = r·(ĝ − x̂·mean(ĝ·x̂)),   ∂g = Σ_rows ∂y·x̂
    One fused kernel each way where torch has them (aten's _fused_rms_norm; its backward on GPUs); saves x, g and r
    (one number per row) for backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, r = torch._fused_rms_norm(x, weight.shape, weight, eps)
        ctx.save_for_backward(x, weight, r)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        if dy.is_cuda:
            dx, dw = torch.ops.aten._fused_rms_norm_backward(dy, x, weight.shape, r, weight, [True, True])
            return dx, dw, None
        out_dtypes = x.dtype, weight.dtype
        if x.dtype != r.dtype:  # compute in r's dtype: x's, at least FP32
            x, dy, weight = x.to(r.dtype), dy.to(r.dtype), weight.to(r.dtype)
        x_hat = x * r
        g_hat = dy * weight
        dx = g_hat.addcmul(x_hat, (g_hat * x_hat).mean(-1, keepdim=True), value=-1).mul_(r)
        dw = (dy * x_hat).sum(tuple(range(dy.dim() - 1)))
        return dx.to(out_dtypes[0]), dw.to(out_dtypes[1]), None


class TorchRMSNorm(MegatronModule):
    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_unused):
        super().__init__(config=config)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return RMSNormFunction.apply(x, self.weight, self.eps)


class RMSNorm:
    """The RMSNorm module this build runs (see the module docstring); a class, as megatron's build_module
    calls classes (it returns plain functions uncalled)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-6, **kwargs):
        te_norm = transformer_engine_norm() if torch.cuda.is_available() else None
        if te_norm is not None:
            return te_norm(config, hidden_size, eps, **kwargs)
        return TorchRMSNorm(config, hidden_size, eps)
