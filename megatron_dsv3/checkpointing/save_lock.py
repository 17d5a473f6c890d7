"""One job at a time writes a --save directory.

Rank 0 of the owning job keeps `DIR/.save.lock` (JSON: job id, host, pid, heartbeat time) and refreshes the
heartbeat every `stale_seconds / 10` from a daemon thread. Another job finding the lock refuses to start
(one line naming the owner) unless the lock is stale: the owner's pid is gone (same host) or its heartbeat
is older than `stale_seconds`; then it takes the lock over and says so. A requeued Slurm job (same
SLURM_JOB_ID) takes its own lock at once. Before every save the owner checks the lock is still its own.
"""

import json
import os
import socket
import threading
import time
import uuid

LOCK_FILE = ".save.lock"


class LockError(RuntimeError):
    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SaveLock:
    def __init__(self, root: str, stale_seconds: float):
        self.root, self.path, self.stale_seconds = root, os.path.join(root, LOCK_FILE), stale_seconds
        self.token = uuid.uuid4().hex
        self.record = {"job_id": os.environ.get("SLURM_JOB_ID"), "host": socket.gethostname(),
                       "pid": os.getpid(), "token": self.token}
        self._stop = threading.Event()
        self._thread = None

    def _read(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treated as stale

    def _write_tmp(self) -> str:
        tmp = f"{self.path}.{self.token}"
        with open(tmp, "w") as f:
            json.dump({**self.record, "heartbeat": time.time()}, f)
        return tmp

    def _write(self) -> None:
        os.replace(self._write_tmp(), self.path)

    def _stale_reason(self, owner: dict):
        """Why `owner` no longer holds the lock, or None when it does."""
        if not owner or "heartbeat" not in owner:
            return "the lock file is unreadable"
        if self.record["job_id"] and owner.get("job_id") == self.record["job_id"]:
            return f"it is this Slurm job's own lock ({self.record['job_id']}, requeued)"
        if owner.get("host") == self.record["host"] and not _pid_alive(int(owner.get("pid", -1))):
            return f"its pid {owner.get('pid')} is gone"
        age = time.time() - float(owner["heartbeat"])
        if age > self.stale_seconds:
            return f"its heartbeat is {age:.0f} s old (> --save-lock-stale-seconds {self.stale_seconds:g})"
        return None

    @staticmethod
    def describe(owner: dict) -> str:
        return (f"job {owner.get('job_id') or '(no Slurm job id)'} on host {owner.get('host')}, pid {owner.get('pid')}, "
                f"heartbeat {time.time() - float(owner.get('heartbeat', 0)):.0f} s ago")

    def acquire(self) -> str:
        """Takes the lock; returns a note to print (a take-over) or ''; LockError when another job holds it."""
        os.makedirs(self.root, exist_ok=True)
        note, tmp = "", self._write_tmp()
        try:
            os.link(tmp, self.path)  # atomic: creates the lock, complete, only if there is none
            os.remove(tmp)
        except FileExistsError:
            os.remove(tmp)
            owner = self._read() or {}
            reason = self._stale_reason(owner)
            if reason is None:
                raise LockError(f"--save {self.root} is in use by {self.describe(owner)}: stop that job or choose "
                                f"another --save (its lock {self.path} goes stale {self.stale_seconds:g} s after its "
                                "last heartbeat)") from None
            note = f"taking over the save lock {self.path} of {self.describe(owner)}: {reason}"
            self._write()
        if (self._read() or {}).get("token") != self.token:
            raise LockError(f"--save {self.root}: another job took the lock {self.path} at the same moment; "
                            "run one job per --save")
        self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="save-lock-heartbeat")
        self._thread.start()
        return note

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.stale_seconds / 10):
            if self.owned():
                self._write()

    def owned(self) -> bool:
        return (self._read() or {}).get("token") == self.token

    def check_owned(self) -> None:
        if not self.owned():
            owner = self._read() or {}
            raise LockError(f"--save {self.root}: this job lost its save lock to {self.describe(owner)}; "
                            "not saving over another job's checkpoints")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.owned():
            os.remove(self.path)
