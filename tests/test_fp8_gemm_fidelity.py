"""benchmarks/fp8_gemm_fidelity.py on the CPU: the per-tensor emulation matches torch's FP8 scaled_mm, the blockwise
kernels are n/a with their reason, and the scale layout for scaled_mm's BlockWise1x128 × BlockWise128x128 passes
torch's own shape/stride checks (its meta kernel), which reject the layouts next to it."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from megatron_dsv3.fp8.blockwise import FP8_DTYPE, dequantize_tiles, quantize_tiles

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import fp8_gemm_fidelity as fidelity  # noqa: E402
from fp8_numerics import inputs  # noqa: E402

TENSORWISE_BOUND = 1e-6  # achieved on the CPU: 0 (the same FP32 products); a wrong scale or E4M3 value: ≥ 1e-2


def table_rows(output: str, column: str) -> list:
    """The data rows (split on whitespace) of the printed table whose header names `column`."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if column in line) + 2  # past the header and its rule
    return [line.split() for line in lines[start:start + len(fidelity.KINDS)]]


def test_cpu_run():
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "fp8_gemm_fidelity.py"), "--device", "cpu",
         "--m", "64", "--n", "256", "--k", "512", "--seeds", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "TORCHDYNAMO_DISABLE": "1"},
    )
    assert result.returncode == 0, result.stderr
    fidelity_rows = table_rows(result.stdout, "tensorwise")
    assert [row[0] for row in fidelity_rows] == list(fidelity.KINDS)
    for row in fidelity_rows:  # kind seed max / mean, then four n/a cells
        assert float(row[2]) <= TENSORWISE_BOUND and row[5:] == ["n/a"] * 4, row
    for row in table_rows(result.stdout, "emulated FP32 acc"):
        assert 0.01 < float(row[4]) < 0.05 and row[8:] == ["n/a"] * 2, row  # mean error of blockwise E4M3 ~3%
    assert "n/a  torch blockwise: needs CUDA SM 9.0 (this device: cpu)" in result.stdout.splitlines()
    assert sum(line.startswith("n/a  TE blockwise: ") for line in result.stdout.splitlines()) == 1


def test_tensorwise_bound_catches_a_wrong_scale_or_rounding():
    x, w = inputs("gaussian", 0, 64, 256, 512)
    rms = (x.double() @ w.double().t()).pow(2).mean(dim=1, keepdim=True).sqrt()
    xq, wq = quantize_tiles(x, x.shape), quantize_tiles(w, w.shape)
    real = fidelity.torch_tensorwise(xq, wq, torch.device("cpu"))
    right = dequantize_tiles(*xq, x.shape) @ dequantize_tiles(*wq, w.shape).t()
    divided = (xq[0].float() / xq[1]) @ (wq[0].float() / wq[1]).t()  # scales taken as divisors
    unrounded = x @ dequantize_tiles(*wq, w.shape).t()  # x not rounded to E4M3
    assert fidelity.error_range(right, real, rms)[0] <= TENSORWISE_BOUND
    assert fidelity.error_range(divided, real, rms)[0] > 1e-2 and fidelity.error_range(unrounded, real, rms)[0] > 1e-2


@pytest.mark.parametrize("k", [512, 640])  # K/128 = 4 blocks, and 5 padded to L4 = 8
def test_blockwise_scale_layout_passes_torchs_checks(k):
    m, n, kb = 64, 256, k // 128
    x_scales, w_scales = torch.rand(m, kb), torch.rand(n // 128, kb)
    scale_a, scale_b = fidelity.blockwise_scale_layout(x_scales, w_scales)
    l4 = -(-kb // 4) * 4
    assert scale_a.shape == (m, kb) and scale_a.stride() == (1, m) and torch.equal(scale_a, x_scales)
    assert scale_b.shape == (l4, n // 128) and scale_b.stride() == (1, l4) and torch.equal(scale_b[:kb].t(), w_scales)
    assert torch.all(scale_b[kb:] == 1)

    def scaled_mm(sa, sb):
        a = torch.empty(m, k, dtype=FP8_DTYPE, device="meta")
        b = torch.empty(n, k, dtype=FP8_DTYPE, device="meta").t()
        return F.scaled_mm(a, b, sa.to("meta"), F.ScalingType.BlockWise1x128, sb.to("meta"),
                           F.ScalingType.BlockWise128x128, output_dtype=torch.float32)

    y = scaled_mm(*fidelity.blockwise_scale_layout(x_scales.to("meta"), w_scales.to("meta")))
    assert y.shape == (m, n) and y.dtype == torch.float32
    wrong = {"scale_a row-major": (x_scales, scale_b), "scale_b [N/128, L4]": (scale_a, scale_b.t()),
             "scale_b row-major": (scale_a, scale_b.contiguous())}
    if kb % 4:
        wrong["scale_b unpadded"] = (scale_a, w_scales.t())
    for sa, sb in wrong.values():
        with pytest.raises(RuntimeError, match="1x128 x 128x128 blockwise scaling"):
            scaled_mm(sa, sb)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_refused_without_cuda(capsys):
    with pytest.raises(SystemExit) as exited:
        fidelity.main(["--device", "cuda"])
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "--device cuda" in err


@pytest.mark.parametrize("flag", ["--k", "--n"])
def test_bad_size_is_one_error_line(capsys, flag):
    with pytest.raises(SystemExit) as exited:
        fidelity.main([flag, "500"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert exited.value.code == 2 and len(errors) == 1
    assert f"argument {flag}: must be a positive multiple of 128" in errors[0]
