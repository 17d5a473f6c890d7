"""Simulate 1F1B / interleaved / DualPipe / DualPipeV plans, write timeline PNGs, compare bubbles with the
published formulas; optionally record a real CPU run first.

  python tools/pipeline_timeline.py --pp 16 --microbatches 32 --schedule all --out runs/pp_timeline
  python tools/pipeline_timeline.py --pp 16 --microbatches 32 --out timelines/ --cpu-run 8
  python tools/pipeline_timeline.py --from-trace trace.json --out runs/pp_timeline [--schedule 1f1b]

Defaults follow DeepSeek-V3's layout (16 pipeline ranks). Costs are per 1F1B/DualPipe stage; a DualPipeV chunk
holds half a stage (2*pp stages on pp ranks), so it runs with half of each cost, an interleaved chunk 1/--chunks.
--cpu-run N first trains the tiny model under every schedule on N CPU ranks (PP=4, benchmarks/pipeline_schedules.py
under torchrun): its measured timelines and table go to OUT/cpu_run. A trace is a JSON list of span dicts (rank,
kind, chunk, mb, start, end; FB also bwd_chunk, bwd_mb) recorded in a real run; with a single --schedule its
measured durations also predict that schedule's step time at --microbatches.
"""

import argparse
import json
import os
import subprocess
import sys

from megatron_dsv3.training.input_checks import ArgumentParser
from megatron_dsv3.pipeline.schedule_plan import PLANNERS, build_plan, peak_activations
from megatron_dsv3.pipeline.simulator import (
    Costs,
    bubble_time,
    group_by_rank,
    published_bubble,
    simulate,
)
from megatron_dsv3.pipeline.timeline import bubble_fraction, render_timeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# schedule -> (stage-cost scale for v = --chunks, parameter copies per rank)
_SCHEDULES = {
    "1f1b": (lambda v: 1.0, 1),
    "interleaved": (lambda v: 1.0 / v, 1),
    "dualpipe": (lambda v: 1.0, 2),
    "dualpipev": (lambda v: 0.5, 1),
}


def _plan(name: str, pp: int, microbatches: int, chunks: int = 2):
    try:
        return build_plan(name, pp, microbatches, chunks)
    except ValueError as err:
        sys.exit(f"--schedule {name} --pp {pp} --microbatches {microbatches}: {err}")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int, default=16, help="pipeline ranks")
    p.add_argument("--microbatches", type=int, default=32)
    p.add_argument("--schedule", choices=sorted(PLANNERS) + ["all"], default="all")
    p.add_argument("--out", required=True, help="directory for the PNGs")
    p.add_argument("--f", type=float, default=1.0, help="forward cost of one stage")
    p.add_argument("--b", type=float, default=1.0, help="input-grad backward cost of one stage")
    p.add_argument("--w", type=float, default=1.0, help="weight-grad backward cost of one stage")
    p.add_argument("--fb", type=float, default=None, help="overlapped F&B cost (default f+b+w: no overlap gain)")
    p.add_argument("--comm", type=float, default=0.0, help="p2p latency between ranks")
    p.add_argument("--chunks", type=int, default=2, help="model chunks per rank of the interleaved schedule")
    p.add_argument("--from-trace", default=None, help="JSON list of recorded span dicts to render")
    p.add_argument("--cpu-run", type=int, default=None, metavar="NPROC",
                   help="first record a real run of every schedule on NPROC CPU ranks (PP=4) into OUT/cpu_run")
    args = p.parse_args(argv)
    if min(args.f, args.b, args.w) <= 0 or (args.fb is not None and args.fb <= 0) or args.comm < 0:
        p.error("--f, --b, --w, --fb must be > 0 and --comm >= 0")
    if args.chunks < 2:
        p.error("--chunks must be >= 2")
    if args.cpu_run is not None and (args.cpu_run < 4 or args.cpu_run % 4):
        p.error("--cpu-run needs a multiple of 4 ranks (the benchmark runs PP=4)")
    return args


def _render_trace(args) -> None:
    if not os.path.isfile(args.from_trace):
        sys.exit(f"--from-trace: no file {args.from_trace}")
    with open(args.from_trace) as fh:
        records = json.load(fh)
    if not isinstance(records, list) or not records:
        sys.exit(f"--from-trace: {args.from_trace} must hold a non-empty JSON list of span dicts")
    try:
        rows = group_by_rank(records)
    except (TypeError, ValueError) as err:
        sys.exit(f"--from-trace: {err}")
    comm_path = args.from_trace.rsplit(".json", 1)[0] + ".comm.json"  # dualpipe.dump_trace's p2p records
    comm = []
    if os.path.isfile(comm_path):
        with open(comm_path) as fh:
            comm = json.load(fh)
    path = render_timeline(rows, os.path.join(args.out, "trace.png"), os.path.basename(args.from_trace), comm)
    span = max(s.end for r in rows for s in r) - min(r[0].start for r in rows if r)
    print(f"recorded step {span:.4g}, bubble {100 * bubble_fraction(rows):.1f}% of rank-time -> {path}")
    if args.schedule != "all":
        plan = _plan(args.schedule, len(rows), args.microbatches)
        predicted = simulate(plan, Costs.from_spans(records, comm=args.comm)).total
        print(f"predicted {args.schedule} step at pp={len(rows)} microbatches={args.microbatches}: {predicted:.4g}")


def _cpu_run(args) -> None:
    """The benchmark under torchrun; it prints its table and writes {schedule}_trace.json/.png."""
    out = os.path.join(args.out, "cpu_run")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.cpu_run}",
               os.path.join(REPO, "benchmarks", "pipeline_schedules.py"), "--out", out,
               *(["--ep", "2"] if args.cpu_run >= 8 else [])]  # EP 2 inside DP 2: the +overlap rows run too
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
    print(result.stdout, end="")
    if result.returncode:
        sys.exit(f"--cpu-run: {' '.join(command)} exited {result.returncode}")


def main(argv=None) -> None:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.from_trace:
        _render_trace(args)
        return
    if args.cpu_run:
        _cpu_run(args)
        print()
    names = sorted(PLANNERS) if args.schedule == "all" else [args.schedule]
    header = f"{'schedule':<12} {'F/B/W/F&B per chunk':<22} {'step':>8} {'bubble(sim)':>12} {'formula':>8} " \
             f"{'idle%':>6} {'act/rank':>8} {'params':>6}"
    print(f"pp={args.pp} microbatches={args.microbatches} comm={args.comm}")
    print(header)
    for name in names:
        scale_of, params = _SCHEDULES[name]
        scale = scale_of(args.chunks)
        fb = None if args.fb is None else args.fb * scale
        costs = Costs(args.f * scale, args.b * scale, args.w * scale, fb, comm=args.comm)
        if args.schedule == "all":
            try:
                plan = build_plan(name, args.pp, args.microbatches, args.chunks)
            except ValueError as err:
                print(f"{name:<12} skipped: {err}")
                continue
        else:
            plan = _plan(name, args.pp, args.microbatches, args.chunks)
        result = simulate(plan, costs)
        path = render_timeline(result.spans, os.path.join(args.out, f"{name}.png"),
                               f"{name} pp={args.pp} microbatches={args.microbatches}")
        acts = max(peak_activations(plan)) * scale  # in 1F1B stages' worth
        per_chunk = f"{costs.f:g}/{costs.b + costs.w:g}/{costs.w:g}/{costs.f + costs.b + costs.w if costs.fb is None else costs.fb:g}"
        print(f"{name:<12} {per_chunk:<22} {result.total:>8.4g} {max(bubble_time(result.spans)):>12.4g} "
              f"{published_bubble(name, args.pp, costs, args.chunks):>8.4g} {100 * bubble_fraction(result.spans):>6.1f} {acts:>8g} "
              f"{params:>5}x  {path}")
    print("F/B/W/F&B: forward, full backward (B+W), weight-grad, overlapped pair, as in the formulas; "
          "bubble(sim): largest per-rank (step - busy); formula exact when comm=0, b=f, w<=f, F&B>=f+w.")


if __name__ == "__main__":
    main()
