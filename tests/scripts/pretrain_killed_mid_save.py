"""pretrain_dsv3.py killed with SIGKILL in the middle of its checkpoint save at iteration KILL_AT_SAVE: every rank
has written its shards into the staging directory iter_N.tmp, and rank 0 dies before the checkpoint's metadata,
the rename to iter_N and the latest marker. As in a node failure its helper processes (the checkpoint writer's
multiprocessing manager) die with it, or they would keep the job's output open.

    KILL_AT_SAVE=4 torchrun ... tests/scripts/pretrain_killed_mid_save.py --save DIR --save-interval 2 ...
"""

import multiprocessing
import os
import signal
import sys

from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

from megatron_dsv3.training import train
from megatron_dsv3.training.arguments import parse_args

KILL_AT_SAVE = int(os.environ["KILL_AT_SAVE"])
original_finish = FileSystemWriterAsync.finish


def finish_or_die(self, metadata, results):
    """The coordinator's last write of a torch_dist save (the .metadata file), after all shards are on disk."""
    if os.path.basename(str(self.checkpoint_dir)) == f"iter_{KILL_AT_SAVE:07d}.tmp":
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    return original_finish(self, metadata, results)


if __name__ == "__main__":  # checkpoint writers re-import this file in a spawned process
    FileSystemWriterAsync.finish = finish_or_die
    train.pretrain(parse_args(sys.argv[1:]))
