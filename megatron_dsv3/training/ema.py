"""EMA of the parameters in host memory, updated in a background thread (DeepSeek-V3 §3.2.3).

`--ema-decay D` (off by default) keeps, per rank, an FP32 copy in CPU memory of that rank's own parameters,
    ema ← D·ema + (1 − D)·p        after every successful optimizer step (a skipped step leaves it as is),
computed as torch._foreach_lerp_(ema, p, 1 − D) (ema + (1 − D)(p − ema), the same value up to FP32 rounding).

p is the model parameter (bf16 under --bf16), not the optimizer's FP32 master weight: it is the tensor the
checkpoint, the evaluation and the converter use, so the EMA takes its names, TP/PP/EP sharding and DP replica
ids (an EMA entry is its weight's entry with another key), and every rank holds all of its model parameters
(the distributed optimizer's masters are flat DP shards that map to no weight). Since
|bf16(m) − m| ≤ ulp(m)/2 and the EMA is a convex combination, averaging the rounded weights moves the result
by at most half a bf16 ulp from the EMA of the masters; in FP32 training they are the same tensors. The
parameters are final when optimizer.step() returns (megatron-core gathers them there unless
overlap_param_gather, which this trainer leaves off).

On the training path each step costs one device-to-host copy of the parameters (asynchronous copies into
pinned host staging buffers, queued on the current stream); the update itself runs in a background thread while
the next step trains, and is waited for (if still running) only before the next copy reuses the staging
buffers, and before the EMA is read (save, close). No accelerator memory is used.
"""

import argparse
import contextlib
import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, Iterable, Optional, Tuple

import torch

# lerp needs FP32 on both sides: bf16 staging buffers are widened a group of at most this many FP32 bytes at a
# time (or one tensor, if larger), so the transient host memory does not grow with the rank's parameter count.
WIDEN_GROUP_BYTES = 256 * 2**20


def add_ema_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("EMA")
    g.add_argument("--ema-decay", type=float, default=None,
                   help="keep an exponential moving average of the parameters in CPU memory, "
                        "ema = D*ema + (1-D)*p after every optimizer step (off when unset; e.g. 0.999); "
                        "evaluations then also report the EMA's loss (split NAME-ema)")


def validate_ema_args(args) -> None:
    """Raises ValueError (one line naming the flag and the fix)."""
    decay = args.ema_decay
    if decay is not None and not 0.0 < decay < 1.0:
        raise ValueError(f"--ema-decay {decay} is outside (0, 1); use a decay such as 0.999, or drop the flag")


class HostEMA:
    """EMA of named parameters (a rank's own), held in FP32 host memory, updated asynchronously."""

    def __init__(self, named_params: Iterable[Tuple[str, torch.Tensor]], decay: float):
        validate_ema_args(argparse.Namespace(ema_decay=decay))
        self.decay = decay
        named = list(named_params)
        self.names, self.params = tuple(n for n, _ in named), tuple(p for _, p in named)
        pin = torch.cuda.is_available()
        self.ema = [p.detach().to("cpu", torch.float32, copy=True) for p in self.params]
        self._staging = [torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=pin) for p in self.params]
        self._groups = _groups_of_bytes(range(len(self.params)), lambda i: self.params[i].numel() * 4,
                                        WIDEN_GROUP_BYTES)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="ema")
        self._pending: Optional[Future] = None

    def update(self) -> None:
        """After an optimizer step: copy the parameters to host (the one copy on the training path) and start
        the EMA update in the background thread."""
        self.wait()  # the previous update still reads the staging buffers
        with torch.no_grad():
            torch._foreach_copy_(self._staging, [p.detach() for p in self.params], non_blocking=True)
        copied = torch.cuda.Event() if torch.cuda.is_available() else None
        if copied is not None:
            copied.record()
        self._pending = self._worker.submit(self._lerp, copied)

    def _lerp(self, copied) -> None:
        if copied is not None:
            copied.synchronize()
        with torch.no_grad():
            for group in self._groups:
                torch._foreach_lerp_([self.ema[i] for i in group], [self._staging[i].float() for i in group],
                                     1.0 - self.decay)

    def wait(self) -> None:
        """Until the last update has finished (before reading or saving the EMA)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def state_dict(self) -> Dict[str, torch.Tensor]:
        self.wait()
        return dict(zip(self.names, self.ema))

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.wait()
        missing = set(self.names) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match this rank's parameters: {sorted(missing)[:3]}")
        for name, ema in zip(self.names, self.ema):
            ema.copy_(state[name])

    @contextlib.contextmanager
    def swapped_in(self):
        """The EMA in the parameters' place (to evaluate it), the live weights back after: exact, from a host
        copy in their own dtype."""
        self.wait()
        with torch.no_grad():
            live = [p.detach().to("cpu", copy=True) for p in self.params]
            for param, ema in zip(self.params, self.ema):
                param.copy_(ema)
            try:
                yield
            finally:
                for param, saved in zip(self.params, live):
                    param.copy_(saved)

    def host_bytes(self) -> int:
        """Host bytes the EMA holds: the FP32 averages plus the staging copies."""
        return sum(t.numel() * t.element_size() for t in (*self.ema, *self._staging))

    def close(self) -> None:
        self.wait()
        self._worker.shutdown()


def _groups_of_bytes(items, nbytes, limit: int) -> list:
    """Consecutive groups of `items` whose `nbytes` add up to at most `limit` (an item over it: alone)."""
    groups, size = [], 0
    for item in items:
        if not groups or size + nbytes(item) > limit:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += nbytes(item)
    return groups


def build_ema(args, chunks) -> Optional[HostEMA]:
    """The EMA of this rank's parameters of `chunks` (names: chunk index, then the module's own name), or None."""
    if args.ema_decay is None:
        return None
    return HostEMA([(f"{i}/{n}", p) for i, c in enumerate(chunks) for n, p in c.module.named_parameters()],
                   args.ema_decay)


EMA_KEY_PREFIX = "ema/"


def ema_sharded_state_dict(ema: HostEMA, model_states: Dict[int, dict]) -> dict:
    """The EMA as torch_dist entries: each parameter's model entry (ShardedTensor or factory: its global key,
    offsets, replica ids) with the EMA tensor as data and the key prefixed by `ema/`, so the EMA reshards like the
    weights and a converter reads it by that prefix. `model_states`: chunk index -> its sharded_state_dict."""
    tensors = ema.state_dict()
    state = {}
    for index, model_state in model_states.items():
        for name, entry in model_state.items():
            data = tensors.get(f"{index}/{name}")
            if data is not None:
                dtype = {"dtype": data.dtype} if hasattr(entry, "dtype") else {}  # ShardedTensor: FP32, not bf16
                state[f"{index}/{name}"] = dataclasses.replace(entry, key=EMA_KEY_PREFIX + entry.key, data=data,
                                                               **dtype)
    missing = set(tensors) - set(state)
    if missing:
        raise RuntimeError(f"EMA parameters without a checkpoint entry: {sorted(missing)[:3]}")
    return state


def ema_host_bytes(ema: Optional[HostEMA]) -> int:
    """For the memory benchmark: host bytes of the EMA (0 when off); it holds no accelerator memory."""
    return ema.host_bytes() if ema is not None else 0
