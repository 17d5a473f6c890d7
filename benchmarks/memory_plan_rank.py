"""pretrain_dsv3.py with its memory measured from the tensors themselves; each rank writes OUT_DIR/rank{R}.json
(benchmarks/memory_plan.py launches it and prints the table).

    torchrun --nproc-per-node N benchmarks/memory_plan_rank.py OUT_DIR [pretrain flags]

Bytes, after the last training step (the step the activations are metered in):
  weights          distinct parameters (numel x element size; a shared embedding once)
  main_grads       their fp32 gradient-accumulation buffers (`param.main_grad`)
  optimizer        every tensor of the optimizer's state (Adam m, v, step) and the parameters it updates that
                   are copies, not views, of the model's (fp32 master weights)
  activations      peak over the step's forwards and backwards of what is held for backward
                   (pipeline.recording.SavedActivationMeter.resident_bytes, sampled after every forward_step and
                   before every backward_step of the schedule): tensors autograd saved, at their size now (so the
                   outputs recompute frees count 0), plus the schedule's stash and in-flight send buffers
  activations_saved  the meter's own peak (each storage at its size when saved: blind to recompute's freeing)
  weight_grad_store  DualPipe's B ops' deferred weight-gradient operands (WeightGradStore.peak_bytes), not in the
                   above
  ema_host         host bytes of the EMA (training.ema.HostEMA: FP32 averages + staging), 0 without --ema-decay
Per logged iteration: lm loss (the trainer's reduced metric) and step time (the trainer's, EMA update included).
The meter's saved-tensor hooks change what DualPipe's stage-0 B ops defer, so only the last step is metered: every
logged loss comes from a forward before it.
"""

import json
import os
import sys

import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dsv3.pipeline import dualpipe
from megatron_dsv3.pipeline.recording import SavedActivationMeter, storage_key
from megatron_dsv3.training import train
from megatron_dsv3.training.arguments import parse_args
from megatron_dsv3.training.ema import ema_host_bytes


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Measurement:
    def __init__(self, args):
        self.args, self.steps, self.ema = args, 0, None
        self.report = {"iterations": []}
        self.meter = None
        self.resident_peak = 0

    def build_ema(self, args, chunks):
        self.ema = original["build_ema"](args, chunks)
        return self.ema

    def sample(self):
        if self.meter is not None:
            self.resident_peak = max(self.resident_peak, self.meter.resident_bytes())

    def forward_step(self, *a, **k):
        result = original["forward_step"](*a, **k)
        self.sample()
        return result

    def backward_step(self, *a, **k):
        self.sample()
        return original["backward_step"](*a, **k)

    def train_step(self, args, chunks, optimizer, *rest):
        self.steps += 1
        if self.steps < args.train_iters:
            return original["train_step"](args, chunks, optimizer, *rest)
        params = list({id(p): p for chunk in chunks for p in chunk.parameters()}.values())
        grads = [p.main_grad for p in params]
        self.meter = SavedActivationMeter(params + grads)
        with self.meter:
            result = original["train_step"](args, chunks, optimizer, *rest)
        excluded = self.meter.excluded_storages
        torch_optimizers = [sub.optimizer for sub in getattr(optimizer, "chained_optimizers", [optimizer])]
        state = [t for opt in torch_optimizers for s in opt.state.values() for t in s.values() if hasattr(t, "numel")]
        masters = [p for opt in torch_optimizers for g in opt.param_groups for p in g["params"]
                   if storage_key(p) not in excluded]
        self.report.update(
            rank=dist.get_rank(),
            pipeline_rank=parallel_state.get_pipeline_model_parallel_rank(),
            weights=tensor_bytes(params),
            main_grads=tensor_bytes(grads),
            optimizer=tensor_bytes(state) + tensor_bytes(masters),
            activations=self.resident_peak,
            activations_saved=self.meter.peak,
            weight_grad_store=dualpipe.LAST_TRACE["weight_grad_peak_bytes"],
        )
        self.meter = None
        return result

    def log(self, logger, iteration, chunks, **kwargs):
        metrics = original["log"](logger, iteration, chunks, **kwargs)
        self.report["iterations"].append({"lm_loss": metrics["lm_loss"], "step_time_s": metrics["step_time_s"]})
        return metrics


original = {"build_ema": train.build_ema, "train_step": train.train_step, "log": train.MetricsLogger.log,
            "forward_step": dualpipe.forward_step, "backward_step": dualpipe.backward_step}


def main():
    out_dir, argv = sys.argv[1], sys.argv[2:]
    args = parse_args(argv)
    m = Measurement(args)
    train.build_ema, train.train_step = m.build_ema, m.train_step
    train.MetricsLogger.log = lambda logger, iteration, chunks, **kw: m.log(logger, iteration, chunks, **kw)
    dualpipe.forward_step, dualpipe.backward_step = m.forward_step, m.backward_step
    rank = int(os.environ.get("RANK", "0"))
    train.pretrain(args)
    m.report["ema_host"] = ema_host_bytes(m.ema)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(m.report, f)


if __name__ == "__main__":
    main()
