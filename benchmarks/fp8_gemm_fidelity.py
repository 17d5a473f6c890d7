"""Our emulated DeepSeek-V3 blockwise FP8 GEMM vs real FP8 GEMM kernels on the same inputs.

    python benchmarks/fp8_gemm_fidelity.py [--device cuda] [--m 256 --n 512 --k 4096 --seeds 2]

y = x·Wᵀ for activations x [M, K] and weights W [N, K] drawn as in benchmarks/fp8_numerics.py ("gaussian",
"outliers", "token-scale") on the CPU, rounded to BF16 (what Transformer Engine quantizes from), then moved to
--device. The emulation (megatron_dsv3.fp8.blockwise, always on the CPU) quantizes x in 1×128 tiles and W in
128×128 blocks and multiplies the dequantized operands with
    FP32 acc     FP32 accumulation
    14b+promo    Hopper's ~14-bit tensor-core accumulator promoted to FP32 every 128 elements (limited_precision_matmul)
Real kernels, each where it runs (otherwise its cells say n/a and one line below the tables says why):
    torch blockwise   torch.nn.functional.scaled_mm, BlockWise1x128 × BlockWise128x128 (cuBLAS, CUDA SM 9.0), on the
                      emulation's FP8 operands and scales; FP32 output
    TE blockwise      transformer_engine.pytorch.Linear under Float8BlockScaling, quantizing x and W itself; BF16
                      output. Compared with an emulation using TE's scale rule: powers of two unless
                      NVTE_FP8_BLOCK_SCALING_FP32_SCALES=1
    torch tensorwise  scaled_mm with one scale per tensor (runs on the CPU too) vs the emulated per-tensor GEMM on the
                      same E4M3 operands and scales (fp8_numerics' per-tensor): the scale convention, decode multipliers
Cells: |y - y_ref| / rms(row of y_exact) per output element, max / mean over the M×N outputs, y_exact being the
exact (FP64) product of the unquantized inputs. First table: y_ref = y_exact, the error of each GEMM. Second:
y = the emulation rounded to the kernel's output dtype, y_ref = the kernel's output. A kernel whose differences
are smaller against "FP32 acc" than against "14b+promo" accumulates more precisely than the 14-bit model.
"""

import argparse
import importlib.util
import sys
import time

import torch
import torch.nn.functional as F

from fp8_numerics import KINDS, cell, error_range, inputs, print_table
from megatron_dsv3.fp8.blockwise import (
    TILE,
    dequantize_1x128,
    dequantize_128x128,
    dequantize_tiles,
    limited_precision_matmul,
    quantize_1x128,
    quantize_128x128,
    quantize_tiles,
)

TORCH_BW, TE_BW, TORCH_TW = "torch blockwise", "TE blockwise", "torch tensorwise"


def emulate(x: torch.Tensor, w: torch.Tensor, power_of_two_scales: bool = False):
    """Blockwise FP8 x·Wᵀ: ((x_fp8, x_scales), (w_fp8, w_scales), {accumulation: y}); scales are decode multipliers."""
    xq, wq = quantize_1x128(x, power_of_two_scales), quantize_128x128(w, power_of_two_scales)
    a, b = dequantize_1x128(*xq), dequantize_128x128(*wq)
    return xq, wq, {"FP32 acc": a @ b.t(), "14b+promo": limited_precision_matmul(a, b, 14, promote_interval=TILE)}


def blockwise_scale_layout(x_scales: torch.Tensor, w_scales: torch.Tensor):
    """Our scales, x [M, K/128] and W [N/128, K/128], as scaled_mm's BlockWise1x128 × BlockWise128x128 takes them:
    scale_a [M, K/128] with strides (1, M); scale_b [L4, N/128] with strides (1, L4), L4 = round_up(K/128, 4)
    (W's K blocks padded with ones)."""
    return x_scales.t().contiguous().t(), F.pad(w_scales, (0, -w_scales.shape[1] % 4), value=1.0).t()


def torch_blockwise(xq, wq, device):
    (x_fp8, x_scales), (w_fp8, w_scales) = [[t.to(device) for t in q] for q in (xq, wq)]
    scale_a, scale_b = blockwise_scale_layout(x_scales, w_scales)
    return F.scaled_mm(x_fp8, w_fp8.t(), scale_a, F.ScalingType.BlockWise1x128, scale_b,
                       F.ScalingType.BlockWise128x128, output_dtype=torch.float32).cpu()


def torch_tensorwise(xq, wq, device):
    (x_fp8, x_scale), (w_fp8, w_scale) = [[t.to(device) for t in q] for q in (xq, wq)]
    return F.scaled_mm(x_fp8, w_fp8.t(), x_scale.reshape(()), F.ScalingType.TensorWise, w_scale.reshape(()),
                       F.ScalingType.TensorWise, output_dtype=torch.float32).cpu()


def te_blockwise(x, w, device):
    """(y, whether TE's scales are powers of two) of a TE Linear holding W under Float8BlockScaling."""
    import transformer_engine.pytorch as te
    from transformer_engine.common.recipe import Float8BlockScaling

    recipe = Float8BlockScaling()
    linear = te.Linear(w.shape[1], w.shape[0], bias=False, params_dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        linear.weight.copy_(w)
        with te.fp8_autocast(enabled=True, fp8_recipe=recipe):
            y = linear(x.to(device, torch.bfloat16))
    return y.cpu(), recipe.fp8_quant_fwd_inp.power_2_scale


def unavailable(device: torch.device) -> dict:
    """{kernel: why it cannot run on `device`} for the kernels known not to before trying them."""
    if device.type == "cpu":
        capability, where = None, "cpu"
    else:
        capability = torch.cuda.get_device_capability(device)
        where = f"{torch.cuda.get_device_name(device)}, SM {capability[0]}.{capability[1]}"
    reasons = {}
    if not (hasattr(F, "scaled_mm") and hasattr(F, "ScalingType")):
        reasons[TORCH_BW] = reasons[TORCH_TW] = f"torch {torch.__version__} has no torch.nn.functional.scaled_mm"
    elif capability != (9, 0):
        reasons[TORCH_BW] = f"needs CUDA SM 9.0 (this device: {where})"
    if importlib.util.find_spec("transformer_engine") is None:
        reasons[TE_BW] = "transformer_engine not installed"
    elif device.type != "cuda":
        reasons[TE_BW] = f"needs CUDA (this device: {where})"
    return reasons


def attempt(reasons: dict, kernel: str, fn, *args):
    """fn(*args), or None if `kernel` has a reason in `reasons`; its first failure becomes that reason."""
    if kernel in reasons:
        return None
    try:
        return fn(*args)
    except Exception as error:  # any failure of a real kernel is reported, not raised
        reasons[kernel] = f"{type(error).__name__}: {next(iter(str(error).splitlines()), '')}"
        return None


def multiple_of_128(text: str) -> int:
    value = int(text)
    if value <= 0 or value % TILE:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of {TILE} (the FP8 blocks), got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the real kernels run (the emulation runs on the CPU)")
    parser.add_argument("--m", type=int, default=256, help="tokens")
    parser.add_argument("--n", type=multiple_of_128, default=512)
    parser.add_argument("--k", type=multiple_of_128, default=4096)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args(argv)
    if args.m < 1 or args.seeds < 1:
        parser.error("--m and --seeds must be ≥ 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device is visible (torch.cuda.is_available() is False)", file=sys.stderr)
        raise SystemExit(2)

    start, device = time.time(), torch.device(args.device)
    reasons = unavailable(device)
    total, fidelity, means = {}, {}, {}
    for kind in KINDS:
        for seed in range(args.seeds):
            x, w = (t.bfloat16().float() for t in inputs(kind, seed, args.m, args.n, args.k))
            exact = x.double() @ w.double().t()
            rms = exact.pow(2).mean(dim=1, keepdim=True).sqrt()
            xq, wq, emulated = emulate(x, w)
            torch_bw = attempt(reasons, TORCH_BW, torch_blockwise, xq, wq, device)
            te_bw, te_emulated = attempt(reasons, TE_BW, te_blockwise, x, w, device), None
            if te_bw is not None:
                te_bw, power_of_two_scales = te_bw
                te_emulated = emulate(x, w, power_of_two_scales)[2] if power_of_two_scales else emulated
            tq = [quantize_tiles(t, t.shape) for t in (x, w)]  # one tile = the whole tensor
            per_tensor = [dequantize_tiles(*q, t.shape) for q, t in zip(tq, (x, w))]
            torch_tw = attempt(reasons, TORCH_TW, torch_tensorwise, *tq, device)

            total[kind, seed] = {f"emulated {acc}": cell(error_range(y, exact, rms)) for acc, y in emulated.items()}
            total[kind, seed] |= {name: cell(None if y is None else error_range(y, exact, rms))
                                  for name, y in ((TORCH_BW, torch_bw), (TE_BW, te_bw))}
            tw = None if torch_tw is None else error_range(per_tensor[0] @ per_tensor[1].t(), torch_tw, rms)
            fidelity[kind, seed] = {"tensorwise": cell(tw)}
            for kernel, label, y_real, emulation in (
                (TORCH_BW, "torch bw", torch_bw, emulated), (TE_BW, "TE", te_bw, te_emulated)
            ):
                for acc in ("FP32 acc", "14b+promo"):
                    pair = None if y_real is None else error_range(emulation[acc].to(y_real.dtype), y_real, rms)
                    fidelity[kind, seed][f"{label} vs {acc}"] = cell(pair)
                    if pair:
                        means.setdefault(kernel, {}).setdefault(acc, []).append(pair[1])

    print(f"y = x·Wᵀ, M={args.m} N={args.n} K={args.k}, real kernels on {args.device}; "
          f"cells: max / mean of |y - y_ref| / rms(row of y_exact)")
    print_table("error vs the exact product of the unquantized inputs (y_ref = y_exact, FP64)", total)
    print_table("emulated vs real kernel (y = emulation in the kernel's output dtype, y_ref = the kernel's output)",
                fidelity)
    print()
    for kernel, reason in reasons.items():
        print(f"n/a  {kernel}: {reason}")
    for kernel, acc_means in means.items():
        fp32, promoted = (sum(v) / len(v) for v in acc_means.values())
        closer = "FP32-accumulated" if fp32 < promoted else "14-bit-promoted"
        print(f"{kernel} is closer to the {closer} emulation: mean difference {fp32:.2e} (FP32 acc) vs "
              f"{promoted:.2e} (14b+promo)")
    print(f"({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
