"""DeepSeek-V3's memory savings measured against the planner, one saving off at a time (issue 13).

    python benchmarks/memory_plan.py [--nproc 8] [--pp 4] [--ep 2] [--train-iters 6] [--out DIR]

Trains the tiny preset on CPU ranks (gloo, fp32) under DualPipe, PP x EP x (DP = nproc / PP), with the memory flags
of examples/deepseek_v3_671b.sbatch (selective recompute of the RMSNorms and MLA up-projections, FP8 with the
emulated blockwise recipe, ZeRO-1, EMA) plus DualPipe's free-after-send and shared MTP embedding (on by default):
once with every saving on, then once per saving with that saving's off-switch added to the same command:
  recompute             (the --recompute-* flags dropped)
  FP8 storage           --no-fp8-activation-storage
  free-after-send       --no-deallocate-pipeline-outputs
  shared embedding      --no-share-mtp-embedding
  EMA                   (--ema-decay dropped)
Each launch runs benchmarks/memory_plan_rank.py (the trainer, measured from its tensors; the last step metered)
and writes per-rank JSON. Printed, per run, pipeline rank and term (weights, main grads, optimizer state, saved
activations peak, EMA host bytes): the measured bytes (the largest over the data-parallel ranks of that pipeline
rank), the planner's estimate_memory for the same layout (training.planner.Layout with that saving's switch) and
measured / planned; then each run's lm loss against the all-on run's (fp32: "equal" or the largest difference)
(or the "no FP8" run's, for the runs without FP8) and the median step time (the first and the metered last step
left out) with EMA on and off. The EMA row's planner bytes are 4 B per parameter plus the staging copy (4 B in
fp32): the planner itself counts accelerator memory only.
Two more runs without FP8 ("no FP8", and that with recompute off): the planner's FP8 is the GPU recipe (bf16,
Transformer Engine: SwiGLU cached in FP8, an FP8 weight copy) and it has no model of the emulated FP8 linears in
fp32, so its rows are those of the same layout in high precision; without FP8 they describe the run exactly, and
the recompute saving is checked there. Their losses are compared with each other.
BF16 Adam moments are not in this table: CPU runs train in fp32, where the planner keeps FP32 moments too.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_dsv3.models.presets import get_preset  # noqa: E402
from megatron_dsv3.training.planner import Layout, estimate_memory  # noqa: E402

RECOMPUTE = ["--recompute-granularity", "selective", "--recompute-modules", "layernorm", "mla_up_proj"]
FP8 = ["--fp8-format", "e4m3", "--fp8-recipe", "blockwise", "--fp8-emulation"]
EMA = ["--ema-decay", "0.999"]
TERMS = ("weights", "main_grads", "optimizer", "activations", "ema_host")
# run name -> (flag groups taken away, flags added, the planner Layout fields of that run)
RUNS = {
    "all on": ((), [], {}),
    "recompute off": ((RECOMPUTE,), [], {"recompute": "none"}),
    "FP8 storage off": ((), ["--no-fp8-activation-storage"], {"fp8_activation_storage": False}),
    "free-after-send off": ((), ["--no-deallocate-pipeline-outputs"], {"free_sent_outputs": False}),
    "shared embedding off": ((), ["--no-share-mtp-embedding"], {"share_mtp_embedding": False}),
    "EMA off": ((EMA,), [], {}),
    # the layout the planner models exactly (no FP8): its recompute saving checked against the measured one
    "no FP8": ((FP8,), [], {}),
    "no FP8, recompute off": ((FP8, RECOMPUTE), [], {"recompute": "none"}),
}


def base_flags(a) -> list:
    dp = a.nproc // a.pp
    return ["--pipeline-model-parallel-size", a.pp, "--pipeline-schedule", "dualpipe",
            "--expert-model-parallel-size", a.ep, "--use-distributed-optimizer",
            "--micro-batch-size", 1, "--global-batch-size", 2 * a.pp * dp, "--seq-length", a.seq_length,
            "--train-iters", a.train_iters, "--log-interval", 1, *RECOMPUTE, *FP8, *EMA]


def without(flags: list, groups) -> list:
    """`flags` with each contiguous run of `groups` taken out."""
    flags = [str(f) for f in flags]
    for removed in groups:
        i = next(i for i in range(len(flags)) if flags[i:i + len(removed)] == removed)
        flags = flags[:i] + flags[i + len(removed):]
    return flags


def launch(a, flags: list, out_dir: str) -> list:
    os.makedirs(out_dir, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
               os.path.join(REPO, "benchmarks", "memory_plan_rank.py"), out_dir, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{(result.stdout + result.stderr)[-4000:]}")
    return [json.load(open(os.path.join(out_dir, f"rank{r}.json"))) for r in range(a.nproc)]


def planner_layout(a, fields: dict) -> Layout:
    """The planner's description of the run: fp32 on CPU (torch's composite kernels), ZeRO-1."""
    dp = a.nproc // a.pp
    lay = Layout(pipeline_model_parallel_size=a.pp, expert_model_parallel_size=a.ep, data_parallel_size=dp,
                 pipeline_schedule="dualpipe", micro_batch_size=1, global_batch_size=2 * a.pp * dp,
                 seq_length=a.seq_length, recompute="norm_and_up_proj", fp8=False, bf16=False,
                 adam_moments_bf16=False, distributed_optimizer=True, composite_kernels=True)
    return replace(lay, **fields)


def planned(a, fields: dict, ema: bool) -> list:
    """Per pipeline rank: the planner's bytes per term (EMA: 4 B of host memory per parameter the rank holds, plus
    its staging copy in the parameters' dtype)."""
    model, lay = get_preset("tiny"), planner_layout(a, fields)
    rows = []
    for r in range(a.pp):
        est = estimate_memory(model, lay, rank=r)
        rows.append({**{t: est[t] for t in TERMS[:4]}, "ema_host": (4 + 4) * est["parameters"] if ema else 0})
    return rows


def measured(ranks: list, pp: int) -> list:
    """Per pipeline rank: the largest bytes per term over its data-parallel ranks."""
    return [{t: max(r[t] for r in ranks if r["pipeline_rank"] == p) for t in TERMS} for p in range(pp)]


def losses(ranks: list) -> list:
    return [it["lm_loss"] for it in ranks[-1]["iterations"]]


def median_step(ranks: list) -> float:
    """Median over iterations 2..N-1 (not the warm-up, not the metered last step) of the slowest rank's time."""
    times = [max(r["iterations"][i]["step_time_s"] for r in ranks) for i in range(len(ranks[0]["iterations"]))]
    return statistics.median(times[1:-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=8)
    p.add_argument("--pp", type=int, default=4)
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--train-iters", type=int, default=6)
    p.add_argument("--out", default=None, help="where the rank JSON files go (default: a temporary directory)")
    a = p.parse_args()
    if a.train_iters < 3:
        p.error("--train-iters must be >= 3 (the median leaves out the first and the metered last step)")
    out = a.out or tempfile.mkdtemp(prefix="memory_plan_")
    base = base_flags(a)
    print(f"tiny preset, {a.nproc} CPU ranks: DualPipe PP{a.pp} x EP{a.ep} x DP{a.nproc // a.pp}, fp32, "
          f"{a.train_iters} steps; flags: {' '.join(map(str, base))}\n")
    results = {}
    for name, (removed, added, fields) in RUNS.items():
        flags = without(base, removed) + added
        ranks = launch(a, flags, os.path.join(out, name.replace(" ", "_")))
        results[name] = dict(flags=flags, ranks=ranks, measured=measured(ranks, a.pp), planned=planned(a, fields, EMA[0] in flags))

    print("MiB per pipeline rank: measured / planner (measured/planner; * more than 10% apart)")
    print(f"{'run':22s} {'term':11s}" + "".join(f" {'pp rank ' + str(r):>27s}" for r in range(a.pp)))
    for name, res in results.items():
        for term in TERMS:
            cells = []
            for r in range(a.pp):
                m, e = res["measured"][r][term], res["planned"][r][term]
                ratio = f"{m / e:5.2f}" if e else ("    -" if not m else "  inf")
                star = "*" if e and abs(m / e - 1) > 0.10 else " "
                cells.append(f" {m / 2**20:7.3f} / {e / 2**20:7.3f} ({ratio}){star}")
            print(f"{name:22s} {term:11s}" + "".join(cells))
        print()

    print("lm loss per step:")
    for base in ("all on", "no FP8"):
        print(f"  {base:22s} {' '.join(f'{x:.6f}' for x in losses(results[base]['ranks']))}")
    for name, res in results.items():
        base = "all on" if FP8[0] in res["flags"] else "no FP8"
        if name != base:
            diff = max(abs(x - y) for x, y in zip(losses(res["ranks"]), losses(results[base]["ranks"])))
            print(f"  {name:22s} vs {base}: {'equal' if diff == 0 else f'max |diff| {diff:.3g}'}")
    on, off = median_step(results["all on"]["ranks"]), median_step(results["EMA off"]["ranks"])
    print(f"median step time: EMA on {on * 1e3:.0f} ms, EMA off {off * 1e3:.0f} ms ({(on / off - 1) * 100:+.1f}%)")
    print(f"rank files: {out}")


if __name__ == "__main__":
    main()
