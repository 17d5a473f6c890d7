"""Batch-size ramp-up (--rampup-batch-size) against Megatron-LM's documented formula, and the DeepSeek-V3 §4.2
token schedules of γ (bias update rate) and λ (MTP loss weight) against their piecewise definition; one DualPipeV
run through the ramp resumes bit-identically from a checkpoint saved inside it."""

import copy

import pytest
import torch
from megatron.core.num_microbatches_calculator import (
    destroy_num_microbatches_calculator, get_current_global_batch_size, get_num_microbatches,
    update_num_microbatches,
)
from megatron.core.utils import get_model_config

from conftest import read_metrics, torchrun
from test_lr_schedule import reference_lr
from megatron_dsv3.models.transformer_config import transformer_config_from_args
from megatron_dsv3.training.arguments import parse_args
from megatron_dsv3.training.batch_schedule import start_batch_schedule
from megatron_dsv3.training.token_schedules import TokenSchedules


def reference_global_batch_size(n, start, increment, samples, final):
    """Megatron-LM's --rampup-batch-size help: (final − start) / increment intervals of samples / intervals
    samples each; n consumed samples lie in interval ⌊n / (samples / intervals)⌋, in exact integers here."""
    if n > samples:
        return final
    intervals = (final - start) // increment
    return start + increment * (n * intervals // samples)


def reference_gamma(tokens):  # DeepSeek-V3 §4.2: γ = 0.001 for the first 14.3T tokens, then 0
    return 0.001 if tokens < 14_300_000_000_000 else 0.0


def reference_lambda(tokens):  # DeepSeek-V3 §4.2: λ = 0.3 for the first 10T tokens, then 0.1
    return 0.3 if tokens < 10_000_000_000_000 else 0.1


@pytest.fixture
def calculator():
    yield
    destroy_num_microbatches_calculator()


@pytest.mark.parametrize("ramp, final, micro, world, iterations", [
    ((16, 8, 300000), 1024, 1, 8, 1400),  # Megatron-LM's help example: 126 intervals of ≈ 2380.95 samples
    ((4, 2, 24), 8, 1, 1, 12),
    ((6, 6, 100), 60, 3, 2, 40),
])
def test_every_iteration_runs_the_formulas_batch(ramp, final, micro, world, iterations, calculator):
    args = parse_args(["--rampup-batch-size", *map(str, ramp), "--global-batch-size", str(final),
                       "--micro-batch-size", str(micro), "--train-iters", str(iterations)], world_size=world)
    start_batch_schedule(args)
    consumed, sizes = 0, []
    for _ in range(iterations):
        update_num_microbatches(consumed, consistency_check=True)  # what the train loop does before each step
        want = reference_global_batch_size(consumed, *ramp, final)
        assert get_current_global_batch_size() == want, consumed
        assert get_num_microbatches() == want // (micro * world)
        sizes.append(want)
        consumed += want
    assert sizes[0] == ramp[0] and sizes[-1] == final and sizes == sorted(sizes)  # the whole ramp was run
    assert args.train_samples == consumed == args.lr_schedule_samples.decay  # data size and default lr decay


def test_without_a_ramp_the_batch_is_constant(calculator):
    args = parse_args(["--global-batch-size", "8", "--train-iters", "5"], world_size=1)
    start_batch_schedule(args)
    update_num_microbatches(123, consistency_check=True)
    assert (get_current_global_batch_size(), get_num_microbatches(), args.train_samples) == (8, 4, 40)


def test_the_reports_token_schedules_step_by_step():
    """γ and λ of every iteration (tokens = consumed samples × --seq-length before it) on every config
    of the chunks, chunk 0's included: megatron-core's finalize_model_grads reads γ there."""
    seq = 4096
    args = parse_args(["--seq-length", str(seq), "--max-position-embeddings", str(seq),
                       "--moe-router-bias-update-rate", "0.001", "--moe-router-bias-update-rate-phases", "14.3T:0",
                       "--mtp-loss-scaling-factor", "0.3", "--mtp-loss-scaling-factor-phases", "10T:0.1"],
                      world_size=1)
    config = transformer_config_from_args(args)
    chunk = torch.nn.Module()
    chunk.config = config
    chunk.stage = torch.nn.Module()
    chunk.stage.config = copy.copy(config)  # a per-stage copy, as placement.build_stage makes
    schedules = TokenSchedules(args, [chunk])
    per_iteration = 15360  # samples: DeepSeek-V3's batch after its ramp
    boundaries = [10_000_000_000_000, 14_300_000_000_000]
    consumed_values = sorted({0, *(b // seq + d for b in boundaries for d in (-1, 0, 1))}
                             | {per_iteration * i for i in range(0, 250_000, 997)})
    for consumed in consumed_values:
        schedules.apply(consumed)
        tokens = consumed * seq
        for cfg in (get_model_config(chunk), chunk.stage.config):
            assert cfg.moe_router_bias_update_rate == reference_gamma(tokens), tokens
            assert cfg.mtp_loss_scaling_factor == reference_lambda(tokens), tokens


# ---------------------------------------------------------------- one DualPipeV run through the ramp, resumed

SEQ = 64
RAMP = (4, 2, 12)  # gbs 4, 4, 6, then 8: DualPipeV with PP 2 needs ≥ 4 micro-batches, every stage has them
# tokens before iterations 1..6: 0, 256, 512, 896, 1408, 1920
PHASES = {"moe_router_bias_update_rate": (1e-3, [(800, 0.0)]), "mtp_loss_scaling_factor": (0.1, [(200, 0.3),
                                                                                                (1000, 0.05)])}
# the lr: warmup over 4 samples, WSD's cosine decay over the last 30 of the run's 38 samples (from iteration 3 on:
# the resume after iteration 2 lands inside the ramp and the decay), the last iteration in an --lr-phases tail
LR_PHASE_TOKENS = 2400
COMMON = ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "dualpipev", "--micro-batch-size", "1",
          "--global-batch-size", "8", "--seq-length", str(SEQ), "--train-iters", "6", "--lr-warmup-samples", "4",
          "--lr-decay-style", "WSD", "--lr-wsd-decay-samples", "30", "--lr-wsd-decay-style", "cosine",
          "--lr-phases", f"{LR_PHASE_TOKENS}:1e-4", "--moe-grouped-gemm"]  # grouped experts under the B/W split
WITH_SCHEDULES = ["--rampup-batch-size", *map(str, RAMP), "--moe-router-bias-update-rate-phases", "800:0",
                  "--mtp-loss-scaling-factor-phases", "200:0.3", "1000:0.05"]


def piecewise(base, phases, tokens):
    value = base
    for start, new in phases:
        if tokens >= start:
            value = new
    return value


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ramp")
    run = COMMON + WITH_SCHEDULES
    torchrun(2, "pretrain_dsv3.py", *run, "--metrics-jsonl", root / "full.jsonl")
    torchrun(2, "pretrain_dsv3.py", *run, "--save", root / "ckpt", "--exit-interval", "2",  # next gbs: 6
             "--metrics-jsonl", root / "resumed.jsonl")
    torchrun(2, "pretrain_dsv3.py", *run, "--load", root / "ckpt", "--save", root / "ckpt",
             "--metrics-jsonl", root / "resumed.jsonl")
    # the same ramp without the token schedules, up to one iteration past λ's first change
    torchrun(2, "pretrain_dsv3.py", *COMMON, "--rampup-batch-size", *map(str, RAMP), "--exit-interval", "3",
             "--metrics-jsonl", root / "constant.jsonl")
    return {name: read_metrics(root / f"{name}.jsonl") for name in ("full", "resumed", "constant")}


def test_run_follows_the_ramp_and_the_token_schedules(runs):
    consumed = 0
    for row in runs["full"]:
        assert row["global_batch_size"] == reference_global_batch_size(consumed, *RAMP, 8), row
        for name, (base, phases) in PHASES.items():
            assert row[name] == piecewise(base, phases, consumed * SEQ), (name, row)
        consumed += row["global_batch_size"]
        # the default decay spans the run's 38 samples; the logged lr is the one after the step's scheduler step
        want = 1e-4 if consumed * SEQ >= LR_PHASE_TOKENS else reference_lr(
            consumed, max_lr=3e-3, min_lr=3e-4, init=0.0, warmup=4, decay=38, style="WSD", wsd=30, wsd_style="cosine")
        assert row["lr"] == pytest.approx(want, rel=1e-12), row
    assert [r["global_batch_size"] for r in runs["full"]] == [4, 4, 6, 8, 8, 8]


def test_resume_inside_the_ramp_is_bit_identical(runs):
    full, resumed = runs["full"], runs["resumed"]
    assert [r["iteration"] for r in resumed] == list(range(1, 7)) == [r["iteration"] for r in full]
    for key in ("lm_loss", "mtp_loss", "grad_norm", "lr", "global_batch_size", *PHASES):
        assert [r[key] for r in resumed] == [r[key] for r in full], key


def test_lambda_reaches_the_models_loss(runs):
    """λ changes before iteration 2 (256 tokens ≥ 200): its backward differs, so iteration 3's loss does."""
    full, constant = runs["full"], runs["constant"]
    assert [r["lm_loss"] for r in constant[:2]] == [r["lm_loss"] for r in full[:2]]
    assert constant[2]["lm_loss"] != full[2]["lm_loss"]
