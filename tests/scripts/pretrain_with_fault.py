"""pretrain_dsv3.py with one injected fault at iteration FAULT_ITERATION:
FAULT=nan (the loss turns NaN), FAULT=signal (SIGUSR1 arrives during the step, as Slurm sends it) or
FAULT=enospc / FAULT=erofs (while the checkpoint of that iteration is written, part of a shard, then the disk
is full / the file system turns read-only).

    FAULT=nan FAULT_ITERATION=3 torchrun ... tests/scripts/pretrain_with_fault.py [pretrain flags]
"""

import errno
import os
import signal
import sys

from megatron_dsv3.checkpointing import checkpoint

from megatron_dsv3.training import train
from megatron_dsv3.training.arguments import parse_args

FAULT, FAULT_ITERATION = os.environ["FAULT"], int(os.environ["FAULT_ITERATION"])
state = {"iteration": 0}
original_step, original_loss = train.train_step, train.loss_func


def step_with_fault(*args, **kwargs):
    state["iteration"] += 1
    if FAULT == "signal" and state["iteration"] == FAULT_ITERATION:
        os.kill(os.getpid(), signal.SIGUSR1)
    return original_step(*args, **kwargs)


def loss_with_fault(loss_mask, output_tensor):
    loss, reported = original_loss(loss_mask, output_tensor)
    if FAULT == "nan" and state["iteration"] == FAULT_ITERATION:
        loss = loss * float("nan")
    return loss, reported


def save_with_full_disk(state, path, *args, **kwargs):
    if state["iteration"] != FAULT_ITERATION:
        return original_save(state, path, *args, **kwargs)
    with open(os.path.join(path, "__0_0.distcp"), "wb") as f:
        f.write(b"\0" * 1000)
    code = {"enospc": errno.ENOSPC, "erofs": errno.EROFS}[FAULT]
    raise OSError(code, os.strerror(code), os.path.join(path, "__0_0.distcp"))


original_save = checkpoint.dist_checkpointing.save


class _FullDisk:
    """dist_checkpointing with its save replaced (the module object is shared with megatron-core)."""

    def __getattr__(self, name):
        return save_with_full_disk if name == "save" else getattr(original_dist_checkpointing, name)


original_dist_checkpointing = checkpoint.dist_checkpointing

if __name__ == "__main__":  # checkpoint writers re-import this file in a spawned process
    train.train_step, train.loss_func = step_with_fault, loss_with_fault
    if FAULT in ("enospc", "erofs"):
        checkpoint.dist_checkpointing = _FullDisk()
    train.pretrain(parse_args(sys.argv[1:]))
