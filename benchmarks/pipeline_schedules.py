"""1F1B, interleaved 1F1B, DualPipe and DualPipeV on the same model and batch, side by side.

    python -m torch.distributed.run --standalone --nproc-per-node 8 benchmarks/pipeline_schedules.py [--ep 2]

Runs a few training steps of the tiny preset (8 layers, MTP on) per schedule through the real training loop
at PP=4 (data parallel over the remaining ranks; gloo on CPU, NCCL on GPUs), with every rank recording its
op spans, and prints per schedule:
  bubble%        measured idle share of the step's F/B/W spans over the ranks of one pipeline
  bubble ms      measured largest per-rank bubble (makespan - busy) and the published formula fed the measured
                 per-chunk costs: 1F1B (PP-1)(F+B); interleaved (PP-1)(F+B)/v (F, B of a whole stage);
                 DualPipe (PP/2-1)(F&B+B-3W); DualPipeV the same with 2*PP stages (DeepSeek-V3 §3.2.1, DualPipe
                 README). B there is a full backward: the measured input-grad B plus weight-grad W spans of
                 the dual schedules (the full BW spans, W = 0, of the others); F&B runs F then a full backward
                 on CPU, so F&B ~ F + B.
  step ms        wall time of the last measured training step, optimizer included (the step the spans are of)
  F-B ms / sim   measured makespan of the forward-backward spans / the simulator's replay of the schedule's
                 plan with the measured per-op costs and no p2p latency (a prediction), and its error (sim err).
                 Meaningful where every rank has a core (GPUs; 2 ranks on a 2-core CPU: within 5% there);
                 oversubscribed CPU ranks do not run in parallel
  act MB/rank    peak saved-activation memory per pipeline rank: bytes of the tensors autograd saves for
                 backward alive at once (recording.SavedActivationMeter), parameters excluded
  W-store MB/rank
                 DualPipe/DualPipeV: peak bytes held by the B ops' deferred weight-gradients (dL/dy and x of each
                 split linear, from its B to its W; WeightGradStore.peak_bytes), on top of act MB/rank (the two
                 peaks need not coincide); "-" where nothing is deferred (1F1B, interleaved)
  param MB/rank  parameter bytes per pipeline rank (DualPipe holds two copies of a stage)
  a2a ms         "+overlap" rows (--overlap-moe-expert-parallel-comm, needs --ep > 1): the expert all-to-alls of
                 the F&B pairs of pipeline 0, total time in flight / exposed (the part a half still waited for
                 after the other half's piece: what the overlap did not hide)
A schedule the layout cannot run (e.g. interleaved at PP=2 on gloo) is listed with the reason. The traces
(JSON) and timeline PNGs of the last measured step go to --out.
"""

import argparse
import contextlib
import io
import json
import os
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_dsv3.moe.topology import destroy_ep_topology
from megatron_dsv3.pipeline import dualpipe
from megatron_dsv3.pipeline.placement import DUAL_SCHEDULES
from megatron_dsv3.pipeline.recording import SavedActivationMeter, record_megatron_ops
from megatron_dsv3.pipeline.schedule_plan import FB, B, BW, F, W, build_plan
from megatron_dsv3.pipeline.simulator import (
    Costs,
    bubble_time,
    group_by_rank,
    published_bubble,
    simulate,
)
from megatron_dsv3.pipeline.timeline import bubble_fraction, render_timeline
from megatron_dsv3.training import train
from megatron_dsv3.training.arguments import PIPELINE_SCHEDULES, parse_args

MB = 2**20


def parse_cli():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", type=int, default=4, help="pipeline ranks")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks")
    p.add_argument("--num-layers", type=int, default=8, help="divisible by the 2*PP stages of DualPipeV")
    p.add_argument("--microbatches", type=int, default=8, help="per data-parallel replica (>= 2*PP)")
    p.add_argument("--seq-length", type=int, default=32)
    p.add_argument("--steps", type=int, default=2, help="measured steps, after one warm-up step")
    p.add_argument("--schedules", default=",".join(PIPELINE_SCHEDULES + ("dualpipe+overlap", "dualpipev+overlap")),
                   help="'+overlap': a dual schedule with --overlap-moe-expert-parallel-comm")
    p.add_argument("--out", default="runs/pipeline_schedules", help="directory for traces and timeline PNGs")
    return p.parse_args()


def training_flags(cli, name: str, world_size: int) -> list:
    schedule, dp = name.removesuffix("+overlap"), world_size // cli.pp
    flags = [
        "--model", "tiny", "--num-layers", str(cli.num_layers),
        "--moe-layer-freq", f"([0]*1+[1]*{cli.num_layers - 1})",  # the tiny preset's first dense layer
        "--pipeline-model-parallel-size", str(cli.pp), "--expert-model-parallel-size", str(cli.ep),
        "--pipeline-schedule", schedule, "--seq-length", str(cli.seq_length), "--micro-batch-size", "1",
        "--global-batch-size", str(cli.microbatches * dp), "--train-iters", str(1 + cli.steps),
        "--log-interval", str(1 + cli.steps),
    ]
    if schedule == "interleaved":  # one layer per virtual stage: v = layers per rank
        flags += ["--num-layers-per-virtual-pipeline-stage", "1"]
    if name.endswith("+overlap"):
        flags.append("--overlap-moe-expert-parallel-comm")
    return flags


def run_schedule(cli, name: str) -> dict:
    """Train 1 + cli.steps steps under schedule `name`; this rank's measurements of the measured steps."""
    try:
        args = parse_args(training_flags(cli, name, dist.get_world_size()), world_size=dist.get_world_size())
    except SystemExit as refusal:
        return {"skipped": str(refusal)}
    schedule = args.pipeline_schedule
    measured = {"step_s": [], "act_peak": 0, "wstore_peak": None}
    step, steps_run = train.train_step, []

    def measured_step(args, chunks, optimizer, scheduler, data_iterator, config):
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        ops = []
        recorder = contextlib.nullcontext() if schedule in DUAL_SCHEDULES else record_megatron_ops(chunks, pp_rank, ops)
        meter = SavedActivationMeter([p for c in chunks for p in c.parameters()])
        dist.barrier()
        start = time.time()
        with meter, recorder:
            result = step(args, chunks, optimizer, scheduler, data_iterator, config)
        dist.barrier()
        steps_run.append(schedule)
        if len(steps_run) == 1:  # the first step warms up
            return result
        measured["step_s"].append(time.time() - start)
        measured["act_peak"] = max(measured["act_peak"], meter.peak)
        if schedule in DUAL_SCHEDULES:
            wstore = dualpipe.LAST_TRACE["weight_grad_peak_bytes"]
            measured["wstore_peak"] = max(measured["wstore_peak"] or 0, wstore)
        measured["ops"] = dualpipe.LAST_TRACE["ops"] if schedule in DUAL_SCHEDULES else ops
        measured["comm"] = dualpipe.LAST_TRACE["comm"] if schedule in DUAL_SCHEDULES else []
        measured["param_bytes"] = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
        measured["position"] = (pp_rank, parallel_state.get_data_parallel_rank(),
                                parallel_state.get_tensor_model_parallel_rank())
        return result

    train.train_step = measured_step
    train.initialize_distributed(args)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the loop's own log lines
            train._pretrain(args)
    finally:
        train.train_step = step
        destroy_ep_topology()
        parallel_state.destroy_model_parallel()
    measured.update(num_microbatches=args.num_microbatches, num_chunks=args.virtual_pipeline_model_parallel_size or 1)
    return measured


def per_chunk_costs(ops: list) -> Costs:
    """Mean measured F, input-grad backward b, weight-grad w and F&B over all ranks; the formulas' full backward
    is b + w. b: the B spans, whose weight-gradients the W spans run; without them (1F1B) the full BW, w = 0."""
    def mean(kinds):
        spans = [o["end"] - o["start"] for o in ops if o["kind"] in kinds]
        return sum(spans) / len(spans) if spans else 0.0

    return Costs(f=mean((F,)), b=mean((B,)) or mean((BW,)), w=mean((W,)), fb=mean((FB,)) or None)


def summarize(cli, schedule: str, ranks: list) -> dict:
    """One table row from every rank's measurements; traces and PNG of pipeline 0 to cli.out."""
    pipeline = sorted((r for r in ranks if r["position"][1:] == (0, 0)), key=lambda r: r["position"][0])
    ops = [o for r in pipeline for o in r["ops"]]
    comm = [c for r in pipeline for c in r["comm"]]
    t0 = min(o["start"] for o in ops)
    for record in ops + comm:
        record["start"], record["end"] = record["start"] - t0, record["end"] - t0
    rows = group_by_rank(ops)
    costs = per_chunk_costs(ops)
    num_chunks, n = pipeline[0]["num_chunks"], pipeline[0]["num_microbatches"]
    plan = build_plan(schedule.removesuffix("+overlap"), cli.pp, n, num_chunks)
    predicted = simulate(plan, Costs.from_spans(ops)).total
    span = max(o["end"] for o in ops)
    path = os.path.join(cli.out, f"{schedule}_trace.json")
    dualpipe.dump_trace({"ops": ops, "comm": comm}, path)
    png = render_timeline(rows, path.replace(".json", ".png"), f"{schedule} measured, pp={cli.pp} microbatches={n}",
                          comm)
    per_rank = {}
    for r in ranks:
        stage = r["position"][0]
        act, params, wstore = per_rank.get(stage, (0, 0, None))
        if r["wstore_peak"] is not None:
            wstore = max(wstore or 0, r["wstore_peak"])
        per_rank[stage] = (max(act, r["act_peak"]), max(params, r["param_bytes"]), wstore)
    stages = sorted(per_rank)
    wstore_mb = None if per_rank[stages[0]][2] is None else [per_rank[s][2] / MB for s in stages]
    return dict(
        schedule=schedule, bubble_fraction=bubble_fraction(rows), bubble_ms=1e3 * max(bubble_time(rows)),
        formula_ms=1e3 * published_bubble(plan.name, cli.pp, costs, num_chunks), costs_ms={k: 1e3 * getattr(costs, k) for k in "fbw"},
        step_ms=1e3 * max(r["step_s"][-1] for r in ranks), fb_ms=1e3 * span,
        predicted_ms=1e3 * predicted, act_mb=[per_rank[s][0] / MB for s in stages], wstore_mb=wstore_mb,
        param_mb=[per_rank[s][1] / MB for s in stages], png=png,
        a2a_ms=[1e3 * sum(c["end"] - c["start"] for c in comm if c["kind"] == "a2a"),
                1e3 * sum(c["exposed"] for c in comm if c["kind"] == "a2a")] if schedule.endswith("+overlap") else None,
    )


def print_table(cli, rows: list, skipped: dict) -> None:
    print(f"pipeline schedules: PP={cli.pp} EP={cli.ep} ranks={dist.get_world_size()} layers={cli.num_layers} "
          f"micro-batches/replica={cli.microbatches} seq={cli.seq_length} backend={dist.get_backend()} "
          f"({cli.steps} measured steps)")
    print("act MB/rank = peak bytes of tensors saved for backward alive at once (parameters excluded); "
          "W-store MB/rank = peak bytes of dL/dy and x held by weight-gradients deferred from B to W (not in act; "
          "- = none deferred); formula fed measured per-chunk F/B/W/F&B; sim = simulator replay of the plan "
          "with measured costs")
    header = (f"{'schedule':<18}{'bubble%':>8}{'bubble ms':>10}{'formula':>9}{'step ms':>9}{'F-B ms':>8}"
              f"{'sim ms':>8}{'sim err':>8}  {'act MB/rank (pp 0..)':<24}{'W-store MB/rank':<24}{'param MB/rank':<22}"
              f"{'a2a ms total/exposed':<20}")
    print(header)
    for r in rows:
        acts = "/".join(f"{a:.2f}" for a in r["act_mb"])
        params = "/".join(f"{p:.2f}" for p in r["param_mb"])
        wstore = "-" if r["wstore_mb"] is None else "/".join(f"{w:.2f}" for w in r["wstore_mb"])
        a2a = "-" if r["a2a_ms"] is None else "{:.1f}/{:.1f}".format(*r["a2a_ms"])
        print(f"{r['schedule']:<18}{100 * r['bubble_fraction']:>7.1f}%{r['bubble_ms']:>10.1f}{r['formula_ms']:>9.1f}"
              f"{r['step_ms']:>9.1f}{r['fb_ms']:>8.1f}{r['predicted_ms']:>8.1f}"
              f"{(r['predicted_ms'] - r['fb_ms']) / r['fb_ms']:>+8.1%}  {acts:<24}{wstore:<24}{params:<22}{a2a:<20}")
    for schedule, reason in skipped.items():
        print(f"{schedule:<18}skipped: {reason}")
    for r in rows:
        c = r["costs_ms"]
        print(f"{r['schedule']}: measured per-chunk F {c['f']:.2f} ms, B {c['b']:.2f} ms, W {c['w']:.2f} ms; "
              f"timeline {r['png']}")


def main():
    cli = parse_cli()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        rows, skipped = [], {}
        for schedule in cli.schedules.split(","):
            mine = run_schedule(cli, schedule)
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, mine)
            if dist.get_rank() != 0:
                continue
            if "skipped" in mine:
                skipped[schedule] = mine["skipped"].removeprefix("error: ")
                continue
            os.makedirs(cli.out, exist_ok=True)
            rows.append(summarize(cli, schedule, ranks))
        if dist.get_rank() == 0:
            print_table(cli, rows, skipped)
            with open(os.path.join(cli.out, "results.json"), "w") as fh:
                json.dump({"rows": rows, "skipped": skipped}, fh, indent=1)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
