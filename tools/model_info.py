"""Parameter breakdown, activated parameters and training FLOPs per token of a preset (nothing allocated).

  python tools/model_info.py --model deepseek-v3 [--seq-length 4096]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_dsv3.training.input_checks import ArgumentParser  # noqa: E402
from megatron_dsv3.models.param_count import count_parameters, flops_per_token  # noqa: E402
from megatron_dsv3.models.presets import PRESETS, get_preset  # noqa: E402


def _fmt(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.3f}{unit}"
    return f"{n:,.0f}"


def report(name: str, seq_length: int) -> str:
    c = get_preset(name)
    p = count_parameters(c)
    rows = [(k, v) for k, v in p.components.items()] + [(f"mtp.{k}", v) for k, v in p.mtp.items()]
    width = max(len(k) for k, _ in rows) + 2
    lines = [f"{name}: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_experts or 0} routed experts "
             f"(top-{c.moe_router_topk}), MTP depth {c.mtp_num_layers or 0}", ""]
    lines += [f"  {'component':<{width}}{'parameters':>16}{'share':>9}"]
    lines += [f"  {k:<{width}}{v:>16,}{v / p.total_with_mtp:>9.2%}" for k, v in rows]
    fpt = flops_per_token(c, seq_length)
    lines += [
        "",
        f"  total (main model)             {_fmt(p.total)}",
        f"  total with MTP (as released)   {_fmt(p.total_with_mtp)}",
        f"  activated per token            {_fmt(p.activated)}  (embedding lookup excluded, output head included)",
        f"  training FLOPs per token       {fpt / 1e9:,.2f} GFLOP at seq {seq_length} (6N + causal MLA attention, MTP included)",
    ]
    return "\n".join(lines)


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deepseek-v3", choices=sorted(PRESETS))
    p.add_argument("--seq-length", type=int, default=4096, help="sequence length for the FLOPs line")
    args = p.parse_args(argv)
    if args.seq_length < 1:
        p.error("--seq-length must be positive")
    print(report(args.model, args.seq_length))


if __name__ == "__main__":
    main()
