"""benchmarks/gpu_check.sh on a host without CUDA: exit 2, one line, nothing run."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU: run the script itself")
def test_without_cuda_exits_2_with_one_line():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env={"PYTHON": sys.executable,
                                                                                         "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "no CUDA device" in result.stderr
