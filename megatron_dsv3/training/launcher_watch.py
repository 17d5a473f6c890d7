"""Ranks end when their launcher (torchrun's agent) dies, instead of training on unsupervised.

torchrun starts each rank in its own session, so killing the launcher leaves them running (and saving,
while a requeued job may start on the same --save). Under torchrun (TORCHELASTIC_RUN_ID set) each rank
asks Linux for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG) and, as a fallback for platforms
without prctl or a parent that exits from another thread, a daemon thread polls the parent pid.
SIGKILL, not the preemption SIGTERM: a rank must not start a save its peers may never join. The last
checkpoint is safe: saves are staged in iter_N.tmp and renamed only when complete, so a kill at any
moment leaves the previous checkpoint and the marker as they were.
"""

import ctypes
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1  # linux/prctl.h
POLL_SECONDS = 1.0


def _kill_self() -> None:
    print(f"rank pid {os.getpid()}: launcher (pid {_parent}) died; stopping", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(parent: int) -> None:
    while not threading.Event().wait(POLL_SECONDS):
        if os.getppid() != parent:
            _kill_self()


_parent = None


def watch_launcher() -> None:
    """Call once per rank, early. Does nothing outside torchrun (a plain `python` run may outlive its shell)."""
    global _parent
    if _parent is not None or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    _parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != _parent:  # died before prctl took effect
        _kill_self()
    threading.Thread(target=_watch, args=(_parent,), daemon=True, name="launcher-watch").start()
