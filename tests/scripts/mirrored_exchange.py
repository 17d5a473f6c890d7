"""DualPipe's end-of-step exchange of mirrored-copy gradients on 2 CPU ranks, with gradients in fp64, fp32 and
bf16: each rank's two chunks (chunk 0 = stage r, chunk 1 = the copy of stage 1-r) get random gradients, the
exchange runs, and OUT_DIR/rank{r}.pt holds the gradients before and after.

    torchrun --nproc-per-node 2 tests/scripts/mirrored_exchange.py OUT_DIR
"""

import sys

import torch
import torch.distributed as dist

from megatron_dsv3.pipeline.dualpipe import _sum_mirrored_copies


def stage(seed: int) -> torch.nn.Module:
    """A stand-in stage with parameters of three dtypes; the same shapes for both stages."""
    module = torch.nn.Module()
    module.a = torch.nn.Parameter(torch.zeros(5, 3, dtype=torch.float64))
    module.b = torch.nn.Parameter(torch.zeros(7, dtype=torch.float32))
    module.c = torch.nn.Parameter(torch.zeros(4, 2, dtype=torch.bfloat16))
    generator = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.main_grad = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype) / 3
    return module


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    chunks = [stage(10 * rank), stage(10 * rank + 1)]
    before = [{n: p.main_grad.clone() for n, p in c.named_parameters()} for c in chunks]
    _sum_mirrored_copies(chunks, dist.group.WORLD, rank, 2)
    after = [{n: p.main_grad.clone() for n, p in c.named_parameters()} for c in chunks]
    torch.save({"before": before, "after": after}, f"{sys.argv[1]}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
