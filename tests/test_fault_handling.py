"""Faults a cluster job meets: NaN/Inf gradients, Slurm's preemption signal, a kill -9 during a checkpoint save."""


from conftest import read_metrics, torchrun
from megatron_dsv3.checkpointing.checkpoint import TRACKER_FILE

FAULT_SCRIPT = "tests/scripts/pretrain_with_fault.py"
KILL_SCRIPT = "tests/scripts/pretrain_killed_mid_save.py"


def test_nonfinite_step_is_skipped_within_the_limit(tmp_path):
    metrics = tmp_path / "m.jsonl"
    torchrun(1, FAULT_SCRIPT, "--train-iters", "4", "--max-skipped-nonfinite-steps", "1", "--metrics-jsonl", metrics,
             env={"FAULT": "nan", "FAULT_ITERATION": "2"})
    rows = read_metrics(metrics)
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
    full, resumed = read_metrics(tmp_path / "full.jsonl"), read_metrics(tmp_path / "a.jsonl") + read_metrics(tmp_path / "b.jsonl")
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4, 5]
    assert [r["lm_loss"] for r in resumed] == [r["lm_loss"] for r in full]


def test_kill_9_mid_save_keeps_the_previous_checkpoint_and_resume_continues(tmp_path):
    layout = ["--train-iters", "6", "--expert-model-parallel-size", "2", "--use-distributed-optimizer"]  # ZeRO-1
    flags = layout + ["--save-interval", "2"]
    ckpt = tmp_path / "ckpt"
    torchrun(2, "pretrain_dsv3.py", *layout, "--metrics-jsonl", tmp_path / "full.jsonl")
    output = torchrun(2, KILL_SCRIPT, *flags, "--save", ckpt, "--metrics-jsonl", tmp_path / "a.jsonl",
                      env={"KILL_AT_SAVE": "4"}, expect_exit=1)
    assert "Signal 9 (SIGKILL)" in output
    # the save of iteration 4 died with its shards in the staging directory; iteration 2 is still the latest
    staging = ckpt / "iter_0000004.tmp"
    assert any(staging.glob("*.distcp")) and not (staging / ".metadata").exists()
    assert not (ckpt / "iter_0000004").exists()
    assert (ckpt / TRACKER_FILE).read_text() == "2"

    output = torchrun(2, "pretrain_dsv3.py", *flags, "--load", ckpt, "--save", ckpt,
                      "--metrics-jsonl", tmp_path / "b.jsonl")
    assert f"loaded checkpoint {ckpt}/iter_0000002 at iteration 2" in output
    # iteration 4 saved again over the leftover staging directory
    assert (ckpt / "iter_0000004" / ".metadata").exists() and not staging.exists()
    assert (ckpt / TRACKER_FILE).read_text() == "6"
    full, killed, resumed = read_metrics(tmp_path / "full.jsonl"), read_metrics(tmp_path / "a.jsonl"), read_metrics(tmp_path / "b.jsonl")
    assert [r["iteration"] for r in killed] == [1, 2, 3, 4] and [r["iteration"] for r in resumed] == [3, 4, 5, 6]
    assert [r["lm_loss"] for r in killed + resumed] == [full[i - 1]["lm_loss"] for i in (1, 2, 3, 4, 3, 4, 5, 6)]
