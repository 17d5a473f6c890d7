"""The spec's RMSNorm: torch's RMSNorm numerics, weight in the training dtype."""

import torch

from megatron_dsv3.models.presets import get_preset
from megatron_dsv3.models.rms_norm import RMSNorm, RMSNormFunction, TorchRMSNorm
from megatron_dsv3.models.transformer_config import build_transformer_config


def _pair(dtype):
    config = build_transformer_config(get_preset("tiny"))
    ours, reference = RMSNorm(config, 64, eps=1e-6), torch.nn.RMSNorm(64, eps=1e-6)
    assert isinstance(ours, TorchRMSNorm)  # no Transformer Engine on a CPU host
    ours.to(dtype), reference.to(dtype)
    with torch.no_grad():
        weight = torch.randn(64, dtype=dtype)
        ours.weight.copy_(weight)
        reference.weight.copy_(weight)
    return ours, reference


def test_matches_torch_rmsnorm():
    """The forward is torch's bit for bit; the one-node backward agrees with torch's autograd of it to the
    rounding of the dtype (fp64: 1e-12)."""
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        ours, reference = _pair(dtype)
        x = torch.randn(5, 3, 64, dtype=dtype, requires_grad=True) * 3
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)
        grad_out = torch.randn(5, 3, 64, dtype=dtype)
        grads = torch.autograd.grad(ours(x), [x, ours.weight], grad_out)
        reference_grads = torch.autograd.grad(reference(x), [x, reference.weight], grad_out)
        for got, want in zip(grads, reference_grads):
            torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
    assert torch.autograd.gradcheck(lambda x, w: RMSNormFunction.apply(x, w, 1e-6),
                                    (torch.randn(3, 8, dtype=torch.float64, requires_grad=True),
                                     torch.randn(8, dtype=torch.float64, requires_grad=True)))


def test_input_gradient_is_one_term_so_a_residual_adds_exactly():
    """x feeds the norm and the residual: ∂x = residual + norm's term, exact in either order (what makes
    recomputing the norm bit-equal); torch's decomposed norm adds several terms in its own order."""
    ours, _ = _pair(torch.float32)
    x = torch.randn(4, 64, requires_grad=True)
    y = ours(x) + x
    assert len(y.grad_fn.next_functions) == 2
    norm_node = y.grad_fn.next_functions[0][0]
    assert type(norm_node).__name__ == "RMSNormFunctionBackward"


def test_weight_in_training_dtype_under_bf16():
    config = build_transformer_config(get_preset("tiny"), bf16=True)
    norm = RMSNorm(config, 64)
    assert norm.weight.dtype == torch.bfloat16
    assert norm(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
