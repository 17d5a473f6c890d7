"""FP8 GEMM error: per-tensor vs DeepSeek-V3 blockwise scaling, and limited-precision accumulation.

    python benchmarks/fp8_numerics.py [--m 256 --n 256 --k 4096 --seeds 3]

y = x·Wᵀ for random activations x [M, K] and weights W [N, K], against exact FP64 products.
Columns (emulated numerics, megatron_dsv3.fp8.blockwise):
    per-tensor    one E4M3 scale per tensor, FP32 accumulation
    blockwise     1×128 tiles for x, 128×128 blocks for W, FP32 accumulation
    bw+14b+promo  blockwise, ~14-bit tensor-core accumulator promoted to FP32 every 128 elements (§3.3.2)
    bw+14b        blockwise, ~14-bit accumulator over the whole K (never promoted)
Errors are |y − y_ref| / rms(y_ref's row) per output element (relative to that token's output size):
max and mean over the M×N outputs. The first table's y_ref is the exact product of the unquantized
inputs (quantization + accumulation error); the second's is the exact product of the same FP8-quantized
inputs (accumulation error alone). Inputs: "gaussian"; "outliers", 0.1% of the activations ×100;
"token-scale", each token's activations scaled by 10^U(-4, 0) (tokens of very different magnitude).
"""

import argparse
import time

import torch

from megatron_dsv3.fp8.blockwise import (
    dequantize_128x128,
    dequantize_tiles,
    fake_quantize_1x128,
    limited_precision_matmul,
    quantize_128x128,
    quantize_tiles,
)


KINDS = ("gaussian", "outliers", "token-scale")


def per_tensor(t: torch.Tensor) -> torch.Tensor:
    return dequantize_tiles(*quantize_tiles(t, t.shape), t.shape)  # one tile = the whole tensor


def inputs(kind: str, seed: int, m: int, n: int, k: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.02
    if kind == "outliers":
        x = torch.where(torch.rand(m, k, generator=g) < 1e-3, x * 100, x)
    elif kind == "token-scale":
        x = x * 10 ** (-4 * torch.rand(m, 1, generator=g))
    return x, w


def error_range(y: torch.Tensor, reference: torch.Tensor, rms=None):
    """max and mean over the outputs of |y - reference| / rms, rms defaulting to that of each row of `reference`."""
    if rms is None:
        rms = reference.double().pow(2).mean(dim=1, keepdim=True).sqrt()
    error = (y.double() - reference.double()).abs() / rms
    return error.max().item(), error.mean().item()


def cell(pair) -> str:
    """A table cell: "max / mean", or n/a for None."""
    return "n/a".rjust(21) if pair is None else f"{pair[0]:>10.2e} / {pair[1]:.2e}"


def relative_errors(y: torch.Tensor, reference: torch.Tensor) -> str:
    return cell(error_range(y, reference))


def print_table(title: str, rows: dict) -> None:
    names = next(iter(rows.values())).keys()
    header = f"{'inputs':<12} {'seed':>4}  " + "  ".join(f"{name:>21}" for name in names)
    print(f"\n{title}\n{header}\n{'-' * len(header)}")
    for (kind, seed), cells in rows.items():
        print(f"{kind:<12} {seed:>4}  " + "  ".join(cells.values()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=256)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--mantissa-bits", type=int, default=14, help="accumulator mantissa bits of the tensor core")
    args = parser.parse_args()
    torch.set_num_threads(1)

    start = time.time()
    total, accumulation = {}, {}
    for kind in KINDS:
        for seed in range(args.seeds):
            x, w = inputs(kind, seed, args.m, args.n, args.k)
            x_q, w_q = fake_quantize_1x128(x), dequantize_128x128(*quantize_128x128(w))
            y = {
                "per-tensor": per_tensor(x) @ per_tensor(w).t(),
                "blockwise": x_q @ w_q.t(),
                "bw+14b+promo": limited_precision_matmul(x_q, w_q, args.mantissa_bits, promote_interval=128),
                "bw+14b": limited_precision_matmul(x_q, w_q, args.mantissa_bits, promote_interval=None),
            }
            exact, exact_of_quantized = x.double() @ w.double().t(), x_q.double() @ w_q.double().t()
            total[kind, seed] = {name: relative_errors(v, exact) for name, v in y.items()}
            accumulation[kind, seed] = {
                name: relative_errors(v, exact_of_quantized) for name, v in y.items() if name != "per-tensor"
            }
    print(f"y = x·Wᵀ, M={args.m} N={args.n} K={args.k}; cells: max / mean of |y - y_ref| / rms(row of y_ref)")
    print_table("vs the exact product of the unquantized inputs (FP64)", total)
    print_table("accumulation alone: vs the exact product of the blockwise-quantized inputs (FP64)", accumulation)
    print(f"\n({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
