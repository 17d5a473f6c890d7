"""Learning-rate schedule flags (Megatron-LM's names and semantics) and the scheduler they build.

The schedule counts samples, as Megatron-LM's does: every iteration advances it by its global batch size, and
lengths given in iterations are converted (× --global-batch-size). With n samples seen:

    warmup (n ≤ W):        lr = init + (max − init) · n / W
    constant:              lr = max
    linear / cosine:       lr = min + (max − min) · c(r),  r = (n − W) / (D − W),  c = 1 − r  /  ½(1 + cos πr)
    inverse-square-root:   lr = max(min, max · sqrt(W / n))
    WSD:                   lr = max until D − S, then min + (max − min) · c(r'), r' = (n − D + S) / S, with c from
                           --lr-wsd-decay-style (linear, cosine, exponential 2·0.5^r' − 1, minus_sqrt 1 − sqrt r')
    n > D:                 lr = min

W: --lr-warmup-iters/-samples/-fraction (of D), D: --lr-decay-iters/-samples (default: the samples of
--train-iters, batch-size ramp included: batch_schedule),
S: --lr-wsd-decay-iters/-samples. megatron-core's OptimizerParamScheduler evaluates these formulas.

--lr-phases TOKENS:LR ... then holds lr = LR from TOKENS consumed tokens (samples × --seq-length) on, the last
phase reached winning (token_schedules.value_at), for the constant tails of a schedule. DeepSeek-V3 (§4.2: 2K
warmup steps to 2.2e-4, constant until 10T tokens, cosine to 2.2e-5 over 4.3T, 2.2e-5 for 333B, 7.3e-6 for 167B):
    --lr 2.2e-4 --min-lr 2.2e-5 --lr-warmup-iters 2000 --lr-decay-style WSD --lr-wsd-decay-style cosine
    --lr-decay-samples 3491210938 --lr-wsd-decay-samples 1049804688 --lr-phases 14.633T:7.3e-6
(14.3T and 4.3T tokens at 4096 tokens per sample; after D the schedule gives --min-lr, the 333B stage).
"""

import math
from typing import NamedTuple

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_dsv3.training.token_schedules import parse_phases, value_at

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")


class ScheduleSamples(NamedTuple):
    warmup: int
    decay: int
    wsd_decay: int


def add_lr_schedule_args(parser) -> None:
    g = parser.add_argument_group("learning rate (Megatron-LM's flags; the schedule counts samples)")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--min-lr", type=float, default=3e-4)
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="learning rate at the start of warmup")
    g.add_argument("--lr-decay-style", choices=DECAY_STYLES, default="cosine")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=None)
    g.add_argument("--lr-warmup-fraction", type=float, default=None, help="warmup as a fraction of the decay length")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-decay-samples", type=int, default=None)
    g.add_argument("--lr-wsd-decay-style", choices=WSD_DECAY_STYLES, default="exponential")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None, help="WSD: length of the final decay")
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None)
    g.add_argument("--lr-phases", nargs="+", default=None, metavar="TOKENS:LR",
                   help="lr = LR once TOKENS tokens (consumed samples × --seq-length) are consumed, overriding the "
                        "schedule; TOKENS strictly increasing, K/M/B/T suffixes, e.g. 14.633T:7.3e-6")


def _samples(args, fail, name: str, iters, samples, default=None):
    """A length given as --NAME-iters or --NAME-samples (not both), in samples."""
    if iters and samples is not None:
        fail(f"--{name}-iters and --{name}-samples exclude each other: give one")
    for flag, value in ((f"--{name}-iters", iters), (f"--{name}-samples", samples)):
        if value is not None and value < 0:
            fail(f"{flag} {value} is negative")
    if samples is not None:
        return samples
    if iters:
        return iters * args.global_batch_size
    return default


def validate_lr_schedule_args(args, fail) -> None:
    """Checks the flags and sets `args.lr_schedule_samples` (W, D, S in samples); `fail(message)` stops."""
    if not math.isfinite(args.lr_warmup_init) or args.lr_warmup_init < 0:  # --lr, --min-lr: input_checks
        fail(f"--lr-warmup-init {args.lr_warmup_init} must be finite and ≥ 0")
    if args.min_lr > args.lr:
        fail(f"--min-lr {args.min_lr} exceeds --lr {args.lr}")
    if args.lr_warmup_init > args.lr:
        fail(f"--lr-warmup-init {args.lr_warmup_init} exceeds --lr {args.lr}")
    decay = _samples(args, fail, "lr-decay", args.lr_decay_iters, args.lr_decay_samples,
                     default=args.train_samples)
    if decay <= 0:
        fail("--lr-decay-iters/--lr-decay-samples must be > 0")
    if args.lr_warmup_fraction is not None:
        if args.lr_warmup_iters or args.lr_warmup_samples is not None:
            fail("--lr-warmup-fraction excludes --lr-warmup-iters/--lr-warmup-samples: give one")
        if not 0 <= args.lr_warmup_fraction < 1:
            fail(f"--lr-warmup-fraction {args.lr_warmup_fraction} must be in [0, 1)")
        warmup = int(args.lr_warmup_fraction * decay)
    else:
        warmup = _samples(args, fail, "lr-warmup", args.lr_warmup_iters, args.lr_warmup_samples, default=0)
    if warmup >= decay and args.lr_decay_style != "constant":
        fail(f"the warmup ({warmup} samples) must end before the decay does ({decay} samples): "
             "shorten --lr-warmup-* or lengthen --lr-decay-*")
    wsd = _samples(args, fail, "lr-wsd-decay", args.lr_wsd_decay_iters, args.lr_wsd_decay_samples)
    if args.lr_decay_style == "WSD":
        if not wsd:
            fail("--lr-decay-style WSD needs --lr-wsd-decay-iters or --lr-wsd-decay-samples (the final decay)")
        if wsd > decay - warmup:
            fail(f"the WSD decay ({wsd} samples) is longer than the span after warmup ({decay - warmup} samples)")
    elif wsd is not None:
        fail("--lr-wsd-decay-iters/--lr-wsd-decay-samples need --lr-decay-style WSD")
    args.lr_schedule_samples = ScheduleSamples(warmup, decay, wsd or 0)
    args.lr_phases_parsed = parse_phases("--lr-phases", args.lr_phases or [], fail)


class PhasedLRScheduler(OptimizerParamScheduler):
    """megatron-core's schedule, overridden by the --lr-phases from their token counts on (a group with its own
    max_lr keeps its ratio to --lr)."""

    def __init__(self, optimizer, phases, seq_length: int, **kwargs):
        self.phases, self.seq_length = phases, seq_length
        super().__init__(optimizer, **kwargs)

    def get_lr(self, param_group: dict) -> float:
        lr = super().get_lr(param_group)
        phase_lr = value_at(None, self.phases, self.num_steps * self.seq_length)
        if phase_lr is None:
            return lr
        return phase_lr * param_group.get("max_lr", self.max_lr) / self.max_lr


def build_lr_scheduler(args, optimizer) -> OptimizerParamScheduler:
    """megatron-core's scheduler over samples; train steps call `.step(increment=global batch size)`."""
    w = args.lr_schedule_samples
    return PhasedLRScheduler(
        optimizer,
        phases=args.lr_phases_parsed,
        seq_length=args.seq_length,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=w.warmup,
        lr_decay_steps=w.decay,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_samples,
        wd_incr_style="constant",
        wsd_decay_steps=w.wsd_decay or None,
        lr_wsd_decay_style=args.lr_wsd_decay_style if args.lr_decay_style == "WSD" else None,
    )
