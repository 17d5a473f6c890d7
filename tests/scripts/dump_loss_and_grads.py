"""One global batch of the tiny model through the real training code (any layout); rank files hold
the loss and every gradient under its global name, for comparison with a single-process run, and, under
megatron's schedules, the bytes autograd holds for backward when the first backward starts (`saved_bytes`:
micro-batch 0's graph at PP=1; pipeline.recording.SavedActivationMeter.resident_bytes).

    torchrun --nproc-per-node N tests/scripts/dump_loss_and_grads.py OUT_DIR [pretrain flags]
"""

import re
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import schedules

from megatron_dsv3.pipeline.recording import SavedActivationMeter
from megatron_dsv3.training.arguments import parse_args
from megatron_dsv3.training import train


def global_grads(chunks) -> dict:
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    grads = {}
    num_local = chunks[0].module.config.num_moe_experts // parallel_state.get_expert_model_parallel_world_size()
    for chunk in chunks:
        module = chunk.module
        layers = module.decoder.layers if hasattr(module, "decoder") else []
        for name, param in module.named_parameters():
            match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
            if match:
                name = f"decoder.layers.{layers[int(match[1])].layer_number - 1}.{match[2]}"
            expert = re.search(r"local_experts\.(\d+)\.", name)
            if expert:
                local = int(expert[1])
                name = name.replace(f"local_experts.{local}.", f"local_experts.{ep_rank * num_local + local}.")
            grads[name] = param.main_grad.detach().clone()
    return grads


def main():
    out_dir, argv = sys.argv[1], sys.argv[2:]
    args = parse_args(argv + ["--train-iters", "1", "--clip-grad", "0"])
    args.lr = args.min_lr = 0.0  # the step leaves the weights as they are (the CLI refuses --lr 0)
    captured = {}
    meter = None
    original_step = train.train_step
    original_backward = schedules.backward_step

    def backward_and_measure(*args, **kwargs):
        captured.setdefault("saved_bytes", meter.resident_bytes())
        return original_backward(*args, **kwargs)

    def step_and_capture(args, chunks, optimizer, scheduler, data_iterator, config):
        nonlocal meter
        params = [p for chunk in chunks for p in chunk.parameters()]
        meter = SavedActivationMeter(params + [p.main_grad for p in params])
        schedules.backward_step = backward_and_measure
        try:
            with meter:
                result = original_step(args, chunks, optimizer, scheduler, data_iterator, config)
        finally:
            schedules.backward_step = original_backward
        captured["loss"], captured["grads"] = result[0], global_grads(chunks)
        return result

    train.train_step = step_and_capture
    train.initialize_distributed(args)
    rank = dist.get_rank()
    try:
        train._pretrain(args)
        torch.save(captured, f"{out_dir}/rank{rank}.pt")
    finally:
        train.destroy_distributed()


if __name__ == "__main__":
    main()
