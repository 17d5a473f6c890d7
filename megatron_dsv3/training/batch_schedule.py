"""Batch-size ramp-up: Megatron-LM's `--rampup-batch-size START INCREMENT SAMPLES`, run by megatron-core's
num_microbatches_calculator.

With --global-batch-size G the ramp has steps = (G − START) / INCREMENT increments, one every SAMPLES / steps
samples. An iteration that starts with n samples consumed runs

    B(n) = START + INCREMENT · ⌊n / (SAMPLES / steps)⌋   (n ≤ SAMPLES),   B(n) = G   (n > SAMPLES)

samples in B(n) / (--micro-batch-size × data-parallel size) micro-batches; the lr schedule and the consumed
samples advance by B(n). Megatron-LM takes the ramp with --train-samples only; this trainer counts --train-iters
iterations, so the run consumes Σ_i B(n_i) samples (`args.train_samples`: the training set's size and the
default lr decay length). Every B of the ramp must split into whole micro-batches that the pipeline schedule runs.
"""

import torch.distributed as dist
from megatron.core.num_microbatches_calculator import (
    RampupBatchsizeNumMicroBatchesCalculator,
    destroy_num_microbatches_calculator,
    init_num_microbatches_calculator,
)


def add_batch_schedule_args(parser) -> None:
    g = parser.add_argument_group("batch-size ramp-up (Megatron-LM's flag)")
    g.add_argument("--rampup-batch-size", nargs=3, type=int, default=None,
                   metavar=("START", "INCREMENT", "SAMPLES"),
                   help="start at global batch size START and add INCREMENT every SAMPLES / ((--global-batch-size "
                        "− START) / INCREMENT) samples until --global-batch-size, reached after SAMPLES samples; "
                        "e.g. 16 8 300000 with --global-batch-size 1024: 126 increments of ≈ 2380 samples each")


def ramp_global_batch_sizes(args) -> list:
    """Every global batch size the job runs: START, START + INCREMENT, ..., G (only G without a ramp)."""
    if args.rampup_batch_size is None:
        return [args.global_batch_size]
    start, increment, _ = args.rampup_batch_size
    return list(range(start, args.global_batch_size + 1, increment))


def _calculator(args) -> RampupBatchsizeNumMicroBatchesCalculator:
    return RampupBatchsizeNumMicroBatchesCalculator(
        args.global_batch_size, args.micro_batch_size, args.data_parallel_size,
        decrease_batch_size_if_needed=False, rank=-1,  # rank -1: no log lines from this look-ahead
        start_global_batch_size=args.rampup_batch_size[0], batch_size_increment=args.rampup_batch_size[1],
        ramup_samples=args.rampup_batch_size[2],
    )


def _train_samples(args) -> int:
    """Σ B(n_i) over --train-iters iterations: the ramp's iterations one by one, then G each (Megatron-LM's
    update_train_iters, the other way round)."""
    if args.rampup_batch_size is None:
        return args.train_iters * args.global_batch_size
    calculator, consumed, iterations = _calculator(args), 0, 0
    while iterations < args.train_iters and consumed <= args.rampup_batch_size[2]:
        calculator.update(consumed, consistency_check=False)
        consumed += calculator.get_current_global_batch_size()
        iterations += 1
    return consumed + (args.train_iters - iterations) * args.global_batch_size


def validate_batch_schedule_args(args, fail) -> None:
    """Checks --rampup-batch-size against --global-batch-size, --micro-batch-size and the data-parallel size;
    sets `args.train_samples`. `fail(message)` stops."""
    ramp = args.rampup_batch_size
    if ramp is not None:
        start, increment, samples = ramp
        flag = f"--rampup-batch-size {start} {increment} {samples}"
        if start < 1 or increment < 1:
            fail(f"{flag}: START and INCREMENT must be ≥ 1")
        if samples < 1:
            fail(f"{flag}: SAMPLES {samples} must be ≥ 1 (leave the flag out for a constant batch size)")
        if start >= args.global_batch_size:
            fail(f"{flag}: START {start} must be below --global-batch-size {args.global_batch_size}")
        if (args.global_batch_size - start) % increment:
            fail(f"{flag}: INCREMENT {increment} does not divide --global-batch-size {args.global_batch_size} − "
                 f"START {start} = {args.global_batch_size - start}")
        unit = args.micro_batch_size * args.data_parallel_size
        for size in ramp_global_batch_sizes(args)[:-1]:  # G itself: the --global-batch-size check
            if size % unit:
                fail(f"{flag}: the ramp's global batch size {size} is not divisible by --micro-batch-size "
                     f"{args.micro_batch_size} × data-parallel size {args.data_parallel_size}; make START and "
                     f"INCREMENT multiples of {unit}")
    args.train_samples = _train_samples(args)


def check_every_stage(args, check, fail) -> None:
    """`check(num_microbatches, batch_flags)` for every global batch size of the job, --global-batch-size first
    (its faults may be the layout's); its ValueError, naming `batch_flags` as the fix, stops with one line."""
    unit = args.micro_batch_size * args.data_parallel_size
    try:
        check(args.global_batch_size // unit, "--global-batch-size")
    except ValueError as e:
        fail(str(e))
    for size in ramp_global_batch_sizes(args)[:-1]:
        try:
            check(size // unit, "START and INCREMENT of --rampup-batch-size")
        except ValueError as e:
            start, increment, samples = args.rampup_batch_size
            fail(f"--rampup-batch-size {start} {increment} {samples}: at its global batch size {size}: {e}")


def start_batch_schedule(args) -> None:
    """megatron-core's calculator for this job (one per `pretrain` call); the train loop updates it with the
    consumed samples before each iteration (update_num_microbatches) and reads get_num_microbatches() and
    get_current_global_batch_size()."""
    destroy_num_microbatches_calculator()
    rank = dist.get_rank() if dist.is_initialized() else 0
    init_num_microbatches_calculator(rank, args.rampup_batch_size, args.global_batch_size, args.micro_batch_size,
                                     args.data_parallel_size)
