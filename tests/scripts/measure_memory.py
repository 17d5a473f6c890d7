"""pretrain_dsv3.py whose first training step is measured; each rank appends one JSON line to MEMORY_REPORT.

Bytes measured on the rank (what the planner's `estimate_memory` models, tensor by tensor):
  weights      the model's parameters (numel x element size)
  main_grads   their fp32 gradient-accumulation buffers (`param.main_grad`)
  optimizer    after the step: every tensor of the optimizer's state (Adam m, v, step) and the parameters it
               updates that are copies, not views, of the model's (fp32 master weights)
  activations  the peak, over the step's forwards and backwards, of the bytes of tensors autograd keeps for the
               backward (pipeline.recording.SavedActivationMeter): each storage once, from the first pack until
               autograd releases the last packed reference; parameters and gradient buffers excluded

    MEMORY_REPORT=out.jsonl torchrun --nproc-per-node 1 tests/scripts/measure_memory.py --train-iters 1 ...
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from megatron_dsv3.pipeline.recording import SavedActivationMeter, storage_key
from megatron_dsv3.training import train
from megatron_dsv3.training.arguments import parse_args

original_step = train.train_step


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measured_step(args, chunks, optimizer, *rest):
    params = [p for chunk in chunks for p in chunk.parameters()]
    grads = [p.main_grad for p in params]
    with SavedActivationMeter(params + grads) as saved:
        result = original_step(args, chunks, optimizer, *rest)
    excluded = saved.excluded_storages
    torch_optimizers = [sub.optimizer for sub in getattr(optimizer, "chained_optimizers", [optimizer])]
    state = [t for opt in torch_optimizers for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    masters = [p for opt in torch_optimizers for g in opt.param_groups for p in g["params"]
               if storage_key(p) not in excluded]
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
