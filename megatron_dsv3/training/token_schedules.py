"""Hyper-parameters that change with the tokens consumed (DeepSeek-V3 report §4.2).

`--moe-router-bias-update-rate-phases TOKENS:VALUE ...` and `--mtp-loss-scaling-factor-phases TOKENS:VALUE ...`
set the bias update speed γ (--moe-router-bias-update-rate) and the MTP loss weight λ (--mtp-loss-scaling-factor)
to VALUE from TOKENS consumed tokens on. An iteration that starts with t = consumed samples × --seq-length tokens
consumed uses

    v(t) = VALUE_k of the last phase with TOKENS_k ≤ t,   the flag's own value while t < TOKENS_1

(TOKENS strictly increasing, suffixes K, M, B, T allowed). The report's schedules:
    --moe-router-bias-update-rate 0.001 --moe-router-bias-update-rate-phases 14.3T:0     γ: 0.001, 0 after 14.3T
    --mtp-loss-scaling-factor 0.3 --mtp-loss-scaling-factor-phases 10T:0.1               λ: 0.3, 0.1 after 10T
megatron-core reads γ from model chunk 0's config (finalize_model_grads) and λ from each stage's config (GPTModel's
MTP loss), so every TransformerConfig of the model chunks is set before the iteration.
"""

import math
from decimal import Decimal, InvalidOperation

from megatron.core.transformer.transformer_config import TransformerConfig

SCHEDULED = ("moe_router_bias_update_rate", "mtp_loss_scaling_factor")
SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-") + "-phases"


def add_token_schedule_args(parser) -> None:
    g = parser.add_argument_group("token schedules (DeepSeek-V3 §4.2)")
    for name in SCHEDULED:
        g.add_argument(_flag(name), nargs="+", default=None, metavar="TOKENS:VALUE",
                       help=f"--{name.replace('_', '-')} becomes VALUE once TOKENS tokens (consumed samples × "
                            "--seq-length, before the iteration) are consumed; TOKENS strictly increasing, "
                            "K/M/B/T suffixes allowed, e.g. 14.3T:0")


def parse_token_count(text: str) -> int:
    """'14.3T' -> 14_300_000_000_000 (K, M, B, T suffixes; exact); ValueError otherwise."""
    scale = SUFFIXES.get(text[-1:].upper(), 1)
    try:
        value = Decimal(text[:-1] if scale > 1 else text) * scale  # exact: 14.3T is 14_300_000_000_000
    except InvalidOperation as e:
        raise ValueError(text) from e
    if not value.is_finite() or value != int(value):
        raise ValueError(text)
    return int(value)


def parse_phases(flag: str, items, fail) -> list:
    phases = []
    for item in items:
        try:
            tokens, value = item.split(":")
            phase = (parse_token_count(tokens), float(value))
        except ValueError:
            fail(f"{flag}: {item!r} is not TOKENS:VALUE (e.g. 14.3T:0)")
        if phase[0] < 1 or not math.isfinite(phase[1]) or phase[1] < 0:
            fail(f"{flag}: {item!r} needs TOKENS ≥ 1 and a finite VALUE ≥ 0")
        if phases and phase[0] <= phases[-1][0]:
            fail(f"{flag}: TOKENS must increase strictly, got {phases[-1][0]} then {phase[0]}")
        phases.append(phase)
    return phases


def validate_token_schedule_args(args, fail) -> None:
    """Parses the phase flags into `args.token_phases` {config field: [(tokens, value), ...]}."""
    m = args.model_config
    args.token_phases = {}
    for name in SCHEDULED:
        items = getattr(args, name + "_phases")
        if items is None:
            continue
        if name == "moe_router_bias_update_rate" and (m.num_experts is None or not m.moe_router_enable_expert_bias):
            fail(f"{_flag(name)} needs an MoE model with the expert bias (--num-experts, "
                 "--moe-router-enable-expert-bias)")
        if name == "mtp_loss_scaling_factor" and not m.mtp_num_layers:
            fail(f"{_flag(name)} needs --mtp-num-layers")
        args.token_phases[name] = parse_phases(_flag(name), items, fail)


def value_at(base: float, phases, tokens: int) -> float:
    """v(t) of the module docstring."""
    return next((value for start, value in reversed(phases) if start <= tokens), base)


class TokenSchedules:
    """Sets the scheduled fields of every TransformerConfig in `chunks` from the consumed samples."""

    def __init__(self, args, chunks):
        self.seq_length = args.seq_length
        self.phases = args.token_phases
        self.base = {name: getattr(args.model_config, name) for name in self.phases}
        configs = {id(m.config): m.config for c in chunks for m in c.modules()
                   if isinstance(getattr(m, "config", None), TransformerConfig)}
        self.configs = list(configs.values())

    def apply(self, consumed_samples: int) -> None:
        tokens = consumed_samples * self.seq_length
        for name, phases in self.phases.items():
            value = value_at(self.base[name], phases, tokens)
            for config in self.configs:
                setattr(config, name, value)


def scheduled_values(args, config) -> dict:
    """The scheduled fields' current values, for the metrics."""
    return {name: getattr(config, name) for name in args.token_phases}
