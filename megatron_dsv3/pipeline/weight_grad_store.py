"""DeepSeek's WeightGradStore: a linear layer's backward split into input-grad (B) and weight-grad (W).

DualPipe (DeepSeek-V3 §3.2.1) runs part of its backwards as B, dL/dx only, so the gradient reaches the previous
stage sooner, and their weight-gradient GEMMs later as W ops, in the pipeline's bubbles. Autograd cannot walk
one graph in two halves, so the linear layers split themselves: for y = x·Wᵀ + b their backward computes
dL/dx = dL/dy·W and dL/db = Σ_tokens dL/dy, and, while a B op has a store open, queues dL/dW = dL/dyᵀ·x as a
closure (holding dL/dy and x) instead of returning it. Every other parameter (norms, router, embedding, output
head, biases) gets its gradient in B, as in DeepSeek's DualPipe. The split linears are megatron's
ColumnParallelLinear/RowParallelLinear with `_forward_impl` replaced (SplitBackwardMatmul; the emulated FP8
linears too); the spec builds DualPipe/DualPipeV chunks with them (config.split_weight_grad).

A W op runs the closures of the oldest B (FIFO, schedule_plan's order). A closure adds dL/dW to
`param.main_grad` when megatron's DDP wraps the model (what its grad hook does with `param.grad`,
DistributedDataParallel._make_backward_post_hook; that hook sees no gradient in B, so megatron's
overlap_grad_reduce, which asserts one, stays off, as everywhere in this project), else to `param.grad`.
Outside a B op (BW, FB, megatron's schedules) dL/dW goes back to autograd at once.

The open store is module state, not thread-local: on GPUs autograd runs backward functions in its own threads.

Memory (`live_bytes`, `peak_bytes`): a queued closure keeps dL/dy and x alive from its B to its W, past the point
where autograd frees them, and recording.SavedActivationMeter does not see them. Closures declare what they hold
(`weight_grad(..., holds=...)`); the store counts each distinct storage once, whole, while a pending closure holds
it. The count grows only in B ops, so the peak falls at the end of one, after autograd freed that B's graph:
memory the B/W split adds on top of the saved activations (storages shared with other live tensors are not told
apart).
"""

import contextlib
from collections import deque
from typing import Callable, Hashable, Iterable, Optional

import torch
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

from megatron_dsv3.models.torch_linear import TorchColumnParallelLinear, TorchRowParallelLinear
from megatron_dsv3.pipeline.recording import HeldStorageBytes, storage_of

_open: Optional["WeightGradStore"] = None  # the store of the B op now running backward


class WeightGradStore:
    """One step's deferred weight-gradients: a FIFO of B ops, each with its queued closures, and the bytes the
    queued closures hold (`live_bytes` now, `peak_bytes` since the store was made)."""

    def __init__(self):
        self._pending = deque()  # (key, [(closure, storages it holds), ...]) per B op, oldest first
        self._held = HeldStorageBytes()  # the holders: pending closures

    @contextlib.contextmanager
    def input_grad_only(self, key: Hashable):
        """B of `key` (e.g. (chunk, micro-batch)): backwards run inside queue their weight-gradients here."""
        global _open
        if _open is not None:
            raise RuntimeError("a B op is already deferring weight-gradients")
        self._pending.append((key, []))
        _open = self
        try:
            yield
        finally:
            _open = None

    def _queue(self, closure: Callable[[], None], holds: Iterable[torch.Tensor]) -> None:
        """Queue `closure` for the W of the open B; it holds the storages of `holds` until it has run."""
        storages = {storage for storage in map(storage_of, holds) if storage}  # once however many views
        for storage in storages:
            self._held.acquire(*storage)
        self._pending[-1][1].append((closure, storages))

    @property
    def live_bytes(self) -> int:
        return self._held.live

    @property
    def peak_bytes(self) -> int:
        return self._held.peak

    def flush(self, key: Hashable) -> None:
        """W of `key`: run the weight-gradients of the oldest B, which must be `key`'s; each closure is dropped
        (and what it holds released) once it has run."""
        oldest = self._pending[0][0] if self._pending else None
        if oldest != key:
            raise RuntimeError(f"W{key} runs while the oldest deferred B is {oldest}")
        queued = self._pending.popleft()[1]
        queued.reverse()  # pop() from the end runs them in queue order
        with torch.no_grad():  # as in autograd's backward: the saved activations may require grad
            while queued:
                closure, storages = queued.pop()
                closure()
                del closure
                for storage in storages:
                    self._held.release(*storage)

    def check_empty(self) -> None:
        if self._pending:
            raise RuntimeError(f"weight-gradients of B ops {[k for k, _ in self._pending]} never ran")


def _accumulate(param: torch.Tensor, grad: torch.Tensor) -> None:
    if hasattr(param, "main_grad"):  # megatron DDP's gradient buffer
        param.main_grad.add_(grad)
    elif param.grad is None:
        param.grad = grad
    else:
        param.grad += grad


def weight_grads(weights, compute: Callable[[], Iterable[torch.Tensor]], *, holds: Iterable[torch.Tensor]) -> list:
    """dL/dW of `weights` in an autograd backward, all given by one `compute()` (in order): now, or, while a B op
    is open, Nones with `compute` queued for its W (leaf weights only: a non-leaf one's gradient must flow on in
    B). `holds`: the tensors `compute` keeps alive (dL/dy, x; not the weights), whose storages the store counts
    while the closure is pending."""
    if _open is None or not all(weight.is_leaf for weight in weights):
        return list(compute())

    def accumulate():
        for weight, grad in zip(weights, compute()):
            _accumulate(weight, grad)

    _open._queue(accumulate, holds)
    return [None] * len(weights)


def weight_grad(weight: torch.Tensor, compute: Callable[[], torch.Tensor], *,
                holds: Iterable[torch.Tensor]) -> Optional[torch.Tensor]:
    """`weight_grads` of one weight."""
    return weight_grads([weight], lambda: [compute()], holds=holds)[0]


class _Linear(torch.autograd.Function):
    """y = x·Wᵀ + b with megatron's GEMMs (LinearWithGradAccumulationAndAsyncCommunication without its
    communication, which the caller adds); dL/dW goes through `weight_grad`."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = torch.matmul(x, weight.t())
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy2d, x2d = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])  # tokens x features
        dw = (weight_grad(weight, lambda: dy2d.t().matmul(x2d), holds=(dy2d, x2d))
              if ctx.needs_input_grad[1] else None)
        return dy.matmul(weight), dw, dy2d.sum(0) if ctx.has_bias else None


class SplitBackwardMatmul:
    """Mixin for the parallel linears of models.torch_linear: the GEMMs of `_matmul`, whose weight-gradient a B op
    defers, in their local forward and, with tensor-parallel communication, in megatron's forward through
    `_forward_impl` (the column layer's all-reduce of dL/dx under TP)."""

    def _forward_impl(self, input, weight, bias, allreduce_dgrad, sequence_parallel, tp_group, **unused):
        if sequence_parallel:
            raise NotImplementedError(f"{type(self).__name__} does not support sequence parallelism")
        if allreduce_dgrad:  # identity forward, all-reduce of dL/dx backward
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        return self._matmul(input, weight, bias)

    def _matmul(self, input, weight, bias):
        return _Linear.apply(input, weight, bias)


class SplitColumnParallelLinear(SplitBackwardMatmul, TorchColumnParallelLinear):
    pass


class SplitRowParallelLinear(SplitBackwardMatmul, TorchRowParallelLinear):
    pass
