"""Block-scaled FP8 weights of the DeepSeek-V3 release (E4M3, one fp32 scale per 128x128 block).

W[i, j] = fp8[i, j] * scale_inv[i // b0, j // b1]; scale_inv = amax(|W| over the block) / 448.
Edge blocks of dims that are not multiples of the block (e.g. the 576 rows of kv_a_proj_with_mqa)
are partial and keep their own scale; the block size is given, never inferred from the shapes.
"""

import math
from typing import Tuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
DEFAULT_BLOCK = (128, 128)


def _scale_shape(shape, block) -> Tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def _to_blocks(x: torch.Tensor, block) -> torch.Tensor:
    """[M, N] -> [ceil(M/b0), b0, ceil(N/b1), b1], zero-padded at the bottom/right edges."""
    rows, cols = _scale_shape(x.shape, block)
    padded = torch.nn.functional.pad(x, (0, cols * block[1] - x.shape[1], 0, rows * block[0] - x.shape[0]))
    return padded.view(rows, block[0], cols, block[1])


def _from_blocks(blocks: torch.Tensor, shape) -> torch.Tensor:
    rows, b0, cols, b1 = blocks.shape
    return blocks.reshape(rows * b0, cols * b1)[: shape[0], : shape[1]]


def dequantize_fp8_block(
    weight_fp8: torch.Tensor, scale_inv: torch.Tensor, block=DEFAULT_BLOCK, dtype=torch.float32
) -> torch.Tensor:
    if weight_fp8.dim() != 2:
        raise ValueError(f"FP8 block dequantization needs a 2-D weight, got shape {tuple(weight_fp8.shape)}")
    expected = _scale_shape(weight_fp8.shape, block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"scale_inv has shape {tuple(scale_inv.shape)} but a {tuple(weight_fp8.shape)} weight with "
            f"{tuple(block)} blocks needs {expected}: check weight_block_size in quantization_config"
        )
    blocks = _to_blocks(weight_fp8.to(torch.float32), block) * scale_inv.to(torch.float32)[:, None, :, None]
    return _from_blocks(blocks, weight_fp8.shape).to(dtype)


def quantize_fp8_block(weight: torch.Tensor, block=DEFAULT_BLOCK) -> Tuple[torch.Tensor, torch.Tensor]:
    """(fp8 E4M3 weight, fp32 scale_inv) in the release format; an all-zero block gets scale_inv 1."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 block quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    blocks = _to_blocks(weight.to(torch.float32), block)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    return _from_blocks(scaled, weight.shape).to(FP8_DTYPE).contiguous(), scale_inv
