"""DualPipe / DualPipeV runtime: placement, validation, and one training step on CPU ranks (gloo) against a
single-process run and against megatron's 1F1B.

Three torchrun launches (module-scoped): 1 rank (reference), 4 ranks PP=2 x EP=2 x DP=2, 4 ranks PP=4; each
multi-rank launch runs 1F1B, DualPipe and DualPipeV in one process.
"""

import glob
import json

import pytest
import torch

from conftest import torchrun
from megatron_dsv3.pipeline.placement import chunk_stages, num_stages, stage_layers, validate_dual_pipeline
from megatron_dsv3.pipeline.schedule_plan import build_plan, next_hop, stage_of
from megatron_dsv3.pipeline.timeline import render_timeline

SCRIPT = "tests/scripts/dualpipe_parity.py"
# 8 layers split over the 2*PP = 8 stages of DualPipeV at PP=4; 8 micro-batches on one DP replica
COMMON = ["--num-layers", "8", "--moe-layer-freq", "([0]*1+[1]*7)", "--micro-batch-size", "1",
          "--global-batch-size", "8", "--seq-length", "32", "--moe-router-bias-update-rate", "0"]
LAYOUTS = {
    "pp2_ep2_dp2": (4, ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2"]),
    "pp4": (4, ["--pipeline-model-parallel-size", "4"]),
}
SCHEDULES = ("megatron", "dualpipe", "dualpipev")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {"single": tmp_path_factory.mktemp("single")}
    torchrun(1, SCRIPT, out["single"], "megatron", *COMMON)
    for name, (nproc, flags) in LAYOUTS.items():
        out[name] = tmp_path_factory.mktemp(name)
        torchrun(nproc, SCRIPT, out[name], ",".join(SCHEDULES), *COMMON, *flags)
    return out


def load(out_dir):
    return [torch.load(path) for path in sorted(glob.glob(f"{out_dir}/rank*.pt"))]


@pytest.fixture(scope="module")
def reference(runs):
    (result,) = load(runs["single"])
    result = result["megatron"]
    return result["loss"], result["grad_norm"], result["grads"][0]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_step_matches_single_process(runs, reference, layout, schedule):
    """Loss (also of a forward-only pass), gradient norm and every gradient of every chunk (each DualPipe copy
    on its own) equal the single-process step; 1F1B passes the same check, so the schedules agree."""
    ref_loss, ref_norm, ref_grads = reference
    ranks = [r[schedule] for r in load(runs[layout])]
    losses = [r["loss"] for r in ranks if r["loss"] is not None]
    torch.testing.assert_close(torch.stack(losses).mean(), ref_loss, rtol=1e-5, atol=1e-6)
    eval_losses = [r["eval_loss"] for r in ranks if "eval_loss" in r]  # forward_only=True, same batch
    assert len(eval_losses) == len(losses)
    torch.testing.assert_close(torch.stack(eval_losses).mean(), ref_loss, rtol=1e-5, atol=1e-6)
    for r in ranks:
        assert r["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
    copies = {}  # name -> its gradient on every chunk holding it (DP replicas, DualPipe copies, embedding copies)
    for r in ranks:
        for chunk_grads in r["grads"]:
            for name, grad in chunk_grads.items():
                copies.setdefault(name, []).append(grad)
                torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert copies.keys() == ref_grads.keys()
    for name, grads in copies.items():  # bitwise: copies that start equal stay equal after the step
        assert all(torch.equal(g, grads[0]) for g in grads), name
    assert any("mtp.layers.0" in n for n in copies) and all(g.abs().sum() > 0 for g in ref_grads.values())


@pytest.mark.parametrize("schedule", ("dualpipe", "dualpipev"))
def test_trace_follows_the_plan(runs, schedule):
    """The recorded timeline has each rank's ops in plan order, p2p only between distinct ranks, and renders
    (what tools/pipeline_timeline.py --from-trace draws)."""
    path = f"{runs['pp4']}/{schedule}_trace.json"
    with open(path) as fh:
        ops = json.load(fh)
    plan = build_plan(schedule, 4, 8)
    for rank, planned in enumerate(plan.ranks):
        recorded = sorted((o for o in ops if o["rank"] == rank), key=lambda o: o["start"])
        assert [(o["kind"], o["chunk"], o["mb"]) for o in recorded] == [(p.kind, p.chunk, p.mb) for p in planned]
        assert all(o["end"] >= o["start"] >= 0 for o in recorded)
    with open(path.replace(".json", ".comm.json")) as fh:
        comm = json.load(fh)
    # every cross-rank hop of every micro-batch: one activation and one gradient, each sent and received
    hops = sum(1 for d, line in enumerate(plan.pipelines) for a, b in zip(line, line[1:]) if a[0] != b[0])
    assert len(comm) == 2 * 2 * hops * len(plan.microbatches[0])
    assert all(c["peer"] != c["rank"] for c in comm)
    png = render_timeline(ops, path.replace(".json", ".png"), schedule)
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("schedule,pp", [("dualpipe", 2), ("dualpipe", 4), ("dualpipev", 2), ("dualpipev", 3)])
def test_placement_matches_plan(schedule, pp):
    """Chunk c of rank r holds stage_of(plan, r, c); DualPipeV's last stage (head + MTP) sits on rank 0."""
    plan = build_plan(schedule, pp, 2 * pp)
    for rank in range(pp):
        assert chunk_stages(schedule, pp, rank) == [stage_of(plan, rank, c) for c in (0, 1)]
    if schedule == "dualpipev":
        assert chunk_stages(schedule, pp, 0) == [0, num_stages(schedule, pp) - 1]
        assert next_hop(plan, pp - 1, 0) == (pp - 1, 1)  # the turn of the V stays on the rank
    layers = [stage_layers(8 * num_stages(schedule, pp), schedule, pp, s) for s in range(num_stages(schedule, pp))]
    assert layers == [(8 * s, 8) for s in range(num_stages(schedule, pp))]


@pytest.mark.parametrize("args,match", [
    (("dualpipe", 3, 6, 12), "even --pipeline-model-parallel-size"),
    (("dualpipev", 1, 4, 4), "--pipeline-model-parallel-size >= 2"),
    (("dualpipev", 2, 6, 8), "--num-layers 6 must be divisible by the 4 stages"),
    (("dualpipe", 4, 8, 6), ">= 2 x --pipeline-model-parallel-size = 8"),
    (("dualpipe", 2, 8, 5), "an even number of micro-batches"),
    (("dualpipev", 2, 8, 3), ">= 2 x --pipeline-model-parallel-size = 4"),
])
def test_validation_names_the_flag(args, match):
    with pytest.raises(ValueError, match=match.replace("+", r"\+")):
        validate_dual_pipeline(*args)


def test_validation_rejects_virtual_stages_and_uneven_split():
    with pytest.raises(ValueError, match="--num-layers-per-virtual-pipeline-stage"):
        validate_dual_pipeline("dualpipev", 2, 8, 8, virtual_stages=2)
    with pytest.raises(ValueError, match="--decoder-first/last-pipeline-num-layers"):
        validate_dual_pipeline("dualpipe", 2, 8, 8, uneven_first_last=True)
    validate_dual_pipeline("dualpipev", 3, 12, 6)  # the smallest valid odd-PP DualPipeV
