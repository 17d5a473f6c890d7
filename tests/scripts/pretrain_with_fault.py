"""pretrain_dsv3.py with one injected fault at iteration FAULT_ITERATION:
FAULT=nan (the loss turns NaN) or FAULT=signal (SIGUSR1 arrives during the step, as Slurm sends it).

    FAULT=nan FAULT_ITERATION=3 torchrun ... tests/scripts/pretrain_with_fault.py [pretrain flags]
"""

import os
import signal
import sys

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


if __name__ == "__main__":  # checkpoint writers re-import this file in a spawned process
    train.train_step, train.loss_func = step_with_fault, loss_with_fault
    train.pretrain(parse_args(sys.argv[1:]))
