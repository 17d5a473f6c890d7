"""benchmarks/gpu_check.sh on a host without CUDA: exit 2 with one line; and every part exercised as far as a CPU
allows: the proxy's pretrain_dsv3.py flags pass the argument checks, each benchmark the script runs with
`--device cuda` runs with `--device cpu` at a small size (the Transformer Engine one refuses in one line)."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_dsv3.training.arguments import parse_args

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
SMALL = {  # appended to the script's own flags (argparse: the last one wins)
    "model_step.py": ["--batch-size", "2", "--seq-length", "16", "--steps", "2", "--warmup", "1", "--sizes", "tiny"],
    "grouped_experts.py": ["--steps", "2", "--warmup", "1"],
    "fp8_te_step_time.py": [],
    "fp8_gemm_fidelity.py": ["--m", "64", "--n", "256", "--k", "512", "--seeds", "1"],
}


def script_text() -> str:
    return SCRIPT.read_text().replace("\\\n", " ")  # continuation lines joined


def benchmark_commands() -> dict:
    """{benchmark file: its arguments} for each `"$PYTHON" benchmarks/X.py ...` line of the script."""
    found = re.findall(r'"\$PYTHON" benchmarks/(\w+\.py)([^\n]*)', script_text())
    return {name: shlex.split(rest) for name, rest in found}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU: run the script itself")
def test_without_cuda_exits_2_with_one_line():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env={"PYTHON": sys.executable,
                                                                                         "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "no CUDA device" in result.stderr


def test_proxy_flags_pass_the_argument_checks():
    flags = shlex.split(re.search(r"pretrain_dsv3\.py(.*?)--metrics-jsonl", script_text()).group(1))
    assert "--bf16" in flags
    on_cpu = flags if torch.cuda.is_available() else [f for f in flags if f != "--bf16"]  # BF16 is refused on a CPU
    args = parse_args(on_cpu, world_size=1)
    cfg = args.model_config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.moe_ffn_hidden_size) == (7168, 128, 2048)  # V3's shapes
    assert args.moe_grouped_gemm and args.train_iters == 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU: run the script itself")
def test_each_benchmark_of_the_script_runs_on_the_cpu():
    commands = benchmark_commands()
    assert set(commands) == set(SMALL), commands
    for name, arguments in commands.items():
        arguments = ["cpu" if a == "cuda" else a for a in arguments] + SMALL[name]
        result = subprocess.run([sys.executable, f"benchmarks/{name}", *arguments], cwd=REPO, capture_output=True,
                                text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "TORCHDYNAMO_DISABLE": "1",
                                                             "PYTHONPATH": str(REPO)})
        if name == "fp8_te_step_time.py":  # needs a GPU and Transformer Engine
            assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
            continue
        assert result.returncode == 0, (name, result.stderr[-2000:])
        assert result.stdout.strip(), name
