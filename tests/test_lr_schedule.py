"""Learning-rate schedules against the formulas written out here (Megatron-LM's semantics: counted in samples).
A real run follows them across a resume inside the WSD decay in tests/test_batch_schedule.py."""

import math

import pytest

from megatron_dsv3.training.arguments import parse_args
from megatron_dsv3.training.lr_schedule import build_lr_scheduler


def reference_lr(n, *, max_lr, min_lr, init, warmup, decay, style, wsd=0, wsd_style=None):
    """lr after n samples, from the formulas (independent of megatron-core's code)."""
    if warmup and n <= warmup:
        return init + (max_lr - init) * n / warmup
    if style == "constant":
        return max_lr
    if n > decay:
        return min_lr
    if style == "inverse-square-root":
        return max(min_lr, max_lr * math.sqrt(max(warmup, 1) / max(n, 1)))
    r = (n - warmup) / (decay - warmup)
    if style == "linear":
        c = 1 - r
    elif style == "cosine":
        c = 0.5 * (1 + math.cos(math.pi * r))
    else:  # WSD: stable, then the final decay over `wsd` samples
        if n <= decay - wsd:
            c = 1.0
        else:
            q = (n - decay + wsd) / wsd
            c = {"linear": 1 - q, "cosine": 0.5 * (1 + math.cos(math.pi * q)), "exponential": 2 * 0.5 ** q - 1,
                 "minus_sqrt": 1 - math.sqrt(q)}[wsd_style]
    return min_lr + (max_lr - min_lr) * c


class _Optimizer:
    param_groups = [{}]


def schedule(argv, iterations):
    args = parse_args(["--train-iters", "20", "--global-batch-size", "8"] + argv, world_size=1)
    scheduler = build_lr_scheduler(args, _Optimizer())
    lrs = []
    for _ in range(iterations):
        scheduler.step(increment=args.global_batch_size)
        lrs.append(scheduler.get_lr({}))
    return args, lrs


CASES = [
    (["--lr-decay-style", "cosine", "--lr-warmup-iters", "4"], dict(style="cosine", warmup=32, decay=160)),
    (["--lr-decay-style", "linear", "--lr-warmup-samples", "20", "--lr-decay-samples", "120"],
     dict(style="linear", warmup=20, decay=120)),
    (["--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.25", "--lr-decay-iters", "16"],
     dict(style="cosine", warmup=32, decay=128)),
    (["--lr-decay-style", "inverse-square-root", "--lr-warmup-iters", "3"],
     dict(style="inverse-square-root", warmup=24, decay=160)),
    (["--lr-decay-style", "constant", "--lr-warmup-iters", "2"], dict(style="constant", warmup=16, decay=160)),
] + [
    (["--lr-decay-style", "WSD", "--lr-warmup-iters", "2", "--lr-wsd-decay-iters", "6", "--lr-wsd-decay-style", s,
      "--lr-warmup-init", "1e-4"], dict(style="WSD", warmup=16, decay=160, wsd=48, wsd_style=s, init=1e-4))
    for s in ("linear", "cosine", "exponential", "minus_sqrt")
]


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(c[0][1:4]) + c[0][-1] for c in CASES])
def test_every_step_follows_the_formula(argv, expected):
    args, lrs = schedule(["--lr", "2e-3", "--min-lr", "2e-4"] + argv, iterations=24)
    expected = {"init": 0.0, **expected}
    for iteration, lr in enumerate(lrs, start=1):
        want = reference_lr(iteration * 8, max_lr=2e-3, min_lr=2e-4, **expected)
        assert lr == pytest.approx(want, rel=1e-12, abs=1e-15), (iteration, lr, want)


def test_lr_phases_hold_their_lr_from_their_token_count_on():
    """The report's shape at toy scale: WSD cosine to --min-lr, then the --min-lr tail, then a lower constant.
    8 samples per iteration of --seq-length 64: 512 tokens; the phase starts at 22 iterations' tokens."""
    phase_tokens = 22 * 8 * 64
    args, lrs = schedule(["--lr", "2e-3", "--min-lr", "2e-4", "--seq-length", "64", "--lr-decay-style", "WSD",
                          "--lr-warmup-iters", "2", "--lr-wsd-decay-iters", "6", "--lr-wsd-decay-style", "cosine",
                          "--lr-phases", f"{phase_tokens}:7e-5", "1.5M:1e-5"], iterations=24)
    for iteration, lr in enumerate(lrs, start=1):
        if iteration * 8 * 64 >= phase_tokens:
            want = 7e-5
        else:
            want = reference_lr(iteration * 8, max_lr=2e-3, min_lr=2e-4, init=0.0, warmup=16, decay=160,
                                style="WSD", wsd=48, wsd_style="cosine")
        assert lr == pytest.approx(want, rel=1e-12, abs=1e-15), (iteration, lr, want)
    assert lrs[19] == pytest.approx(2e-4) and lrs[21] == 7e-5  # the min-lr tail, then the phase


@pytest.mark.parametrize("argv, needle", [
    (["--lr-phases", "1K"], "--lr-phases: '1K' is not TOKENS:VALUE"),
    (["--lr-phases", "2K:1e-4", "1K:1e-5"], "--lr-phases: TOKENS must increase"),
    (["--lr-warmup-iters", "2", "--lr-warmup-samples", "16"], "--lr-warmup-iters and --lr-warmup-samples"),
    (["--lr-decay-iters", "4", "--lr-decay-samples", "16"], "--lr-decay-iters and --lr-decay-samples"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "2"], "--lr-warmup-fraction excludes"),
    (["--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction 1.5"),
    (["--lr-warmup-samples", "-3"], "--lr-warmup-samples -3 is negative"),
    (["--lr-warmup-iters", "30"], "the warmup (240 samples) must end before the decay"),
    (["--lr-decay-style", "WSD"], "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    (["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "30"], "the WSD decay (240 samples) is longer"),
    (["--lr-wsd-decay-iters", "3"], "need --lr-decay-style WSD"),
    (["--lr-warmup-init", "1.0"], "--lr-warmup-init 1.0 exceeds --lr"),
    (["--min-lr", "1.0"], "--min-lr 1.0 exceeds --lr"),
])
def test_bad_schedule_flags_stop_with_one_line(argv, needle):
    with pytest.raises(SystemExit) as error:
        parse_args(["--train-iters", "20", "--global-batch-size", "8"] + argv, world_size=1)
    message = str(error.value)
    assert needle in message and "\n" not in message.strip(), message
