"""pretrain_dsv3.py whose first training step is measured; each rank appends one JSON line to MEMORY_REPORT.

Bytes measured on the rank (what the planner's `estimate_memory` models, tensor by tensor):
  weights      the model's parameters (numel x element size)
  main_grads   their fp32 gradient-accumulation buffers (`param.main_grad`)
  optimizer    after the step: every tensor of the optimizer's state (Adam m, v, step) and the parameters it
               updates that are copies, not views, of the model's (fp32 master weights)
  activations  the peak, over the step's forwards and backwards, of the bytes of tensors autograd keeps for the
               backward (`torch.autograd.graph.saved_tensors_hooks`): each storage once, counted from the first
               pack until autograd releases the last packed reference; parameters and gradients excluded

    MEMORY_REPORT=out.jsonl torchrun --nproc-per-node 1 tests/scripts/measure_memory.py --train-iters 1 ...
"""

import json
import os
import sys
import weakref

import torch
import torch.distributed as dist

from megatron_dsv3.training import train
from megatron_dsv3.training.arguments import parse_args

original_step = train.train_step


class Packed:
    """What autograd keeps instead of a saved tensor; its release frees the tensor."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


class SavedActivations:
    """Live bytes of the tensors autograd has saved, and their peak."""

    def __init__(self, excluded_storages):
        self.excluded = excluded_storages
        self.refs = {}  # storage pointer -> packed references alive
        self.live = self.peak = 0

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.excluded or tensor.device.type == "meta":
            return tensor
        if not self.refs.get(key):
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] = self.refs.get(key, 0) + 1
        packed = Packed(tensor)
        weakref.finalize(packed, self._release, key, storage.nbytes())
        return packed

    def _release(self, key, nbytes):
        self.refs[key] -= 1
        if not self.refs[key]:
            self.live -= nbytes

    @staticmethod
    def unpack(packed):
        return packed.tensor if isinstance(packed, Packed) else packed


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measured_step(args, chunks, optimizer, *rest):
    params = [p for chunk in chunks for p in chunk.parameters()]
    grads = [p.main_grad for p in params]
    excluded = {t.untyped_storage().data_ptr() for t in params + grads}
    saved = SavedActivations(excluded)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        result = original_step(args, chunks, optimizer, *rest)
    torch_optimizers = [sub.optimizer for sub in getattr(optimizer, "chained_optimizers", [optimizer])]
    state = [t for opt in torch_optimizers for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    masters = [p for opt in torch_optimizers for g in opt.param_groups for p in g["params"]
               if p.untyped_storage().data_ptr() not in excluded]
    report = {
        "rank": dist.get_rank(),
        "weights": tensor_bytes(params),
        "main_grads": tensor_bytes(grads),
        "optimizer": tensor_bytes(state) + tensor_bytes(masters),
        "activations": saved.peak,
    }
    with open(os.environ["MEMORY_REPORT"], "a") as f:
        f.write(json.dumps(report) + "\n")
    return result


if __name__ == "__main__":
    train.train_step = measured_step
    train.pretrain(parse_args(sys.argv[1:]))
