"""Training-step time with the host EMA (--ema-decay, training/ema.py) on and off.

One process, one model built as pretrain_dsv3.py builds it (tiny preset, mock data unless flags say
otherwise): blocks of steps alternate between EMA on (train_step + HostEMA.update, as train.py runs them) and
off (train_step alone), in the order on-off, off-on, ... so both see the same machine state and drift cancels.
An on block's time includes waiting for its last background update; the table gives the median per-step time of
each, the median (and quartiles) of the paired on/off ratios, and the median time per step the training thread
spends in HostEMA.update/wait (the copy, plus waiting for a background update not yet finished).

    python benchmarks/ema_overhead.py                          # CPU, fp32
    python benchmarks/ema_overhead.py --blocks 20 -- --bf16    # on a GPU; flags after -- go to pretrain_dsv3
"""

import argparse
import os
import statistics
import time

import torch

from megatron_dsv3.models.transformer_config import transformer_config_from_args
from megatron_dsv3.training.arguments import parse_args
from megatron_dsv3.training.batch_schedule import start_batch_schedule
from megatron_dsv3.training.ema import build_ema
from megatron_dsv3.training.initialize import destroy_distributed, initialize_distributed
from megatron_dsv3.training.train import (
    build_datasets, build_job_tokenizer, chunk_iterators, setup_model_and_optimizer, train_step,
)


def time_block(steps: int, run_step, ema):
    """(seconds per step, of which in HostEMA.update/wait on the training thread) of `steps` steps; with `ema`,
    each followed by its update, and the last update finished."""
    start, in_ema = time.perf_counter(), 0.0
    for _ in range(steps):
        run_step()
        if ema is not None:
            mark = time.perf_counter()
            ema.update()
            in_ema += time.perf_counter() - mark
    if ema is not None:
        mark = time.perf_counter()
        ema.wait()
        in_ema += time.perf_counter() - mark
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps, in_ema / steps


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=10, help="pairs of (on, off) blocks")
    parser.add_argument("--block-steps", type=int, default=5)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("train_flags", nargs="*", help="pretrain_dsv3.py flags (after --)")
    opts = parser.parse_args(argv)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    steps = opts.warmup_steps + 2 * opts.blocks * opts.block_steps
    args = parse_args(["--train-iters", str(steps), "--ema-decay", str(opts.ema_decay), *opts.train_flags],
                      world_size=1)
    initialize_distributed(args)
    try:
        tokenizer = build_job_tokenizer(args)
        config = transformer_config_from_args(args)
        chunks, optimizer, scheduler = setup_model_and_optimizer(args, config)
        ema = build_ema(args, chunks)
        start_batch_schedule(args)  # train_step reads the micro-batch count from megatron-core's calculator
        iterator = chunk_iterators(args, build_datasets(args, tokenizer)[0], 0, len(chunks))

        def run_step():
            train_step(args, chunks, optimizer, scheduler, iterator, config)

        time_block(opts.warmup_steps, run_step, ema)
        on, off, in_ema = [], [], []
        for block in range(opts.blocks):
            for with_ema in (True, False) if block % 2 == 0 else (False, True):
                seconds, ema_seconds = time_block(opts.block_steps, run_step, ema if with_ema else None)
                (on if with_ema else off).append(seconds)
                if with_ema:
                    in_ema.append(ema_seconds)
        ratios = [a / b for a, b in zip(on, off)]
        quartiles = statistics.quantiles(ratios, n=4)
        parameters = sum(p.numel() for c in chunks for p in c.parameters())
        print(f"{parameters / 1e6:.2f} M parameters, EMA host bytes {ema.host_bytes() / 2**20:.1f} MiB, "
              f"{opts.blocks} x {opts.block_steps} steps each, {torch.get_num_threads()} intra-op thread(s)")
        print(f"{'EMA off':>12} {'EMA on':>12} {'on/off':>8} {'quartiles':>14} {'in update/wait':>15}")
        print(f"{statistics.median(off) * 1e3:>9.1f} ms {statistics.median(on) * 1e3:>9.1f} ms "
              f"{statistics.median(ratios):>8.3f} {quartiles[0]:>6.3f}-{quartiles[2]:.3f} "
              f"{statistics.median(in_ema) * 1e3:>12.2f} ms")
        ema.close()
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
