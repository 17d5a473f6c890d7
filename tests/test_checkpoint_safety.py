"""Run safety across processes: checkpoint discovery and --load semantics, architecture check on load,
the --save lock between two jobs, ranks that stop when torchrun dies, a save that fails for lack of disk,
and bad inputs reported once by a multi-rank launch. Each case here was silent before (issue 14)."""

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, torchrun
from megatron_dsv3.checkpointing.discovery import TRACKER_FILE, complete_iterations, is_complete
from megatron_dsv3.checkpointing.save_lock import LOCK_FILE, LockError, SaveLock


def hashes(root) -> dict:
    out = {}
    for base, _, files in os.walk(root):
        for name in files:
            if name != LOCK_FILE:
                with open(os.path.join(base, name), "rb") as f:
                    out[os.path.relpath(os.path.join(base, name), root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run(*args, script="pretrain_dsv3.py", expect=0, env=None):
    run_env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1", "MASTER_PORT": free_port(),
               **(env or {})}
    run_env.pop("RANK", None)
    result = subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], cwd=REPO, env=run_env,
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == expect, output[-4000:]
    return output


def one_error_line(output) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output[-4000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("trained") / "ckpt"
    run("--train-iters", "2", "--save", ckpt, "--save-interval", "1")
    assert complete_iterations(str(ckpt)) == [1, 2]
    return ckpt


def test_missing_marker_stops_and_an_iter_path_resumes_without_touching_newer(trained, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained, ckpt)
    (ckpt / TRACKER_FILE).unlink()
    before = hashes(ckpt)
    line = one_error_line(run("--train-iters", "4", "--load", ckpt, "--save", ckpt, expect=1))
    assert f"--load {ckpt}/iter_0000002" in line and hashes(ckpt) == before  # nothing deleted or re-saved

    # an iter_N path is that checkpoint; saving next to it stops at the newer iter_2 rather than going behind it
    line = one_error_line(run("--train-iters", "4", "--load", ckpt / "iter_0000001", "--save", ckpt, expect=1))
    assert "iter_0000002" in line and "iteration 1" in line and hashes(ckpt) == before
    output = run("--train-iters", "3", "--load", ckpt / "iter_0000002", "--save", ckpt)
    assert f"loaded checkpoint {ckpt}/iter_0000002 at iteration 2" in output
    assert complete_iterations(str(ckpt)) == [1, 2, 3] and (ckpt / TRACKER_FILE).read_text() == "3"
    # the older checkpoints are untouched (the run's expert-load picture beside them is rewritten, as it should be)
    older = ("iter_0000001", "iter_0000002")
    assert {k: v for k, v in hashes(ckpt).items() if k.startswith(older)} == \
        {k: v for k, v in before.items() if k.startswith(older)}


def test_empty_or_absent_load_dir_trains_from_scratch_and_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    output = run("--train-iters", "1", "--load", tmp_path / "empty", "--save", tmp_path / "empty")
    assert f"no checkpoint in {tmp_path / 'empty'}: training from scratch" in output
    assert complete_iterations(str(tmp_path / "empty")) == [1]


def test_partial_load_and_finetune_need_their_flags_and_say_what_they_did(trained, tmp_path):
    before = hashes(trained)
    fewer = ["--num-layers", "2", "--moe-layer-freq", "[0,1]", "--no-load-optim", "--train-iters", "1"]
    line = one_error_line(run("--load", trained, *fewer, expect=1))
    assert "num_layers: 4 → 2" in line
    output = run("--load", trained, *fewer, "--allow-partial-load", "--finetune")
    partial = next(line for line in output.splitlines() if line.startswith("partial load"))
    assert "num_layers: 4 → 2" in partial and "decoder.layers.2.*, decoder.layers.3.*" in partial
    assert "--finetune: starting at iteration 0" in output and "iteration      1/1" in output
    assert hashes(trained) == before


@pytest.mark.parametrize("fault, reason", [("enospc", "No space left on device"), ("erofs", "Read-only file system")])
def test_failed_save_removes_staging_and_keeps_the_last_checkpoint(trained, tmp_path, fault, reason):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained, ckpt)
    before = hashes(ckpt)
    output = run("--train-iters", "4", "--load", ckpt, "--save", ckpt, "--save-interval", "1",
                 script="tests/scripts/pretrain_with_fault.py", env={"FAULT": fault, "FAULT_ITERATION": "3"},
                 expect=1)
    line = one_error_line(output)
    assert reason in line and "iter_0000003" in line and f"{ckpt}/iter_0000002 is intact" in line
    assert not (ckpt / "iter_0000003.tmp").exists() and not (ckpt / "iter_0000003").exists()
    assert hashes(ckpt) == before and not (ckpt / LOCK_FILE).exists()


def test_second_job_on_a_locked_save_dir_refuses_then_takes_over_a_dead_owner(tmp_path):
    save = tmp_path / "ckpt"
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1", "MASTER_PORT": free_port()}
    env.pop("RANK", None)
    first = subprocess.Popen([sys.executable, os.path.join(REPO, "pretrain_dsv3.py"), "--train-iters", "100000",
                              "--save", str(save), "--save-interval", "1000"], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (save / LOCK_FILE).exists() and time.time() < deadline:
            time.sleep(0.5)
        line = one_error_line(run("--train-iters", "1", "--save", save, expect=1))
        assert f"pid {first.pid}" in line and "in use by" in line
    finally:
        first.kill()
        first.wait()
    output = run("--train-iters", "1", "--save", save)
    assert f"pid {first.pid} is gone" in output and complete_iterations(str(save)) == [1]
    assert not (save / LOCK_FILE).exists()  # released at the end


def test_requeued_slurm_job_takes_its_own_lock_and_other_jobs_do_not(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    held = SaveLock(str(tmp_path), stale_seconds=600)
    assert held.acquire() == ""
    held._stop.set()  # the owner's node is gone: no heartbeat, no release
    requeued = SaveLock(str(tmp_path), stale_seconds=600)
    assert "this Slurm job's own lock (77" in requeued.acquire()
    with pytest.raises(LockError, match="lost its save lock"):
        held.check_owned()
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(LockError, match="in use by job 77"):
        SaveLock(str(tmp_path), stale_seconds=600).acquire()
    old = SaveLock(str(tmp_path), stale_seconds=1e-3)
    time.sleep(0.01)  # the requeued owner's last heartbeat (its acquire) is now older than 1 ms
    assert "heartbeat is" in old.acquire()  # the stale rule: no heartbeat within --save-lock-stale-seconds
    old.release()
    requeued.release()


def _children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except OSError:
                pass
    return out


def test_ranks_stop_when_torchrun_dies_and_the_last_checkpoint_stays(tmp_path):
    save = tmp_path / "ckpt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               os.path.join(REPO, "pretrain_dsv3.py"), "--train-iters", "100000", "--expert-model-parallel-size", "2",
               "--save", str(save), "--save-interval", "2"]
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (save / TRACKER_FILE).exists() and time.time() < deadline:
            time.sleep(0.5)
        ranks = _children(launcher.pid)
        assert len(ranks) == 2 and (save / TRACKER_FILE).exists()
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 20
        while any(os.path.exists(f"/proc/{r}") and _state(r) != "Z" for r in ranks) and time.time() < deadline:
            time.sleep(0.2)
        alive = [r for r in ranks if os.path.exists(f"/proc/{r}") and _state(r) != "Z"]
    finally:
        for r in _children(launcher.pid) + locals().get("ranks", []):
            try:
                os.kill(r, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not alive, f"ranks {alive} outlived their launcher"
    latest = int((save / TRACKER_FILE).read_text())
    assert is_complete(str(save / f"iter_{latest:07d}")) and latest in complete_iterations(str(save))


def _state(pid) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def test_bad_inputs_are_reported_once_by_a_multi_rank_launch(trained, tmp_path):
    output = torchrun(2, "pretrain_dsv3.py", "--lr", "0", "--expert-model-parallel-size", "2", expect_exit=1)
    assert output.count("error: --lr 0.0 must be finite and > 0") == 1
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained, ckpt)
    (ckpt / TRACKER_FILE).write_text("garbage")
    before = hashes(ckpt)
    output = torchrun(2, "pretrain_dsv3.py", "--load", ckpt, "--save", ckpt, "--expert-model-parallel-size", "2",
                      expect_exit=1)
    assert output.count(f"error: {ckpt}/{TRACKER_FILE} is corrupt") == 1 and hashes(ckpt) == before
