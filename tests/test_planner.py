"""The parallelism planner: DeepSeek-V3's layout fits 2048 80 GB GPUs, PP=1 / EP=1 do not, the memory terms
follow their definitions (checked against parameter counts and the schedules' published in-flight counts), and
the estimate for the tiny preset matches the memory measured in CPU runs."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from conftest import torchrun
from megatron_dsv3.models.param_count import count_parameters
from megatron_dsv3.models.presets import get_preset
from megatron_dsv3.pipeline.schedule_plan import build_plan, peak_activations
from megatron_dsv3.training.planner import (
    SAVINGS,
    Cluster,
    Layout,
    check_layout,
    estimate_memory,
    layer_activation_bytes,
    peak_activation_bytes,
    plan,
    savings,
    stage_layers,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V3 = get_preset("deepseek-v3")
CLUSTER = Cluster(num_nodes=256, gpus_per_node=8, gpu_memory_gb=80, intra_node_bw_gbps=160, inter_node_bw_gbps=50)
DEEPSEEK = Layout(pipeline_model_parallel_size=16, expert_model_parallel_size=64, pipeline_schedule="dualpipe",
                  micro_batch_size=1, global_batch_size=15360, seq_length=4096, recompute="norm_and_up_proj",
                  fp8=True)


def test_deepseek_v3_layout_fits():
    v = plan(V3, DEEPSEEK, CLUSTER)
    assert v.fits, v.reason
    assert v.layout.data_parallel_size == 128
    # DualPipe hides the all-to-all under computation; its bubble is (PP/2-1)(F&B+B-3W) = 7 * 2F
    assert v.time["exposed_comm"] == 0
    fwd = v.time["compute"] / (3 * 15360 // 128)
    assert v.time["bubble"] == pytest.approx(7 * 2 * fwd)


@pytest.mark.parametrize("overrides, term", [
    ({"pipeline_model_parallel_size": 1, "pipeline_schedule": "1f1b", "global_batch_size": 16384}, "main_grads"),
    ({"expert_model_parallel_size": 1}, "main_grads"),
    ({"recompute": "none"}, "activations"),
])
def test_layouts_that_cannot_fit_say_why(overrides, term):
    v = plan(V3, replace(DEEPSEEK, **overrides), CLUSTER)
    assert not v.fits
    assert "does not fit" in v.reason and term in v.reason


def test_invalid_layout_names_the_flag():
    v = plan(V3, replace(DEEPSEEK, expert_model_parallel_size=48), CLUSTER)
    assert not v.fits and "--expert-model-parallel-size 48" in v.reason
    with pytest.raises(ValueError, match="--global-batch-size"):
        check_layout(V3, replace(DEEPSEEK, data_parallel_size=128, global_batch_size=100))


def test_stage_split_61_layers_over_16():
    split = stage_layers(V3, replace(DEEPSEEK, pipeline_schedule="1f1b"))
    assert [len(s) for s in split] == [4] + [4] * 14 + [1]
    assert sum(split, []) == list(range(61))


@pytest.mark.parametrize("schedule, pp", [("1f1b", 4), ("dualpipe", 4), ("dualpipe", 8), ("dualpipev", 4)])
def test_weighted_peak_equals_published_in_flight_counts(schedule, pp):
    lay = Layout(pipeline_model_parallel_size=pp, pipeline_schedule=schedule, global_batch_size=4 * pp,
                 micro_batch_size=1)
    stages = lay.num_stages
    assert peak_activation_bytes([1.0] * stages, lay) == peak_activations(build_plan(schedule, pp, 4 * pp))
    assert max(peak_activation_bytes([1.0] * stages, lay)) == {"1f1b": pp, "dualpipe": pp + 1,
                                                               "dualpipev": 2 * pp + 1}[schedule]


def test_tiny_fp32_single_rank_terms():
    """PP=EP=DP=1 in fp32: weights and grads are 4 B per parameter (main model + MTP without copies), Adam keeps
    m and v in fp32 and no master copy; activations are one micro-batch through every layer + MTP + logits."""
    c = get_preset("tiny")
    lay = Layout(global_batch_size=2, micro_batch_size=2, seq_length=64, bf16=False, flash_attention=False)
    mem = estimate_memory(c, lay)
    p = count_parameters(c)
    n = p.total + sum(p.mtp.values()) - p.mtp["embedding_and_head_copies"]
    assert mem["weights"] == 4 * n and mem["main_grads"] == 4 * n and mem["optimizer"] == 8 * n
    assert mem["fp8_weights"] == 0
    per_token = sum(layer_activation_bytes(c, lay, bool(m)) for m in c.moe_layer_pattern)
    per_token += layer_activation_bytes(c, lay, True) + 4 * 4 * c.hidden_size + 4 * c.vocab_size * 2
    assert mem["activations"] == pytest.approx(per_token * 2 * 64)


def test_layer_activation_bytes_by_hand():
    """One MoE layer of the tiny preset in fp32 with unfused attention, counted tensor by tensor."""
    c = get_preset("tiny")
    s = 64
    lay = Layout(seq_length=s, bf16=False, flash_attention=False)
    h, n, ql, kv, rope, nope, v = 64, 4, 32, 32, 8, 16, 16
    attn = [h, h, ql, ql, kv + rope, kv, n * (nope + rope), n * (nope + rope), n * v, n * v, n * s]
    moe = [h, h, 8, 4 * h, 4 * 2 * 32, 4 * 32, 2 * 32, 32]  # x2, ln2, router probs, dispatched, fc1, act, shared
    assert layer_activation_bytes(c, lay, True) == 4 * (sum(attn) + sum(moe))
    light = replace(lay, recompute="norm_and_up_proj")
    dropped = [h, n * (nope + rope), n * (nope + rope), n * v, h]  # the latent norms' outputs (ql, kv) stay
    assert layer_activation_bytes(c, light, True) == 4 * (sum(attn) + sum(moe) - sum(dropped))
    assert layer_activation_bytes(c, replace(lay, recompute="full"), True) == 4 * h


@pytest.mark.parametrize("nproc, flags, layout", [
    (1, [], {}),
    (2, ["--expert-model-parallel-size", "2", "--use-distributed-optimizer"],
     {"expert_model_parallel_size": 2, "data_parallel_size": 2}),
])
def test_tiny_estimate_matches_measured_cpu_run(tmp_path, nproc, flags, layout):
    """One training step of the tiny preset on CPU ranks (fp32; SDPA's math backend and torch's composite kernels,
    so --unfused-attention --composite-kernels), measured by tests/scripts/measure_memory.py: parameters, their
    fp32 main grads, the optimizer state after the step, and the peak of the tensors autograd saves for the
    backward. The fullest rank's total is within 20% of the estimate; the activations alone too, and the other
    terms within 1%."""
    report = tmp_path / "memory.jsonl"
    torchrun(nproc, "tests/scripts/measure_memory.py", "--train-iters", "1", "--seq-length", "64",
             "--micro-batch-size", "2", "--global-batch-size", 2 * nproc, *flags, env={"MEMORY_REPORT": str(report)})
    terms = ("weights", "main_grads", "optimizer", "activations")
    with open(report) as f:
        measured = max((json.loads(line) for line in f), key=lambda r: sum(r[t] for t in terms))
    lay = Layout(micro_batch_size=2, global_batch_size=2 * nproc, seq_length=64, bf16=False, flash_attention=False,
                 composite_kernels=True, **layout)
    estimate = estimate_memory(get_preset("tiny"), lay)
    for term in ("weights", "main_grads", "optimizer"):
        assert measured[term] == pytest.approx(estimate[term], rel=0.01), term
    assert measured["activations"] == pytest.approx(estimate["activations"], rel=0.2)
    assert sum(measured[t] for t in terms) == pytest.approx(estimate["total"], rel=0.2)


def test_zero1_shards_dense_over_dp_and_experts_over_expert_dp():
    c = get_preset("tiny")
    base = Layout(global_batch_size=8, micro_batch_size=2, seq_length=32, bf16=False)
    one = estimate_memory(c, base)
    four = estimate_memory(c, replace(base, data_parallel_size=4, expert_model_parallel_size=2,
                                      global_batch_size=8 * 4))
    experts = 3 * c.num_experts * 32 * 64 * 4  # 3 MoE layers + MTP, SwiGLU 3*h*ffn per expert
    dense = one["parameters"] - experts
    assert four["parameters"] == dense + experts / 2
    assert four["optimizer"] == pytest.approx(8 * (dense / 4 + (experts / 2) / 2))


def test_cli_verdicts_side_by_side():
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "plan_parallelism.py"), "--model", "deepseek-v3",
                          "--verdicts"], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert "as flagged: TP1 PP16 EP64 DP128 dualpipe" in out
    lines = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("fits")}
    assert lines["fits"][0] == "yes" and "NO" in lines["fits"]
    assert "PP1: " in out and "EP1: " in out


def test_cli_rejects_bad_flags():
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "plan_parallelism.py"), "--fp32"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode != 0 and "--no-fp8" in r.stderr


def test_cli_invalid_layout_is_a_one_line_error():
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "plan_parallelism.py"),
                        "--expert-model-parallel-size", "3"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode != 0 and r.stderr.strip() == \
        "error: invalid: --expert-model-parallel-size 3 must divide DP*TP = 128"


def test_savings_of_the_deepseek_v3_layout_one_row_each():
    """Each saving the 671B layout counts, switched off alone, grows the fullest rank: free-after-send by the
    PP+1 = 17 stage outputs (seq x hidden, bf16) DualPipe keeps in flight, the others by what they remove."""
    lay = replace(DEEPSEEK, data_parallel_size=128)
    rows = {r["saving"]: r for r in savings(V3, lay)}
    assert list(rows) == [name for name, _ in SAVINGS]
    assert rows["free stage output after send"]["saved"] == 17 * 4096 * V3.hidden_size * 2
    assert rows["free stage output after send"]["terms"] == ["activations"]
    assert rows["BF16 Adam moments"]["terms"] == ["optimizer"]
    assert rows["MTP shares the embedding"]["pipeline_rank"] == 0  # the embedding ranks 0 and PP-1 grow
    assert {"weights", "main_grads"} <= set(rows["MTP shares the embedding"]["terms"])
    assert all(r["saved"] > 0 for r in rows.values())
    # 1F1B: stage 0 and the MTP stage sit on different ranks, there is nothing to share
    assert "MTP shares the embedding" not in {r["saving"] for r in savings(V3, replace(lay, pipeline_schedule="1f1b"))}


def test_cli_prints_a_row_per_saving_with_its_scope():
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "plan_parallelism.py")],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert "memory savings (GiB on the fullest rank = pipeline rank 1, 73.3 GiB with all of them" in out
    rows = {name: line for line in out.splitlines() for name, _ in SAVINGS if line.strip().startswith(name)}
    assert set(rows) == {name for name, _ in SAVINGS}
    assert rows["free stage output after send"].split()[5] == "0.9"
    assert "without any of them" in out


def test_cli_headline_tokens_per_gpu_days_and_gpu_hours():
    """The headline is the step time's throughput and the token budget's cost at it, recomputed here from
    estimate_time's step seconds: tokens/s = global batch × seq / step, days = tokens / (tokens/s) / 86400,
    GPU-hours = days × 24 × GPUs."""
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "plan_parallelism.py"), "--train-tokens", "500B"],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    line = next(line for line in out.splitlines() if line.startswith("headline: "))
    step = plan(V3, DEEPSEEK, CLUSTER).time["step"]  # the CLI's defaults
    tokens_per_s = 15360 * 4096 / step
    days = 500e9 / tokens_per_s / 86400
    assert f"{tokens_per_s:,.0f} tokens/s, {tokens_per_s / 2048:,.0f} tokens/s per GPU" in line
    assert f"0.5T tokens (--train-tokens) in {days:.1f} days on 2,048 GPUs = {days * 24 * 2048 / 1e6:.3f}M GPU-hours" \
        in line
    assert "per GPU on the fullest rank (pipeline rank 1)" in out and "GB sent per GPU per step" in out


@pytest.mark.parametrize("value", ["1x", "0", "-5T"])
def test_cli_bad_token_budget_is_one_line(value):
    r = subprocess.run([sys.executable, os.path.join(REPO, "tools", "plan_parallelism.py"), "--train-tokens", value],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "--train-tokens" in r.stderr, r.stderr
