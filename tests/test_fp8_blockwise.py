"""DeepSeek-V3 blockwise FP8 emulation: tile scales, error bounds, edge tiles, the three GEMMs, accumulation.

References: explicit per-tile loops, the E4M3 rounding bound, float64 matmuls of the dequantized
operands, and an FP32 dot product.
"""

import math

import pytest
import torch

from megatron_dsv3.fp8.blockwise import (
    FP8_MAX,
    dequantize_1x128,
    dequantize_128x128,
    fp8_blockwise_linear,
    limited_precision_matmul,
    quantize_1x128,
    quantize_128x128,
    truncate_mantissa,
)

QUANTIZERS = {  # name -> (quantize, dequantize, tile)
    "1x128": (quantize_1x128, dequantize_1x128, (1, 128)),
    "128x128": (quantize_128x128, dequantize_128x128, (128, 128)),
}


def wide_range(rows, cols, seed=0, spread=2.0):
    """Row and column magnitudes spread over decades, so that every tile gets a different scale."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.exp(spread * torch.randn(rows, 1, generator=g)) * torch.exp(
        spread * torch.randn(1, cols, generator=g))


def loop_quantize(x, tile, power_of_two):
    """One tile at a time: scale = amax/448 (1 for a zero tile), optionally 2^ceil(log2(scale))."""
    rows, cols = math.ceil(x.shape[0] / tile[0]), math.ceil(x.shape[1] / tile[1])
    fp8, scales = torch.empty(x.shape, dtype=torch.float8_e4m3fn), torch.empty(rows, cols)
    for i in range(rows):
        for j in range(cols):
            block = x[i * tile[0]:(i + 1) * tile[0], j * tile[1]:(j + 1) * tile[1]]
            amax = block.abs().max()
            scale = amax / 448 if amax > 0 else torch.tensor(1.0)
            if power_of_two:
                scale = torch.tensor(2.0 ** math.ceil(math.log2(scale.item())))
            scales[i, j] = scale
            fp8[i * tile[0]:(i + 1) * tile[0], j * tile[1]:(j + 1) * tile[1]] = (block / scale).to(torch.float8_e4m3fn)
    return fp8, scales


def per_element_scale(scales, tile, shape):
    return scales.repeat_interleave(tile[0], 0).repeat_interleave(tile[1], 1)[: shape[0], : shape[1]]


@pytest.mark.parametrize("power_of_two", [False, True])
@pytest.mark.parametrize("name,shape", [("1x128", (7, 300)), ("128x128", (300, 200)), ("128x128", (576, 200))])
def test_edge_tiles_get_their_own_scale(name, shape, power_of_two):
    quantize, _, tile = QUANTIZERS[name]
    x = wide_range(*shape)
    fp8, scales = quantize(x, power_of_two)
    ref_fp8, ref_scales = loop_quantize(x, tile, power_of_two)
    assert scales.shape == (math.ceil(shape[0] / tile[0]), math.ceil(shape[1] / tile[1]))
    assert torch.equal(scales, ref_scales)
    assert torch.equal(fp8.view(torch.uint8), ref_fp8.view(torch.uint8))


@pytest.mark.parametrize("power_of_two", [False, True])
@pytest.mark.parametrize("name", ["1x128", "128x128"])
def test_round_trip_error_bound(name, power_of_two):
    """E4M3 keeps 3 mantissa bits: a normal value v (|v| ≥ 2^-6) rounds with error ≤ 2^-4·|v|, a subnormal
    with error ≤ 2^-10 (half the 2^-9 spacing). Scaled back: |x̂ − x| ≤ max(2^-4·|x|, 2^-10·s) ≤ 2^-4·amax,
    plus FP32 rounding of x/s and q·s (2^-20·|x| covers it)."""
    quantize, dequantize, tile = QUANTIZERS[name]
    x = wide_range(300, 260, seed=1)
    fp8, scales = quantize(x, power_of_two)
    error = (dequantize(fp8, scales) - x).abs()
    assert_within_e4m3_bound(x, error, scales, tile)
    amax = per_element_scale(torch.stack([b.abs().max() for b in _tiles(x, tile)]).view(scales.shape), tile, x.shape)
    assert (error <= 2 ** -4 * amax).all()
    assert (error / x.abs()).max() > 2 ** -6  # it really was rounded to 3 mantissa bits


def assert_within_e4m3_bound(x, error, scales, tile):
    s = per_element_scale(scales, tile, x.shape)
    assert (error <= torch.maximum(2 ** -4 * x.abs(), 2 ** -10 * s) + 2 ** -20 * x.abs()).all()


def _tiles(x, tile):
    rows, cols = range(0, x.shape[0], tile[0]), range(0, x.shape[1], tile[1])
    return [x[i:i + tile[0], j:j + tile[1]] for i in rows for j in cols]


@pytest.mark.parametrize("power_of_two", [False, True])
@pytest.mark.parametrize("name", ["1x128", "128x128"])
def test_zero_huge_and_denormal_tiles_stay_finite(name, power_of_two):
    quantize, dequantize, tile = QUANTIZERS[name]
    x = torch.randn(256, 512)
    x[:128, :128] = 0
    x[:128, 128:256] = 1e30 * torch.randn(128, 128)
    x[:128, 256:384] = 1e-44 * torch.sign(torch.randn(128, 128))  # amax / 448 underflows FP32
    fp8, scales = quantize(x, power_of_two)
    back = dequantize(fp8, scales)
    assert torch.isfinite(fp8.float()).all() and torch.isfinite(scales).all() and torch.isfinite(back).all()
    assert (fp8.float().abs() <= FP8_MAX).all()
    assert torch.equal(back[:128, :128], torch.zeros(128, 128))
    assert torch.equal(scales[: 128 // tile[0], 0], torch.ones(128 // tile[0]))
    assert_within_e4m3_bound(x, (back - x).abs(), scales, tile)


@pytest.mark.parametrize("name", ["1x128", "128x128"])
def test_power_of_two_scales(name):
    quantize, _, tile = QUANTIZERS[name]
    x = wide_range(260, 300, seed=2)
    _, scales = quantize(x, True)
    mantissa, _ = torch.frexp(scales)
    assert (mantissa == 0.5).all()
    amax = torch.stack([b.abs().max() for b in _tiles(x, tile)]).view(scales.shape)
    ratio = amax / scales  # rounding the scale up keeps amax/scale in (224, 448]
    assert (ratio <= 448).all() and (ratio > 224).all()
    _, fp32_scales = quantize(x, False)
    assert not torch.equal(scales, fp32_scales)


def test_1x128_keeps_leading_dims_for_dispatch():
    x = torch.randn(2, 3, 300, dtype=torch.bfloat16)
    fp8, scales = quantize_1x128(x, power_of_two_scales=True)
    assert fp8.shape == x.shape and fp8.dtype == torch.float8_e4m3fn and scales.shape == (2, 3, 3)
    back = dequantize_1x128(fp8, scales, torch.bfloat16)
    assert back.dtype == torch.bfloat16
    assert torch.equal(back[1, 2], dequantize_1x128(*quantize_1x128(x[1, 2], True), torch.bfloat16))


def _qdq(quantize, dequantize, t, p2):
    return dequantize(*quantize(t, p2)).double()


@pytest.mark.parametrize("power_of_two", [False, True])
def test_linear_matches_float64_gemms_of_the_quantized_operands(power_of_two):
    torch.manual_seed(0)
    x = wide_range(300, 200, seed=3, spread=0.5).view(2, 150, 200).requires_grad_()  # 300 tokens: a partial token tile
    w = (0.02 * torch.randn(260, 200)).requires_grad_()
    b = torch.randn(260).requires_grad_()
    dy = wide_range(300, 260, seed=4, spread=0.5).view(2, 150, 260)
    y = fp8_blockwise_linear(x, w, b, power_of_two_scales=power_of_two)
    y.backward(dy)

    x2d, dy2d = x.detach().reshape(300, 200), dy.reshape(300, 260)
    w_q = _qdq(quantize_128x128, dequantize_128x128, w.detach(), power_of_two)
    act = lambda t: _qdq(quantize_1x128, dequantize_1x128, t, power_of_two)  # noqa: E731
    expected = {
        "y": act(x2d) @ w_q.t() + b.detach().double(),
        "dx": act(dy2d) @ w_q,
        "dW": act(dy2d.t()) @ act(x2d.t()).t(),  # wgrad: 1×128 tiles along the 300 tokens
        "db": dy2d.double().sum(0),
    }
    got = {"y": y.detach().reshape(300, 260), "dx": x.grad.reshape(300, 200), "dW": w.grad, "db": b.grad}
    for name, ref in expected.items():
        torch.testing.assert_close(got[name].double(), ref, rtol=0, atol=1e-6 * ref.abs().max().item(), msg=name)
    if not power_of_two:  # (power-of-two scales only change subnormals: q(v / 2^k)·2^k = q(v) for normal v)
        tiles_along_features = act(dy2d).t() @ act(x2d)  # the wrong wgrad direction must be told apart
        assert (tiles_along_features - expected["dW"]).abs().max() > 1e-3 * expected["dW"].abs().max()
    assert (got["dW"].double() - dy2d.double().t() @ x2d.double()).abs().max() > 1e-3 * expected["dW"].abs().max()


def test_tile_orientation_with_power_of_two_scales():
    """The scales training uses (fp8.linear: powers of two) hide a wrong tile orientation on ordinary data: for v in
    E4M3's normal range q(v / 2^k)·2^k = q(v), so a tile's scale only decides which of its values fall below that
    range (~2^-15·amax). Here the tokens of each 128-token tile span 10^6 (x ∝ s_t, dy ∝ 1/s_t: every token adds
    alike to dW), so tiles along the tokens lose their small entries to underflow and tiles along the features do not."""
    g = torch.Generator().manual_seed(5)
    s = torch.logspace(-3, 3, 128).repeat(2)[:, None]  # 256 tokens: two token tiles
    x = (torch.randn(256, 200, generator=g) * s).requires_grad_()
    w = (0.02 * torch.randn(160, 200, generator=g)).requires_grad_()
    dy = torch.randn(256, 160, generator=g) / s
    fp8_blockwise_linear(x, w, power_of_two_scales=True).backward(dy)
    y = fp8_blockwise_linear(x.detach(), w.detach(), power_of_two_scales=True)

    act = lambda t: _qdq(quantize_1x128, dequantize_1x128, t, True)  # noqa: E731
    along_tokens = lambda t: act(t.t()).t()  # noqa: E731  (128×1 tiles)
    w_q = _qdq(quantize_128x128, dequantize_128x128, w.detach(), True)
    x2d = x.detach()
    right = {"y": act(x2d) @ w_q.t(), "dx": act(dy) @ w_q, "dW": act(dy.t()) @ act(x2d.t()).t()}
    wrong = {"y": along_tokens(x2d) @ w_q.t(), "dx": along_tokens(dy) @ w_q, "dW": act(dy).t() @ act(x2d)}
    got = {"y": y, "dx": x.grad, "dW": w.grad}

    def row_error(a, ref):  # per output row, against that row's largest entry: tokens differ by 10^6
        return ((a.double() - ref).abs().amax(1) / ref.abs().amax(1)).max().item()

    for name in right:
        assert row_error(wrong[name], right[name]) > 1e-2, name  # the data tells the orientations apart ...
        assert row_error(got[name], right[name]) < 1e-5, name  # ... and the GEMMs use DeepSeek-V3's


@pytest.mark.parametrize("power_of_two", [False, True])
def test_expert_without_tokens(power_of_two):
    """A routed expert may receive no tokens in a step: wgrad's operands tiled along the tokens are then [·, 0]."""
    x = torch.empty(0, 200, requires_grad=True)
    w = torch.randn(160, 200, requires_grad=True)
    y = fp8_blockwise_linear(x, w, power_of_two_scales=power_of_two)
    y.sum().backward()
    assert y.shape == (0, 160) and x.grad.shape == (0, 200)
    assert torch.equal(w.grad, torch.zeros(160, 200))
    fp8, scales = quantize_1x128(torch.empty(160, 0), power_of_two)
    assert fp8.shape == (160, 0) and scales.shape == (160, 0)
    assert dequantize_1x128(fp8, scales).shape == (160, 0)


def test_linear_keeps_high_precision_dtypes():
    x = torch.randn(4, 130, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(3, 130, dtype=torch.bfloat16, requires_grad=True)
    y = fp8_blockwise_linear(x, w)
    y.sum().backward()
    assert y.dtype == x.grad.dtype == w.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="does not match weight"):
        fp8_blockwise_linear(x, w.t())


def test_truncate_mantissa_truncates_toward_zero():
    x = torch.tensor([1 + 2 ** -14 + 2 ** -16, -(1 + 2 ** -14 + 2 ** -16), 3.0])
    assert torch.equal(truncate_mantissa(x, 14), torch.tensor([1 + 2 ** -14, -(1 + 2 ** -14), 3.0]))
    assert torch.equal(truncate_mantissa(x, 23), x)


def test_promotion_every_128_elements_reduces_accumulation_error():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, 4096, generator=g), torch.randn(16, 4096, generator=g)
    exact = a.double() @ b.double().t()

    def error(y):
        return ((y.double() - exact).abs().max() / exact.abs().max()).item()

    fp32 = error(a @ b.t())
    promoted = error(limited_precision_matmul(a, b, 14, promote_interval=128))
    never = error(limited_precision_matmul(a, b, 14, promote_interval=None))
    assert fp32 < promoted and 5 * promoted < never
    assert error(limited_precision_matmul(a, b, 23, promote_interval=None)) < 1e-5
    with pytest.raises(ValueError, match="multiple of mma_k"):
        limited_precision_matmul(a[:, :100], b[:, :100])
