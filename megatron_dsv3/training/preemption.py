"""When to stop early: Slurm's preemption signal, --exit-interval, --exit-duration-in-mins.

On SIGTERM or SIGUSR1 (`#SBATCH --signal=B:USR1@300`) the current step finishes, a checkpoint is
saved and the process exits with EXIT_CODE_REQUEUE, which the sbatch scripts turn into
`scontrol requeue`. All ranks agree on stopping through one all-reduce per step.
"""

import signal
import time

import torch
import torch.distributed as dist

EXIT_CODE_REQUEUE = 3
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopConditions:
    def __init__(self, args):
        self.args = args
        self.start = time.time()
        self.signal_received = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame):
        self.signal_received = signum

    def check(self, iteration: int):
        """After a step: None to go on, or why to stop ('signal', 'exit-interval', 'exit-duration')."""
        args = self.args
        local = [
            self.signal_received is not None,
            bool(args.exit_interval and iteration % args.exit_interval == 0),
            bool(args.exit_duration_in_mins and time.time() - self.start > 60 * args.exit_duration_in_mins),
        ]
        flags = torch.tensor(local, dtype=torch.int32, device=torch.cuda.current_device())  # NCCL: GPU tensors
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        for reason, raised in zip(("signal", "exit-interval", "exit-duration"), flags.tolist()):
            if raised:
                return reason
        return None
