"""Measure a training step under any pipeline schedule: per-rank op spans and saved-activation memory.

`record_megatron_ops` times megatron-core's own schedules (1F1B, interleaved) the way `dualpipe` times itself:
one span dict (rank, kind, chunk, mb, start, end; the format `timeline.render_timeline` draws) per forward_step
(F) and backward_step (BW, a full backward), so p2p waits fall between spans, as idle. It wraps the two
functions in megatron's schedules module for the duration of the context.

`SavedActivationMeter` is what "activation memory" means in the benchmark: the bytes of the tensors autograd
saves for backward (torch.autograd.graph.saved_tensors_hooks), counted once per storage while any graph
still holds them, parameters (and any other tensors given, e.g. gradient buffers) excluded. It counts on CPU and GPU alike, does not include transient buffers
freed within an op, and includes the saved inputs of every stage's first op (the received activations).
`live`/`peak` count a storage at its size when first saved; `resident_bytes()` counts the held storages at their
size now (what the schedule alone holds, its stash and send buffers, at its size when acquired), which sees the outputs that output-discarding recompute (`--recompute-modules layernorm mla_up_proj`,
megatron's CheckpointWithoutOutput) frees after they were saved and rebuilds in the backward.
"""

import contextlib
import time
from typing import Dict, List, Optional, Tuple

import torch
from megatron.core.pipeline_parallel import schedules


def storage_key(tensor: torch.Tensor) -> int:
    """The identity of the storage object under `tensor` (shared by its views). Not its data address: a storage
    resized to 0 after it was saved (output-discarding recompute) keeps its identity while its address is reused
    by the next allocation, which is another storage."""
    return tensor.untyped_storage()._cdata


def storage_of(tensor: torch.Tensor) -> Optional[Tuple[int, int]]:
    """(storage_key, bytes) of the whole storage under `tensor`; None for meta or empty tensors (address 0)."""
    storage = tensor.untyped_storage()
    return (storage_key(tensor), storage.nbytes()) if storage.data_ptr() else None


class HeldStorageBytes:
    """Bytes of the distinct storages that holders keep alive: each storage counted once, whole, from its first
    `acquire` to its last `release`; `live` now, `peak` since made."""

    def __init__(self):
        self.holders: Dict[int, int] = {}  # storage key -> holders alive on it
        self.sizes: Dict[int, int] = {}  # storage key -> its bytes when first acquired, while held
        self.live = 0
        self.peak = 0

    def acquire(self, key: int, nbytes: int) -> None:
        count = self.holders.get(key, 0)
        self.holders[key] = count + 1
        if count == 0:
            self.sizes[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)

    def release(self, key: int, nbytes: int) -> None:
        self.holders[key] -= 1
        if self.holders[key] == 0:
            del self.holders[key], self.sizes[key]
            self.live -= nbytes


class SavedActivationMeter(HeldStorageBytes):
    """Live and peak bytes of saved-for-backward tensors (the holders) while the context is active; a schedule
    that keeps tensors alive for the backward outside autograd (dualpipe's stash of stage inputs and outputs)
    acquires and releases them on `SavedActivationMeter.active`, the meter of the innermost open context."""

    active: Optional["SavedActivationMeter"] = None

    def __init__(self, excluded):
        """`excluded`: tensors that are not activations (parameters, gradient buffers); saved views of them
        are not counted."""
        super().__init__()
        self.excluded_storages = {storage_key(t) for t in excluded}
        self.held_storages: Dict[int, torch.UntypedStorage] = {}  # storage key -> storage, while held
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self):
        self._hooks.__enter__()
        self._outer, SavedActivationMeter.active = SavedActivationMeter.active, self
        return self

    def __exit__(self, *exc):
        SavedActivationMeter.active = self._outer
        return self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor):
        storage = storage_of(tensor)
        if storage is None or storage[0] in self.excluded_storages:
            return tensor
        self.held_storages.setdefault(storage[0], tensor.untyped_storage())
        return _Saved(self, tensor, *storage)

    def release(self, key: int, nbytes: int) -> None:
        super().release(key, nbytes)
        if key not in self.holders:  # the schedule's own stash (acquire/release) is not in held_storages
            self.held_storages.pop(key, None)

    def resident_bytes(self) -> int:
        """Bytes of the held storages as they are now (a storage resized to 0 since it was saved counts 0; what
        only the schedule holds counts at its size when acquired)."""
        return sum(self.held_storages[a].nbytes() if a in self.held_storages else n for a, n in self.sizes.items())

    @staticmethod
    def _unpack(packed):
        return packed.tensor if isinstance(packed, _Saved) else packed


class _Saved:
    """A saved tensor; autograd drops it when its graph node is freed (after that node's backward)."""

    __slots__ = ("meter", "tensor", "key", "nbytes")

    def __init__(self, meter: SavedActivationMeter, tensor: torch.Tensor, key: int, nbytes: int):
        self.meter, self.tensor, self.key, self.nbytes = meter, tensor, key, nbytes
        meter.acquire(key, nbytes)

    def __del__(self):
        self.meter.release(self.key, self.nbytes)


@contextlib.contextmanager
def record_megatron_ops(chunks, rank: int, records: List[dict]):
    """Append a span dict to `records` for every forward_step / backward_step megatron's schedules run on
    `chunks` (the model chunks handed to the schedule; chunk = index in that list)."""
    chunk_of = {id(c): i for i, c in enumerate(chunks)}
    pending: Dict[int, tuple] = {}  # id(forward output) -> (chunk, mb), until its backward
    forward_step, backward_step = schedules.forward_step, schedules.backward_step

    def timed_forward(forward_step_func, data_iterator, model, *args, **kwargs):
        start = time.time()
        output, num_tokens = forward_step(forward_step_func, data_iterator, model, *args, **kwargs)
        chunk, mb = chunk_of[id(model)], kwargs["current_microbatch"]
        records.append(dict(rank=rank, kind="F", chunk=chunk, mb=mb, start=start, end=time.time()))
        pending[id(output)] = (chunk, mb)
        return output, num_tokens

    def timed_backward(input_tensor, output_tensor, *args, **kwargs):
        start = time.time()
        input_grad = backward_step(input_tensor, output_tensor, *args, **kwargs)
        chunk, mb = pending.pop(id(output_tensor))
        records.append(dict(rank=rank, kind="BW", chunk=chunk, mb=mb, start=start, end=time.time()))
        return input_grad

    schedules.forward_step, schedules.backward_step = timed_forward, timed_backward
    try:
        yield records
    finally:
        schedules.forward_step, schedules.backward_step = forward_step, backward_step
