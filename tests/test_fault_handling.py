"""Faults a cluster job meets: NaN/Inf gradients and Slurm's preemption signal."""

import json

from conftest import torchrun

FAULT_SCRIPT = "tests/scripts/pretrain_with_fault.py"


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_nonfinite_step_is_skipped_within_the_limit(tmp_path):
    metrics = tmp_path / "m.jsonl"
    torchrun(1, FAULT_SCRIPT, "--train-iters", "4", "--max-skipped-nonfinite-steps", "1", "--metrics-jsonl", metrics,
             env={"FAULT": "nan", "FAULT_ITERATION": "2"})
    rows = read(metrics)
    assert [r["skipped"] for r in rows] == [False, True, False, False]
    assert all(r["lm_loss"] == r["lm_loss"] for r in rows[2:])  # no NaN reached the weights


def test_nonfinite_step_beyond_the_limit_stops_with_the_iteration(tmp_path):
    output = torchrun(1, FAULT_SCRIPT, "--train-iters", "4", env={"FAULT": "nan", "FAULT_ITERATION": "3"},
                      expect_exit=1)
    assert "NaN/Inf in the loss or gradients at iteration 3" in output


def test_preemption_signal_saves_and_resume_is_bit_identical(tmp_path):
    flags = ["--train-iters", "5", "--expert-model-parallel-size", "2"]
    torchrun(2, "pretrain_dsv3.py", *flags, "--metrics-jsonl", tmp_path / "full.jsonl")
    output = torchrun(2, FAULT_SCRIPT, *flags, "--save", tmp_path / "ckpt", "--metrics-jsonl", tmp_path / "a.jsonl",
                      env={"FAULT": "signal", "FAULT_ITERATION": "2"}, expect_exit=1)
    assert "stopping at iteration 2: signal" in output and "exitcode  : 3" in output
    torchrun(2, "pretrain_dsv3.py", *flags, "--load", tmp_path / "ckpt", "--metrics-jsonl", tmp_path / "b.jsonl")
    full, resumed = read(tmp_path / "full.jsonl"), read(tmp_path / "a.jsonl") + read(tmp_path / "b.jsonl")
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4, 5]
    assert [r["lm_loss"] for r in resumed] == [r["lm_loss"] for r in full]
