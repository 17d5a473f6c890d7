"""The spec's RMSNorm: torch's RMSNorm numerics, weight in the training dtype."""

import torch

from megatron_dsv3.models.presets import get_preset
from megatron_dsv3.models.rms_norm import RMSNorm, TorchRMSNorm
from megatron_dsv3.models.transformer_config import build_transformer_config


def test_matches_torch_rmsnorm_in_fp32():
    config = build_transformer_config(get_preset("tiny"))
    ours, reference = RMSNorm(config, 64, eps=1e-6), torch.nn.RMSNorm(64, eps=1e-6)
    assert isinstance(ours, TorchRMSNorm)  # no Transformer Engine on a CPU host
    with torch.no_grad():
        weight = torch.randn(64)
        ours.weight.copy_(weight)
        reference.weight.copy_(weight)
    x = torch.randn(5, 3, 64, requires_grad=True)
    torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=0)
    grads = torch.autograd.grad(ours(x).square().sum(), [x, ours.weight])
    reference_grads = torch.autograd.grad(reference(x).square().sum(), [x, reference.weight])
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_weight_in_training_dtype_under_bf16():
    config = build_transformer_config(get_preset("tiny"), bf16=True)
    norm = RMSNorm(config, 64)
    assert norm.weight.dtype == torch.bfloat16
    assert norm(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
