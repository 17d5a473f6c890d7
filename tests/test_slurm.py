"""A real single-node Slurm: examples/tiny_cpu.sbatch is preempted, saves, is requeued and resumes to the losses
of an uninterrupted run.

The session fixture `slurm` installs Debian's slurm-wlm and munge with apt-get where `sbatch` is missing (as
root; without root and apt-get, or when apt-get fails, the test skips and says why). It writes a slurm.conf for
one node, localhost, into a temporary directory (its own ports and munge key and socket; no cgroups:
proctrack/linuxproc, task/none; no accounting; a requeued job restarts after seconds, not 2 minutes), starts
munged, slurmctld and slurmd, waits for the node to be idle, and stops them at the end of the session.

The test submits the example with `sbatch` (no container: CONTAINER_IMAGE=; 20 iterations, a loss per
iteration to a JSON-lines file). After a few iterations it sends the batch shell the preemption signal that
`#SBATCH --signal=B:USR1@60` sends near the time limit (`scancel --signal=USR1 --batch`). It checks that every
rank saved and exited with EXIT_CODE_REQUEUE, the script requeued the job (Restarts=1), the second run loaded
that checkpoint and finished, and the losses of iterations 1..20 equal those of a torchrun of the script's
flags without Slurm. Before that, while the first job holds its --save (suspended with `scontrol suspend`, so it
cannot finish meanwhile), a second job submitted with the same CKPT_DIR must fail with one line naming the first
job as the owner of the save lock and leave the checkpoint directory as it was; the first job then resumes.
About 3 minutes on 2 busy cores, plus about 30 s of apt-get on a fresh machine.
"""

import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, read_metrics, torchrun
from megatron_dsv3.checkpointing.save_lock import LOCK_FILE
from megatron_dsv3.training.preemption import EXIT_CODE_REQUEUE

SCRIPT = os.path.join(REPO, "examples", "tiny_cpu.sbatch")
ITERS = 20
NPROC = 4  # the script's GPUS_PER_NODE
SEARCH_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin:/sbin"
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "squeue")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}

SLURM_CONF = """\
ClusterName=dsv3test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={dir}/munge.sock,cred_expire=5
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/linear
SchedulerParameters=sched_interval=1
JobRequeue=1
ReturnToService=2
# the node the example asks for (4 CPUs, 16 GB) whatever this machine has
SlurmdParameters=config_overrides
NodeName=localhost NodeAddr=127.0.0.1 CPUs=4 RealMemory=16384 State=UNKNOWN
# two jobs may share the node: the second job on a locked --save runs beside the first
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:2
"""


def _install_slurm():
    """None once Slurm and munge are installed (installing them if need be), else why they cannot be."""
    if all(shutil.which(p, path=SEARCH_PATH) for p in PROGRAMS):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed, and installing it needs root and apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # keep the packages from starting their system-wide daemons (Docker images ship this policy; others may not)
    policy = "/usr/sbin/policy-rc.d"
    added_policy = not os.path.exists(policy)
    if added_policy:
        with open(policy, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(policy, 0o755)
    try:
        for command in (["apt-get", "update", "-q"],
                        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]):
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            if result.returncode:
                return f"{' '.join(command)} failed: {result.stderr.strip()[-500:]}"
    finally:
        if added_policy:
            os.remove(policy)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def _logs(directory) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(directory.glob("*.log")))


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """The environment (SLURM_CONF, PATH) for Slurm's commands, with munged, slurmctld and slurmd running."""
    reason = _install_slurm()
    if reason:
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("slurm")
    (d / "state").mkdir()
    (d / "spool").mkdir()
    conf = d / "slurm.conf"
    conf.write_text(SLURM_CONF.format(dir=d, ctld_port=_free_port(), slurmd_port=_free_port()))
    key = d / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    env = {**os.environ, "PATH": SEARCH_PATH, "SLURM_CONF": str(conf)}

    def run(*command):
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)

    daemons = []
    try:
        for name, *flags in (
            ("munged", "-F", "--force", f"--socket={d}/munge.sock", f"--key-file={key}", f"--pid-file={d}/munged.pid",
             f"--seed-file={d}/munged.seed", f"--log-file={d}/munged.log"),
            ("slurmctld", "-D", "-i", "-f", str(conf)),
            ("slurmd", "-D", "-f", str(conf), "-N", "localhost"),
        ):
            with open(d / f"{name}.out.log", "w") as out:
                daemons.append(subprocess.Popen([name, *flags], env=env, stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=True))
            if name == "munged":
                _wait(lambda: (d / "munge.sock").exists(), 10, "munged's socket")
        try:
            _wait(lambda: run("sinfo", "-h", "-n", "localhost", "-o", "%t").stdout.strip() == "idle", 30,
                  "the Slurm node to be idle")
        except pytest.fail.Exception:
            pytest.fail(f"Slurm did not start:\n{_logs(d)}")
        yield env
    finally:
        jobs = run("squeue", "-h", "-o", "%A").stdout.split() if daemons else []
        if jobs:
            run("scancel", *jobs)
            deadline = time.time() + 30
            while run("squeue", "-h").stdout.strip() and time.time() < deadline:
                time.sleep(1)
        for daemon in reversed(daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def script_train_args(ckpt_dir, log_dir, extra) -> list:
    """The sbatch script's TRAIN_ARGS as bash expands them, with `extra` as the script's own arguments."""
    with open(SCRIPT) as f:
        text = f.read()
    layout = re.search(r"^TP=\d+ PP=\d+ EP=\d+$", text, re.M).group(0)
    block = re.search(r"^TRAIN_ARGS=\(.*?^\)$", text, re.M | re.S).group(0)
    program = f'{layout}\n{block}\nprintf "%s\\n" "${{TRAIN_ARGS[@]}}"'
    env = {**os.environ, "CKPT_DIR": str(ckpt_dir), "LOG_DIR": str(log_dir)}
    return subprocess.run(["bash", "-c", program, "_", *map(str, extra)], env=env, capture_output=True, text=True,
                          check=True).stdout.splitlines()


def job_info(env, job) -> dict:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True,
                         timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def submit(env, work, output, args) -> str:
    """sbatch the example from `work` (its logs/ and the entry point there); returns the job id."""
    work.mkdir(exist_ok=True)
    if not (work / "pretrain_dsv3.py").exists():
        os.symlink(os.path.join(REPO, "pretrain_dsv3.py"), work / "pretrain_dsv3.py")
    return subprocess.run(
        ["sbatch", "--parsable", f"--chdir={work}", f"--output={output}", SCRIPT, *map(str, args)],
        env=env, capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip().split(";")[0]


def tree_hashes(root) -> dict:
    """path -> sha256 of every file under `root` but the save lock (its heartbeat changes)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


def test_preempted_job_saves_requeues_and_resumes_to_the_same_losses(slurm, tmp_path):
    extra = ["--train-iters", ITERS, "--log-interval", 1]
    reference = tmp_path / "reference"
    reference.mkdir()
    torchrun(NPROC, "pretrain_dsv3.py",
             *script_train_args(reference / "ckpt", reference, extra + ["--metrics-jsonl", reference / "m.jsonl"]))
    expected = [r["lm_loss"] for r in read_metrics(reference / "m.jsonl")]
    assert len(expected) == ITERS

    # the job runs in its own directory (logs/, checkpoints) with the repo's entry point
    work = tmp_path / "job"
    metrics, output = work / "metrics.jsonl", work / "job.out"
    env = {**slurm, "PATH": f"{os.path.dirname(sys.executable)}:{slurm['PATH']}", "CONTAINER_IMAGE": "",
           "CKPT_DIR": str(work / "ckpt")}
    job = submit(env, work, output, extra + ["--metrics-jsonl", metrics])

    def log():
        return output.read_text(errors="replace") if output.exists() else "(no job output)"

    def running_for(iterations):
        state = job_info(env, job).get("JobState")
        if state in FINAL_STATES:
            pytest.fail(f"job {job} ended ({state}) before the preemption signal:\n{log()[-6000:]}")
        return os.path.exists(metrics) and len(read_metrics(metrics)) >= iterations

    def finished(job_id):
        info = job_info(env, job_id)
        return info if info.get("JobState") in FINAL_STATES else None

    # a second job on the same --save while the first holds its lock: refused, one line naming the owner
    _wait(lambda: running_for(1), 300, "the job's first iteration")
    subprocess.run(["scontrol", "suspend", job], env=env, check=True, timeout=30)
    before = tree_hashes(work / "ckpt")
    intruder_output = tmp_path / "intruder" / "job.out"
    intruder = submit(env, tmp_path / "intruder", intruder_output, extra)
    intruder_info = _wait(lambda: finished(intruder), 300, f"the second job {intruder} to end")
    intruder_log = intruder_output.read_text(errors="replace")
    errors = sorted({line for line in intruder_log.splitlines() if line.startswith("error:")})
    assert intruder_info["JobState"] == "FAILED", f"{intruder_info}\n{intruder_log[-6000:]}"
    assert len(errors) == 1 and f"is in use by job {job} " in errors[0], intruder_log[-6000:]
    assert tree_hashes(work / "ckpt") == before
    subprocess.run(["scontrol", "resume", job], env=env, check=True, timeout=30)

    _wait(lambda: running_for(3), 300, "the job's first iterations")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True, timeout=30)

    info = _wait(lambda: finished(job), 600, f"job {job} to finish")
    text = log()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{text[-6000:]}"

    # preempted: every rank saved and asked for a requeue, the script requeued, the rerun resumed and finished
    stop = int(re.search(r"stopping at iteration (\d+): signal", text).group(1))
    assert 3 <= stop < ITERS
    assert f"saved checkpoint {work / 'ckpt'}/iter_{stop:07d}" in text
    assert f"requeueing job {job}" in text
    assert re.search(rf"loaded checkpoint \S+/iter_{stop:07d} at iteration {stop}\b", text)
    codes = work / "logs" / job / "exit_codes"
    for restart, code in (("restart_0", EXIT_CODE_REQUEUE), ("restart_1", 0)):
        assert [(codes / restart / f"rank{r}.rc").read_text().strip() for r in range(NPROC)] == [str(code)] * NPROC

    rows = read_metrics(metrics)
    assert [r["iteration"] for r in rows] == list(range(1, ITERS + 1))
    assert [r["lm_loss"] for r in rows] == expected
