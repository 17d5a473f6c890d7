"""FP8 storage of the emulated FP8 linears' cached inputs (DeepSeek-V3 §3.3.3): what a linear saves for backward
is xᵀ quantized in 1×128 tiles along the tokens (E4M3, 1 byte per element, plus one FP32 scale per tile), not the
high-precision x; outputs and gradients stay bit-equal to the recipe computed from the high-precision x.

References: the recipe's GEMMs written out with quantize/dequantize (the implementation that saved x itself),
torch's own linear for the high-precision saved bytes, and the element counts of the tensors."""

import math

import pytest
import torch

from megatron_dsv3.fp8.blockwise import (
    FP8_DTYPE,
    dequantize_1x128,
    dequantize_128x128,
    fp8_blockwise_linear,
    quantize_1x128,
    quantize_128x128,
)
from megatron_dsv3.fp8.linear import Fp8EmulatedMatmul
from megatron_dsv3.pipeline.recording import SavedActivationMeter
from megatron_dsv3.pipeline.weight_grad_store import WeightGradStore


def recipe_from_high_precision(x, w, b, dy, p2):
    """y, dx, dW of the blockwise recipe from the high-precision x (fprop x in 1×128 tiles along K, wgrad xᵀ and dyᵀ
    in 1×128 tiles along the tokens, W in 128×128 blocks), in the dtypes the linear returns."""
    qdq = lambda t: dequantize_1x128(*quantize_1x128(t, p2))  # noqa: E731
    w_q = dequantize_128x128(*quantize_128x128(w, p2))
    x2d, dy2d = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    y = qdq(x2d) @ w_q.t() + (b.float() if b is not None else 0)
    dx = qdq(dy2d) @ w_q
    dw = qdq(dy2d.t()) @ qdq(x2d.t()).t()
    return y.to(x.dtype).view(*x.shape[:-1], -1), dx.to(x.dtype).view(x.shape), dw.to(w.dtype)


def operands(tokens, k, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(tokens, 1, generator=g))  # tokens of different magnitude: tiles differ
    x = (torch.randn(tokens, k, generator=g) * scale).to(dtype).view(2, tokens // 2, k)
    w = (0.05 * torch.randn(n, k, generator=g)).to(dtype)
    return x, w, torch.randn(n, generator=g).to(dtype), torch.randn(2, tokens // 2, n, generator=g).to(dtype)


@pytest.mark.parametrize("split_backward", [False, True], ids=["full_backward", "b_then_w"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p2", [False, True], ids=["amax_scales", "power_of_two_scales"])
def test_gradients_bit_equal_to_the_recipe_from_high_precision(p2, dtype, split_backward):
    x, w, b, dy = operands(300, 200, 260, dtype)  # 300 tokens and 200 features: partial tiles both ways
    xl, wl, bl = (t.clone().requires_grad_() for t in (x, w, b))
    y = fp8_blockwise_linear(xl, wl, bl, power_of_two_scales=p2)
    if split_backward:  # a DualPipe B op, then its W: the deferred wgrad reads the FP8 copy
        store = WeightGradStore()
        with store.input_grad_only("b"):
            y.backward(dy)
        assert wl.grad is None
        store.flush("b")
    else:
        y.backward(dy)
    y_ref, dx_ref, dw_ref = recipe_from_high_precision(x, w, b, dy, p2)
    assert torch.equal(y, y_ref) and torch.equal(xl.grad, dx_ref) and torch.equal(wl.grad, dw_ref)
    assert torch.equal(bl.grad, dy.reshape(-1, 260).float().sum(0).to(dtype))


def saved_tensors(run):
    """(the tensors autograd packs while `run()` builds its graph, its output) — the packed ones kept alive."""
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return packed, out


def test_saves_fp8_x_transposed_and_its_scales_only():
    x, w, _, _ = operands(512, 256, 192, torch.float32)
    x.requires_grad_()
    w = torch.nn.Parameter(w)
    packed, _ = saved_tensors(lambda: fp8_blockwise_linear(x, w, power_of_two_scales=True))
    activations = [t for t in packed if t is not w]
    assert [(t.dtype, tuple(t.shape)) for t in activations] == [(FP8_DTYPE, (256, 512)), (torch.float32, (256, 4))]
    assert any(t is w for t in packed)  # the master weight: re-quantized in dgrad, no FP8 copy kept
    fp8, scales = quantize_1x128(x.detach().reshape(512, 256).t(), True)
    assert torch.equal(activations[0].view(torch.uint8), fp8.view(torch.uint8))
    assert torch.equal(activations[1], scales)


@pytest.mark.parametrize("dtype, ratio", [(torch.float32, 3.8), (torch.bfloat16, 1.9)])
def test_saved_bytes_drop_against_high_precision(dtype, ratio):
    """Saved-for-backward bytes (SavedActivationMeter: parameters excluded) of one linear, [T, K] input: torch's
    linear keeps x (T·K·element size); the FP8 linear T·K + 4·K·ceil(T/128) (≥ 3.8× less than FP32)."""
    tokens, k, n = 1024, 256, 384
    x, w, _, _ = operands(tokens, k, n, dtype)
    x.requires_grad_()
    w = torch.nn.Parameter(w)
    measured = {}
    for name, linear in (("high_precision", torch.nn.functional.linear),
                         ("fp8", lambda a, b: fp8_blockwise_linear(a, b, power_of_two_scales=True))):
        with SavedActivationMeter([w]) as meter:
            y = linear(x, w)
        measured[name] = meter.live
        y.sum().backward()
        assert meter.live == 0  # all released after the backward
    assert measured["high_precision"] == tokens * k * x.element_size()
    assert measured["fp8"] == tokens * k + k * math.ceil(tokens / 128) * 4
    assert measured["high_precision"] / measured["fp8"] > ratio
    print(f"{dtype}: saved bytes {measured['high_precision']} -> {measured['fp8']} "
          f"({measured['high_precision'] / measured['fp8']:.2f}x)")


def test_megatron_fp8_layers_save_fp8():
    """The layers the spec builds (fp8.linear's matmul, as in megatron's Column/RowParallelLinear) save the same."""
    x, w, b, _ = operands(256, 200, 130, torch.float32)
    w = torch.nn.Parameter(w)
    packed, _ = saved_tensors(lambda: Fp8EmulatedMatmul()._forward_impl(
        input=x.requires_grad_(), weight=w, bias=b, allreduce_dgrad=False, sequence_parallel=False, tp_group=None))
    big = [t for t in packed if t is not w and t.numel() >= x.numel()]
    assert big and all(t.dtype == FP8_DTYPE for t in big)
