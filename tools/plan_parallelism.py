"""Will a parallel layout fit, and how fast will it run? Per-rank memory, step time and communication from formulas.

  python tools/plan_parallelism.py --model deepseek-v3 --verdicts        # 671B layouts side by side
  python tools/plan_parallelism.py --model deepseek-v3                   # DeepSeek-V3's own layout (the defaults)
  python tools/plan_parallelism.py --model deepseek-v3 --search --top 5
  python tools/plan_parallelism.py --model tiny --num-nodes 1 --gpus-per-node 4 --pipeline-model-parallel-size 2 \\
      --expert-model-parallel-size 2 --pipeline-schedule 1f1b --recompute none --no-fp8 --fp32 \\
      --seq-length 64 --micro-batch-size 2 --global-batch-size 8     # CPU run (torch SDPA keeps no probabilities)

Defaults are DeepSeek-V3's pre-training setup (arXiv:2412.19437 §3): 256 nodes x 8 H800 80 GB, PP16, EP64, no TP,
ZeRO-1, DualPipe, FP8, recompute of RMSNorms and MLA up-projections, seq 4096, micro-batch 1, global batch 15360.
Bandwidths are GB/s per GPU. The formulas are in megatron_dsv3/training/planner.py.
"""

import argparse
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_dsv3.training.input_checks import ArgumentParser  # noqa: E402
from megatron_dsv3.training.token_schedules import parse_token_count  # noqa: E402
from megatron_dsv3.models.presets import PRESETS, get_preset  # noqa: E402
from megatron_dsv3.training.planner import (  # noqa: E402
    MEMORY_TERMS,
    RECOMPUTE,
    SAVINGS,
    SCHEDULES,
    GiB,
    Cluster,
    Layout,
    estimate_memory,
    format_bytes,
    plan,
    savings,
    search,
)

# (label, overrides of the command-line layout) compared by --verdicts
VERDICT_LAYOUTS = [
    ("as flagged", {}),
    ("1F1B", {"pipeline_schedule": "1f1b"}),
    ("no FP8", {"fp8": False}),
    ("no recompute", {"recompute": "none"}),
    ("full recompute", {"recompute": "full"}),
    ("PP8", {"pipeline_model_parallel_size": 8}),
    ("PP1", {"pipeline_model_parallel_size": 1, "pipeline_schedule": "1f1b"}),
    ("EP1", {"expert_model_parallel_size": 1}),
    ("EP8", {"expert_model_parallel_size": 8}),
]


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deepseek-v3", choices=sorted(PRESETS))
    g = p.add_argument_group("cluster")
    g.add_argument("--num-nodes", type=int, default=256)
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GiB per GPU")
    g.add_argument("--intra-node-bw-gbps", type=float, default=160.0, help="NVLink GB/s per GPU")
    g.add_argument("--inter-node-bw-gbps", type=float, default=50.0, help="InfiniBand GB/s per GPU")
    g.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s per GPU")
    g.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization of --peak-tflops")
    g.add_argument("--reserved-gb", type=float, default=4.0, help="GiB kept for CUDA context, NCCL, fragmentation")
    g = p.add_argument_group("layout")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=16)
    g.add_argument("--expert-model-parallel-size", type=int, default=64)
    g.add_argument("--pipeline-schedule", choices=SCHEDULES, default="dualpipe")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=15360)
    g.add_argument("--seq-length", type=int, default=4096)
    g.add_argument("--recompute", choices=RECOMPUTE, default="norm_and_up_proj")
    g.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--fp32", action="store_true", help="fp32 training (CPU): no bf16 weights, no master copy")
    g.add_argument("--adam-moments", choices=("bf16", "fp32"), default="bf16")
    g.add_argument("--no-distributed-optimizer", action="store_true")
    g.add_argument("--unfused-attention", action="store_true",
                   help="core attention keeps its softmax probabilities (as torch SDPA's math kernel does)")
    g.add_argument("--composite-kernels", action="store_true",
                   help="torch's composite CPU kernels: RMSNorm, SwiGLU, the MoE combine and the head-dim-padded "
                        "flash attention keep more (CPU runs)")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None)
    g.add_argument("--train-tokens", default="14.8T",
                   help="token budget of the headline's days and GPU-hours (K/M/B/T suffixes; DeepSeek-V3: 14.8T)")
    g = p.add_argument_group("mode")
    g.add_argument("--verdicts", action="store_true", help="compare a handful of layouts side by side")
    g.add_argument("--search", action="store_true", help="rank the fitting layouts over PP, EP, schedule, recompute")
    g.add_argument("--top", type=int, default=5)
    args = p.parse_args(argv)
    for flag in ("num_nodes", "gpus_per_node", "micro_batch_size", "global_batch_size", "seq_length", "top"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    try:
        args.train_tokens = parse_token_count(args.train_tokens)
    except ValueError:
        p.error(f"--train-tokens {args.train_tokens!r} is not a token count (e.g. 14.8T, 500B)")
    if args.train_tokens < 1:
        p.error("--train-tokens must be positive")
    if args.fp32 and args.fp8:
        p.error("--fp32 excludes --fp8: add --no-fp8")
    if not 0 < args.mfu <= 1:
        p.error(f"--mfu {args.mfu} must be in (0, 1]")
    for flag in ("peak_tflops", "intra_node_bw_gbps", "inter_node_bw_gbps"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be positive")
    if not 0 <= args.reserved_gb < args.gpu_memory_gb:
        p.error(f"--reserved-gb {args.reserved_gb} must be in [0, --gpu-memory-gb {args.gpu_memory_gb})")
    return args


def build(args):
    cluster = Cluster(args.num_nodes, args.gpus_per_node, args.gpu_memory_gb, args.intra_node_bw_gbps,
                      args.inter_node_bw_gbps, args.peak_tflops, args.mfu, args.reserved_gb)
    layout = Layout(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        pipeline_schedule=args.pipeline_schedule,
        micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size,
        seq_length=args.seq_length,
        recompute=args.recompute,
        fp8=args.fp8,
        bf16=not args.fp32,
        adam_moments_bf16=args.adam_moments == "bf16",
        distributed_optimizer=not args.no_distributed_optimizer,
        flash_attention=not args.unfused_attention,
        composite_kernels=args.composite_kernels,
        decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers,
        decoder_last_pipeline_num_layers=args.decoder_last_pipeline_num_layers,
    )
    return cluster, layout


def describe(lay: Layout) -> str:
    return (f"TP{lay.tensor_model_parallel_size} PP{lay.pipeline_model_parallel_size} "
            f"EP{lay.expert_model_parallel_size} DP{lay.data_parallel_size} {lay.pipeline_schedule} "
            f"recompute={lay.recompute}{' fp8' if lay.fp8 else ''} mb{lay.micro_batch_size} "
            f"gbs{lay.global_batch_size} seq{lay.seq_length}")


def table(columns, verdicts) -> str:
    """Rows: memory terms (GiB, fullest pipeline rank), time terms (s per step), traffic (GB sent per GPU and
    step), verdict; one column per layout."""
    big = any(v.memory and v.memory["total"] >= GiB for v in verdicts)
    unit, scale = ("GiB", GiB) if big else ("MiB", 2**20)
    rows = [(f"memory, {unit} per GPU on the fullest pipeline rank", [])]
    rows += [(f"{t} {unit}", [f"{v.memory[t] / scale:.1f}" if v.memory else "-" for v in verdicts])
             for t in (*MEMORY_TERMS, "total")]
    rows += [("time, s per step", [])]
    rows += [(f"{t} s", [f"{v.time[t]:.2f}" if v.time else "-" for v in verdicts])
             for t in ("compute", "bubble", "all_to_all", "exposed_comm", "step")]
    rows += [("traffic, GB sent per GPU per step", [])]
    rows += [(f"{t} GB", [f"{v.time[t] / 1e9:.1f}" if v.time else "-" for v in verdicts])
             for t in ("all_to_all_ib", "all_to_all_nvlink", "pp_p2p")]
    rows += [("fits", ["yes" if v.fits else "NO" for v in verdicts])]
    width = max(12, *(len(c) for c in columns))
    label = max(len(name) for name, cells in rows if cells) + 2
    out = [f"{'':<{label}}" + "".join(f"{c:>{width + 2}}" for c in columns)]
    for name, cells in rows:
        out.append(f"{name:<{label}}" + "".join(f"{c:>{width + 2}}" for c in cells) if cells else name)
    out.append("")
    out += [f"{c}: {describe(v.layout)}\n    {v.reason}" for c, v in zip(columns, verdicts)]
    return "\n".join(out)


def headline(v, cluster: Cluster, train_tokens: int) -> str:
    """Throughput and what a token budget costs at it (wall-clock days on this cluster, GPU-hours)."""
    if not v.time:
        return "headline: -"
    tokens_per_s, gpus = v.time["tokens_per_s"], cluster.world_size
    seconds = train_tokens / tokens_per_s
    return (f"headline: {v.time['step']:.2f} s per step of {v.layout.global_batch_size * v.layout.seq_length:,} "
            f"tokens = {tokens_per_s:,.0f} tokens/s, {tokens_per_s / gpus:,.0f} tokens/s per GPU; "
            f"{train_tokens / 1e12:g}T tokens (--train-tokens) in {seconds / 86400:.1f} days on {gpus:,} GPUs "
            f"= {seconds * gpus / 3600 / 1e6:.3f}M GPU-hours")


def savings_table(config, v) -> str:
    """A row per memory saving the layout has switched on: what the fullest rank would grow by without it."""
    rows = savings(config, v.layout)
    if not rows:
        return "memory savings: none of those the planner counts is switched on"
    mem = v.memory
    unit, scale = ("GiB", GiB) if mem["total"] >= GiB else ("MiB", 2**20)
    width = max(len(r["saving"]) for r in rows) + 2
    out = [f"memory savings ({unit} on the fullest rank = pipeline rank {mem['pipeline_rank']}, "
           f"{mem['total'] / scale:.1f} {unit} with all of them; each row: that saving alone switched off)",
           f"  {'saving':<{width}}{'saves ' + unit:>10}  {'fullest rank without it':>24}  terms it shrinks"]
    for r in rows:
        out.append(f"  {r['saving']:<{width}}{r['saved'] / scale:>10.1f}  {r['pipeline_rank']:>24}  "
                   f"{', '.join(r['terms'])}")
    none = estimate_memory(config, replace(v.layout, **{k: val for _, off in SAVINGS for k, val in off.items()}))
    out.append(f"  {'without any of them':<{width}}{(none['total'] - mem['total']) / scale:>10.1f}  "
               f"{none['pipeline_rank']:>24}  total {none['total'] / scale:.1f} {unit}")
    return "\n".join(out)


def _batch_for(lay: Layout, cluster: Cluster) -> Layout:
    """Round the global batch up to a multiple of micro-batch x DP so every layout can be compared."""
    dp = cluster.world_size // (lay.tensor_model_parallel_size * lay.pipeline_model_parallel_size) or 1
    unit = lay.micro_batch_size * dp
    return replace(lay, global_batch_size=-(-lay.global_batch_size // unit) * unit)


def main(argv=None):
    args = parse_args(argv)
    config = get_preset(args.model)
    cluster, layout = build(args)
    single = None if args.verdicts or args.search else plan(config, layout, cluster)
    if single is not None and single.reason.startswith("invalid"):
        sys.exit(f"error: {single.reason}")
    print(f"{args.model} on {cluster.num_nodes} x {cluster.gpus_per_node} GPUs of {cluster.gpu_memory_gb:g} GiB "
          f"({cluster.reserved_gb:g} GiB reserved), peak {cluster.peak_tflops:g} TFLOP/s at MFU {cluster.mfu:g}\n")
    if args.verdicts:
        labels = [label for label, _ in VERDICT_LAYOUTS]
        verdicts = [plan(config, _batch_for(replace(layout, **o), cluster), cluster) for _, o in VERDICT_LAYOUTS]
        print(table(labels, verdicts))
        print("\n(global batch rounded up to a multiple of micro-batch x DP where a layout needs it)")
    elif args.search:
        found = search(config, layout, cluster, args.top)
        if not found:
            print("no layout fits")
        for i, v in enumerate(found, 1):
            print(f"{i}. {describe(v.layout)}: {v.time['step']:.2f} s/step, {v.time['tokens_per_s']:,.0f} tokens/s, "
                  f"{format_bytes(v.memory['total'])}")
    else:
        print(table(["layout"], [single]))
        print(headline(single, cluster, args.train_tokens))
        print()
        print(savings_table(config, single))


if __name__ == "__main__":
    main()
