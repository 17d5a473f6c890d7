"""What a run tells its user: --log-interval means (Megatron-LM's), the start banner and end summary, the
expert-load PNG and TensorBoard data, the full config, and few warning lines.

Two 2-rank runs (PP2, tiny preset, mock data) with the same seed and a NaN step at iteration 2: one logs every
iteration (the reference), one every 3 iterations with checkpoints and TensorBoard."""

import importlib.util
import json
import os
import re
import struct

import pytest

from conftest import REPO, read_metrics, torchrun
from megatron_dsv3.models.param_count import count_parameters
from megatron_dsv3.models.presets import get_preset
from megatron_dsv3.training.expert_load import DPI, PNG_NAME, figure_size, layer_label, moe_layer_numbers

FAULT_SCRIPT = "tests/scripts/pretrain_with_fault.py"
ITERS, INTERVAL, GBS, SEQ = 6, 3, 8, 64
FLAGS = ["--pipeline-model-parallel-size", "2", "--train-iters", ITERS, "--global-batch-size", GBS,
         "--seq-length", SEQ, "--max-skipped-nonfinite-steps", "1"]
FAULT = {"FAULT": "nan", "FAULT_ITERATION": "2"}
KNOWN_LINE = re.compile(r"^(iteration |====|  \S|saved checkpoint )")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_logging")
    reference = torchrun(2, FAULT_SCRIPT, *FLAGS, "--log-interval", "1", "--metrics-jsonl", root / "every.jsonl",
                         env=FAULT)
    output = torchrun(2, FAULT_SCRIPT, *FLAGS, "--log-interval", INTERVAL, "--metrics-jsonl", root / "interval.jsonl",
                      "--save", root / "ckpt", "--save-interval", INTERVAL, "--tensorboard-dir", root / "tb", env=FAULT)
    return {"root": root, "output": output, "reference_output": reference,
            "every": read_metrics(root / "every.jsonl"), "interval": read_metrics(root / "interval.jsonl")}


def test_interval_means_are_means_of_the_iterations(runs):
    every, rows = runs["every"], runs["interval"]
    assert [r["iteration"] for r in rows] == [3, 6]
    assert [r["skipped"] for r in every] == [i == 2 for i in range(1, ITERS + 1)]
    for row in rows:
        window = every[row["iteration"] - INTERVAL:row["iteration"]]
        stepped = [r for r in window if not r["skipped"]]
        assert row["interval_iterations"] == INTERVAL
        assert row["interval_skipped"] == len(window) - len(stepped)
        for key in ("lm_loss", "mtp_loss", "grad_norm"):
            assert row[f"interval_{key}"] == pytest.approx(sum(r[key] for r in stepped) / len(stepped), rel=1e-5)
            assert row[key] == pytest.approx(window[-1][key], rel=1e-5)  # plain keys: the logged iteration's own
        # tokens/s over the interval = its tokens over its summed step times
        assert row["interval_tokens_per_s"] == pytest.approx(GBS * SEQ / row["interval_step_time_s"])
    assert rows[0]["interval_skipped"] == 1 and rows[1]["interval_skipped"] == 0
    printed = [line for line in runs["output"].splitlines() if " | lm loss " in line]
    assert [f"lm loss {r['interval_lm_loss']:.4f}" in line for r, line in zip(rows, printed)] == [True, True]
    assert "skipped 1/3" in printed[0] and "skipped" not in printed[1]


def _numbers(text):
    return [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", text)]


def test_banner_and_summary_once_with_the_run_numbers(runs):
    output, root = runs["output"], runs["root"]
    assert output.count("==== run:") == 1 and output.count("==== done:") == 1
    lines = output.splitlines()
    p = count_parameters(get_preset("tiny"))
    params = next(line for line in lines if line.startswith("  parameters"))
    assert _numbers(params) == [p.total, p.total_with_mtp, p.activated]
    spec = importlib.util.spec_from_file_location("model_info", os.path.join(REPO, "tools", "model_info.py"))
    model_info = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_info)
    assert f"total (main model)             {model_info._fmt(p.total)}" in model_info.report("tiny", SEQ)
    assert "TP 1 × PP 2 × DP 1 (EP 1) = 2 ranks" in output
    assert f"global {GBS} = micro 2 × 4 micro-batches × DP 1; seq {SEQ}; {GBS * SEQ:,} tokens/step" in output
    assert f"save {root / 'ckpt'} (every {INTERVAL} iterations)" in output

    done = lines.index(next(line for line in lines if line.startswith("==== done:")))
    summary = "\n".join(lines[done:done + 5])
    assert f"iterations 1..{ITERS} ({ITERS} this run, 1 skipped), {ITERS * GBS * SEQ:,} tokens" in summary
    last = runs["interval"][-1]
    assert f"final loss   lm {last['interval_lm_loss']:.4f}, mtp {last['interval_mtp_loss']:.4f}" in summary
    mean_step_ms = sum(r["interval_step_time_s"] * r["interval_iterations"] for r in runs["interval"]) / ITERS * 1000
    assert int(re.search(r"mean step +(\d+) ms", summary).group(1)) == pytest.approx(mean_step_ms, abs=1)
    assert f"checkpoint   {root / 'ckpt'}/iter_{ITERS:07d}" in summary
    assert f"expert load  {root / 'ckpt' / PNG_NAME}" in summary


def test_few_warning_lines(runs):
    for output in (runs["output"], runs["reference_output"]):
        noise = [line for line in output.splitlines() if not KNOWN_LINE.match(line)]
        noise = [line for line in noise if not line.startswith("iteration 2: NaN/Inf gradients")]
        assert len(noise) <= 3, noise


def test_expert_load_png_beside_the_checkpoints(runs):
    with open(runs["root"] / "ckpt" / PNG_NAME, "rb") as f:
        header = f.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n" and header[12:16] == b"IHDR"
    width, height = struct.unpack(">II", header[16:24])
    m = get_preset("tiny")
    w, h = figure_size(len(moe_layer_numbers(m)), m.num_experts)
    assert (width, height) == (round(w * DPI), round(h * DPI))


def test_tensorboard_expert_load_and_config(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["root"] / "tb"), size_guidance={"histograms": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    m = get_preset("tiny")
    labels = [layer_label(n, m.num_layers) for n in moe_layer_numbers(m)]
    assert labels == ["layer2", "layer3", "layer4", "mtp1"]
    for label in labels:
        loads = events.Histograms(f"expert_load/{label}")
        assert [h.step for h in loads] == [3, 6]
        for h in loads:  # one sample per expert; the skipped step routed its tokens too
            assert h.histogram_value.num == m.num_experts
            assert h.histogram_value.sum == INTERVAL * GBS * SEQ * m.moe_router_topk
        assert [h.step for h in events.Histograms(f"expert_bias/{label}")] == [3, 6]
    assert "expert_load" in tags["images"]
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    config = json.loads(text.strip().strip("`"))
    assert config["model_config"]["num_experts"] == m.num_experts
    assert config["pipeline_model_parallel_size"] == 2 and config["save"] == str(runs["root"] / "ckpt")


def test_gpu_check_summarizes_the_metrics_file(runs):
    """benchmarks/gpu_check.sh's proxy summary (its inline Python) reads the keys the trainer writes."""
    import subprocess
    import sys

    script = open(os.path.join(REPO, "benchmarks", "gpu_check.sh")).read()
    summary = script.split("<<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    result = subprocess.run([sys.executable, "-", str(runs["root"] / "every.jsonl"), "790"], input=summary,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.splitlines()
    last = runs["every"][-1]  # the only row past the 5 warm-up steps
    assert "MFU" in header and row.split()[0] == f"{last['tokens_per_s']:.0f}"
    assert row.split()[-1] == f"{last['lm_loss']:.3f}"
