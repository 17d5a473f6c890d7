"""DeepSeek-V3's overlapped F&B pair (§3.2.1, Fig. 4): the expert all-to-all of one micro-batch runs while the
other micro-batch computes.

An MoE layer's forward is ATTN → DISPATCH (all-to-all) → MLP → COMBINE (all-to-all); its backward runs the same
pieces in reverse (COMBINE grad, MLP B, DISPATCH grad, ATTN B). `run_pair` runs the forward half of an FB op and
its backward half as two threads that hold a baton in turn: each half computes until it has posted an
all-to-all (asynchronous, `async_op=True`), then hands the baton over and waits for it to come back before it
waits for its transfer. The two halves alternate piece by piece,

    F: ATTN  [DISPATCH in flight]            MLP   [COMBINE in flight]           ATTN ...
    B:        COMBINE-grad-side compute       ... [COMBINE grad in flight]  MLP B  ...

so each transfer hides behind the other half's compute. The dispatchers post every token all-to-all through
`exchange` (moe.token_dispatcher); outside a pair it is a plain blocking all-to-all.

Only one half runs at a time, so both halves post their collectives in an order fixed by the layer structure:
every rank of an expert-parallel group runs the same chunks, hence the same order, which gloo and NCCL need.
The backward half may run in autograd's own thread (CUDA): the baton is module state, not thread-local, and the
half that posts a transfer is always the holder.

Records (`PairRecord`): each half's compute spans between hand-overs and each transfer's posted / waited /
completed times; `exposed` is the time a half still waited for its transfer after getting the baton back, the
communication the overlap did not hide. On GPUs (NCCL) `work.wait()` only makes the compute stream wait, so the
hand-overs order the kernel launches (the other half's kernels are queued while the transfer runs on NCCL's
stream) and these times are host-side: measure the device overlap with a profiler.
"""

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

FORWARD, BACKWARD = 0, 1
HALF_NAMES = ("F", "B")


@dataclass
class PairRecord:
    """Spans of one FB op: compute per half, and every transfer it posted."""

    compute: List[dict] = field(default_factory=list)  # half, start, end
    transfers: List[dict] = field(default_factory=list)  # half, label, posted, resumed, done


class _Pair:
    def __init__(self):
        self.cond = threading.Condition()
        self.holder = FORWARD
        self.done = [False, False]
        self.errors: List[BaseException] = []
        self.record = PairRecord()
        self.span_start = time.time()

    def _close_span(self) -> None:
        now = time.time()
        self.record.compute.append(dict(half=HALF_NAMES[self.holder], start=self.span_start, end=now))
        self.span_start = now

    def _hand_over(self) -> None:
        """Give the baton to the other half (if it still runs) and block until it is ours again."""
        me = self.holder
        with self.cond:
            if self.done[1 - me]:
                return
            self._close_span()
            self.holder = 1 - me
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.holder == me)
            self.span_start = time.time()

    def wait(self, work, label: str) -> None:
        me, posted = self.holder, time.time()
        self._hand_over()
        resumed = time.time()
        work.wait()
        self.record.transfers.append(dict(half=HALF_NAMES[me], label=label, posted=posted, resumed=resumed,
                                          done=time.time()))

    def run_half(self, half: int, fn: Callable[[], None], device: Optional[torch.device]) -> None:
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)  # the current device is per thread
        with self.cond:
            self.cond.wait_for(lambda: self.holder == half)
            self.span_start = time.time()
        try:
            fn()
        except BaseException as error:  # re-raised by run_pair once both halves stopped
            self.errors.append(error)
        finally:
            with self.cond:
                self._close_span()
                self.done[half] = True
                self.holder = 1 - half
                self.cond.notify_all()


_active: Optional[_Pair] = None


def run_pair(forward: Callable[[], None], backward: Callable[[], None],
             device: Optional[torch.device] = None) -> PairRecord:
    """Run `forward` (in this thread: thread-local state such as saved-tensor hooks applies to it) and
    `backward` (in a helper thread), alternating at every all-to-all; returns the pair's spans."""
    global _active
    if _active is not None:
        raise RuntimeError("an overlapped F&B pair is already running")
    pair = _active = _Pair()
    helper = threading.Thread(target=pair.run_half, args=(BACKWARD, backward, device), name="fb-backward")
    try:
        helper.start()
        pair.run_half(FORWARD, forward, device)
        helper.join()
    finally:
        _active = None
    if pair.errors:
        raise pair.errors[0]
    return pair.record


def wait(work, label: str) -> None:
    """Wait for an async collective; inside an F&B pair, let the other half compute while it is in flight."""
    if _active is None:
        work.wait()
    else:
        _active.wait(work, label)
