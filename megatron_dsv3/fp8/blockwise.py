"""DeepSeek-V3's fine-grained FP8 recipe, emulated in plain PyTorch (arXiv:2412.19437 §3.3).

This is an emulation of the numerics, not a speed path: tensors are really rounded to
torch.float8_e4m3fn with the recipe's scales, then dequantized and multiplied in FP32.

Tile-wise scaling (§3.3.2): every tile gets its own online scale from its max-abs,
    scale = amax / 448,   x ≈ fp8(clamp(x / scale, ±448)) · scale,
with activations and gradients in 1×128 tiles along the GEMM's reduction dimension and weights in
128×128 blocks. `scales` returned here are dequantization multipliers (FP32). Edge tiles of dims that
are not multiples of 128 are partial and keep their own scale. An all-zero tile gets scale 1; with
`power_of_two_scales` the scale is rounded up to a power of two (so |x| / scale ≤ 448 still holds).

The three GEMMs of a linear layer y = x·Wᵀ (x: [T, K] tokens × features, W: [N, K]):
    fprop  y  = Q₁ₓ₁₂₈(x)·Q₁₂₈ₓ₁₂₈(W)ᵀ    x tiles along K
    dgrad  dx = Q₁ₓ₁₂₈(dy)·Q₁₂₈ₓ₁₂₈(W)    dy tiles along N; the fprop's FP8 W (128×128 blocks fit Wᵀ too)
    wgrad  dW = Q₁ₓ₁₂₈(dyᵀ)·Q₁ₓ₁₂₈(xᵀ)ᵀ  tiles along the tokens T (x and dy in 128×1 tiles)
each accumulated in FP32 (DeepSeek promotes the tensor cores' partial sums to FP32 every 128
elements, §3.3.2; `limited_precision_matmul` models what happens without that). Like Transformer
Engine, the token-wise copy of x is quantized from the high-precision x, not re-quantized from FP8.
That FP8 copy (E4M3 + one FP32 scale per 128 tokens, ≈1.03 bytes per element) is all the linear saves of
its input for backward (§3.3.3 "low-precision storage"); the high-precision x is not kept. With
`fp8_activation_storage=False` (--no-fp8-activation-storage) the linear saves x itself and quantizes xᵀ in the
backward: the same numbers, x's bytes.
"""

import math
from typing import Optional, Sequence, Tuple

import torch

from megatron_dsv3.pipeline.weight_grad_store import weight_grad

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
TILE = 128
WGMMA_K = 32  # elements of K per Hopper FP8 WGMMA instruction; 4 of them make DeepSeek's N_C = 128


def _round_up_to_power_of_two(scale: torch.Tensor) -> torch.Tensor:
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa · 2^exponent, mantissa ∈ [0.5, 1)
    return torch.ldexp(torch.ones_like(scale), exponent - (mantissa == 0.5).int())


def _tiles_view(x: torch.Tensor, tile: Sequence[int]) -> torch.Tensor:
    """[R, C] -> [ceil(R/t0), t0, ceil(C/t1), t1], zero-padded at the bottom/right edges."""
    rows, cols = -(-x.shape[0] // tile[0]), -(-x.shape[1] // tile[1])
    padded = torch.nn.functional.pad(x, (0, cols * tile[1] - x.shape[1], 0, rows * tile[0] - x.shape[0]))
    return padded.view(rows, tile[0], cols, tile[1])


def _untile(tiles: torch.Tensor, shape) -> torch.Tensor:
    rows, t0, cols, t1 = tiles.shape
    return tiles.reshape(rows * t0, cols * t1)[: shape[0], : shape[1]]


def quantize_tiles(
    x: torch.Tensor, tile: Sequence[int], power_of_two_scales: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A 2-D tensor in `tile`-shaped tiles -> (E4M3 tensor of x's shape, FP32 scales [ceil(R/t0), ceil(C/t1)])."""
    if x.dim() != 2:
        raise ValueError(f"tile-wise FP8 quantization needs a 2-D tensor, got shape {tuple(x.shape)}")
    tiles = _tiles_view(x.float(), tile)
    amax = tiles.abs().amax(dim=(1, 3))
    # amax / 448 can underflow for denormal amax; the smallest normal FP32 keeps x / scale finite
    scale = torch.where(amax > 0, (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny), 1.0)
    if power_of_two_scales:
        scale = _round_up_to_power_of_two(scale)
    scaled = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    return _untile(scaled, x.shape).to(FP8_DTYPE), scale


def dequantize_tiles(
    x_fp8: torch.Tensor, scales: torch.Tensor, tile: Sequence[int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    expected = (-(-x_fp8.shape[0] // tile[0]), -(-x_fp8.shape[1] // tile[1]))
    if x_fp8.dim() != 2 or tuple(scales.shape) != expected:
        raise ValueError(
            f"scales of shape {tuple(scales.shape)} do not fit a {tuple(x_fp8.shape)} FP8 tensor in "
            f"{tuple(tile)} tiles (expected {expected})"
        )
    tiles = _tiles_view(x_fp8.float(), tile) * scales.float()[:, None, :, None]
    return _untile(tiles, x_fp8.shape).to(dtype)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [rows, K]; unlike reshape(-1, K) also for no elements (wgrad's [N, 0] dyᵀ of an expert without tokens)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def quantize_1x128(x: torch.Tensor, power_of_two_scales: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """[..., K] activations/gradients in 1×128 tiles along K -> (E4M3 [..., K], FP32 scales [..., ceil(K/128)]).

    Also the MoE dispatch format (§3.3.3): quantize before the dispatch all-to-all, send both
    tensors, `dequantize_1x128` after it; DeepSeek uses power-of-two scales there and keeps the
    combine in BF16.
    """
    x_fp8, scales = quantize_tiles(_rows(x), (1, TILE), power_of_two_scales)
    return x_fp8.reshape(x.shape), scales.reshape(*x.shape[:-1], scales.shape[-1])


def dequantize_1x128(x_fp8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    flat = dequantize_tiles(_rows(x_fp8), _rows(scales), (1, TILE), dtype)
    return flat.reshape(x_fp8.shape)


def quantize_128x128(weight: torch.Tensor, power_of_two_scales: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """[N, K] weight in 128×128 blocks -> (E4M3 [N, K], FP32 scales [ceil(N/128), ceil(K/128)])."""
    return quantize_tiles(weight, (TILE, TILE), power_of_two_scales)


def dequantize_128x128(w_fp8: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_tiles(w_fp8, scales, (TILE, TILE), dtype)


def fake_quantize_1x128(x: torch.Tensor, power_of_two_scales: bool = False) -> torch.Tensor:
    """FP32 values of `x` after a round trip through 1×128-tile FP8."""
    return dequantize_1x128(*quantize_1x128(x, power_of_two_scales))


def _fake_quantize_128x128(weight: torch.Tensor, power_of_two_scales: bool) -> torch.Tensor:
    """FP32 values of `weight` after a round trip through 128×128-block FP8."""
    return dequantize_128x128(*quantize_128x128(weight, power_of_two_scales))


class _Fp8BlockwiseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, power_of_two_scales, fp8_activation_storage):
        x2d = x.reshape(-1, x.shape[-1])
        w_q = _fake_quantize_128x128(weight, power_of_two_scales)
        y = fake_quantize_1x128(x2d, power_of_two_scales) @ w_q.t()  # fprop, FP32 accumulation
        if bias is not None:
            y = y + bias.float()
        # the wgrad's operand, cached in FP8 (§3.3.3): xᵀ in 1×128 tiles along the tokens, 1 byte per element.
        # Of the weight only the master copy is saved: dgrad re-quantizes it (the same blocks, as autograd
        # checks that it has not changed), so no FP8 copy of it stays alive per micro-batch in flight.
        if fp8_activation_storage:
            ctx.save_for_backward(*quantize_1x128(x2d.t(), power_of_two_scales), weight)
        else:
            ctx.save_for_backward(x2d, weight)
        ctx.power_of_two_scales, ctx.has_bias = power_of_two_scales, bias is not None
        ctx.fp8_activation_storage = fp8_activation_storage
        ctx.dtypes = x.dtype, weight.dtype
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        *cached, weight = ctx.saved_tensors
        p2 = ctx.power_of_two_scales
        xt_fp8, xt_scales = cached if ctx.fp8_activation_storage else quantize_1x128(cached[0].t(), p2)
        dy2d = dy.reshape(-1, dy.shape[-1])
        dx = dw = dbias = None
        if ctx.needs_input_grad[0]:
            dx = fake_quantize_1x128(dy2d, p2) @ _fake_quantize_128x128(weight, p2)  # dgrad
            dx = dx.to(ctx.dtypes[0]).view(*dy.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:  # wgrad over tokens; a DualPipe B op defers it to its W
            w_dtype = ctx.dtypes[1]
            dw = weight_grad(weight, lambda: (fake_quantize_1x128(dy2d.t(), p2)
                                              @ dequantize_1x128(xt_fp8, xt_scales).t()).to(w_dtype),
                             holds=(dy2d, xt_fp8, xt_scales))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy2d.float().sum(0).to(ctx.dtypes[1])
        return dx, dw, dbias, None, None


def fp8_blockwise_linear(
    input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, power_of_two_scales: bool = False,
    fp8_activation_storage: bool = True,
) -> torch.Tensor:
    """y = x·Wᵀ + b with DeepSeek-V3's blockwise FP8 fprop/dgrad/wgrad (emulated numerics, not a speed path).

    `input` is [..., K], `weight` [N, K] (the high-precision master copy, quantized anew on every
    call); outputs and gradients come back in the dtypes of `input` and `weight`. `fp8_activation_storage`: what
    is saved for the wgrad, the FP8 xᵀ (True) or the high-precision x (False).
    """
    if weight.dim() != 2 or input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"fp8_blockwise_linear: input {tuple(input.shape)} does not match weight {tuple(weight.shape)}"
        )
    return _Fp8BlockwiseLinear.apply(input, weight, bias, power_of_two_scales, fp8_activation_storage)


def truncate_mantissa(x: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """Float32 `x` truncated (toward zero) to `mantissa_bits` of its 23 explicit mantissa bits."""
    keep = -(1 << (23 - mantissa_bits))  # ...1110000: clears the low 23 - mantissa_bits bits
    return (x.float().contiguous().view(torch.int32) & keep).view(torch.float32)


def limited_precision_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    mantissa_bits: int = 14,
    promote_interval: Optional[int] = TILE,
    mma_k: int = WGMMA_K,
) -> torch.Tensor:
    """a·bᵀ (a: [M, K], b: [N, K]) with a tensor-core-like accumulator of ~`mantissa_bits` bits (§3.3.2).

    Each MMA step adds the FP32 dot products of `mma_k` elements to the running partial sum, which is
    then truncated to `mantissa_bits`. With `promote_interval` (a multiple of `mma_k`; DeepSeek: 128)
    the partial sum is added to an FP32 accumulator and restarted every that many elements of K
    ("increasing accumulation precision"); with None it is never promoted. Numerics study only.
    `a` and `b` are the dequantized FP8 operands: the kernel applies the tiles' scales at promotion,
    which with 128-aligned tiles gives the same sums up to FP32 rounding.
    """
    k = a.shape[1]
    if b.shape[1] != k or k % mma_k or (promote_interval and promote_interval % mma_k):
        raise ValueError(f"limited_precision_matmul: K={k} of a {tuple(a.shape)}, b {tuple(b.shape)} must be a "
                         f"multiple of mma_k={mma_k}, and promote_interval={promote_interval} too")
    steps = k // mma_k
    a_steps, b_steps = a.float().reshape(a.shape[0], steps, mma_k), b.float().reshape(b.shape[0], steps, mma_k)
    partials = torch.einsum("msk,nsk->smn", a_steps, b_steps)  # each MMA step's dot products, in FP32
    steps_per_promotion = promote_interval // mma_k if promote_interval else steps
    total = partials.new_zeros(partials.shape[1:])
    running = torch.zeros_like(total)
    for step in range(steps):
        running = truncate_mantissa(running + partials[step], mantissa_bits)
        if (step + 1) % steps_per_promotion == 0:
            total, running = total + running, torch.zeros_like(running)
    return total + running
