"""DualPipe / DualPipeV runtime: placement, validation, and one training step on CPU ranks (gloo) against a
single-process run and against megatron's 1F1B.

Three torchrun launches (module-scoped): 1 rank (reference), 4 ranks PP=2 x EP=2 x DP=2, 4 ranks PP=4; each
multi-rank launch runs 1F1B, DualPipe and DualPipeV in one process (PP=4 also megatron's interleaved 1F1B; PP=2 x EP=2
also both with --overlap-moe-expert-parallel-comm).
Checkpoints under DualPipe/DualPipeV and 50 training steps of DualPipeV against 1F1B run pretrain_dsv3.py.
"""

import glob
import json

import pytest
import torch

from conftest import read_metrics, torchrun
from megatron_dsv3.pipeline.placement import chunk_stages, num_stages, stage_layers, validate_dual_pipeline
from megatron_dsv3.pipeline.recording import SavedActivationMeter
from megatron_dsv3.pipeline.schedule_plan import build_plan, next_hop, stage_of
from megatron_dsv3.pipeline.timeline import render_timeline

SCRIPT = "tests/scripts/dualpipe_parity.py"
# 8 layers split over the 2*PP = 8 stages of DualPipeV at PP=4; 8 micro-batches on one DP replica
COMMON = ["--num-layers", "8", "--moe-layer-freq", "([0]*1+[1]*7)", "--micro-batch-size", "1",
          "--global-batch-size", "8", "--seq-length", "32", "--moe-router-bias-update-rate", "0"]
# megatron's interleaved schedule needs PP >= 3 on gloo
LAYOUTS = {
    "pp2_ep2_dp2": (4, ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2"],
                    ("megatron", "dualpipe", "dualpipev", "dualpipe+overlap", "dualpipev+overlap")),
    "pp4": (4, ["--pipeline-model-parallel-size", "4"], ("megatron", "interleaved", "dualpipe", "dualpipev")),
    # 1 + 3 + 3 + 1 layers: DualPipe's stages split like 1F1B's (DeepSeek-V3's 61 layers: 4 + 14 x 4 + 1)
    "pp4_uneven": (4, ["--pipeline-model-parallel-size", "4", "--decoder-first-pipeline-num-layers", "1",
                       "--decoder-last-pipeline-num-layers", "1"], ("dualpipe",)),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {"single": tmp_path_factory.mktemp("single")}
    torchrun(1, SCRIPT, out["single"], "megatron", *COMMON)
    for name, (nproc, flags, schedules) in LAYOUTS.items():
        out[name] = tmp_path_factory.mktemp(name)
        torchrun(nproc, SCRIPT, out[name], ",".join(schedules), *COMMON, *flags)
    return out


def load(out_dir):
    return [torch.load(path) for path in sorted(glob.glob(f"{out_dir}/rank*.pt"))]


@pytest.fixture(scope="module")
def reference(runs):
    (result,) = load(runs["single"])
    result = result["megatron"]
    return result["loss"], result["grad_norm"], result["grads"][0]


@pytest.mark.parametrize("layout,schedule", [(name, s) for name, (_, _, ss) in LAYOUTS.items() for s in ss])
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
    unsplit = {name for r in ranks for name in r["unsplit_linears"]}
    if schedule.startswith("dualpipe"):  # every linear defers its weight-gradient but megatron's output head
        assert unsplit == {"output_layer"}
    else:
        assert any(".linear_kv_down_proj" in name for name in unsplit)


@pytest.mark.parametrize("schedule,plan_name", [("megatron", "1f1b"), ("interleaved", "interleaved"),
                                                ("dualpipe", "dualpipe"), ("dualpipev", "dualpipev")])
def test_trace_follows_the_plan(runs, schedule, plan_name):
    """The recorded timeline (megatron's schedules through recording.record_megatron_ops) has each rank's ops in
    the order of the schedule's plan, DualPipe's p2p only between distinct ranks and its waits for inputs
    outside the op spans, and renders (what tools/pipeline_timeline.py --from-trace draws)."""
    path = f"{runs['pp4']}/{schedule}_trace.json"
    with open(path) as fh:
        ops = json.load(fh)
    plan = build_plan(plan_name, 4, 8)
    for rank, planned in enumerate(plan.ranks):
        recorded = sorted((o for o in ops if o["rank"] == rank), key=lambda o: o["start"])
        assert [(o["kind"], o["chunk"], o["mb"]) for o in recorded] == [(p.kind, p.chunk, p.mb) for p in planned]
        assert all(o["end"] >= o["start"] >= 0 for o in recorded)
        assert all(o["end"] > o["start"] for o in recorded if o["kind"] == "W")  # W runs the deferred wgrad GEMMs
    with open(path.replace(".json", ".comm.json")) as fh:
        comm = json.load(fh)
    messages = [c for c in comm if c["kind"] in ("send", "recv")]
    waits = [c for c in comm if c["kind"] == "wait"]
    if plan_name in ("1f1b", "interleaved"):
        assert not comm  # megatron's p2p is not recorded: its waits are the gaps between spans
    else:
        # every cross-rank hop of every micro-batch: one activation and one gradient, each sent and received
        hops = sum(1 for d, line in enumerate(plan.pipelines) for a, b in zip(line, line[1:]) if a[0] != b[0])
        assert len(messages) == 2 * 2 * hops * len(plan.microbatches[0])
        assert all(c["peer"] != c["rank"] for c in messages)
        assert 0 < len(waits) <= len(messages) // 2  # at most one blocking wait per received message
        for w in waits:
            assert all(o["end"] <= w["start"] or o["start"] >= w["end"] for o in ops if o["rank"] == w["rank"])
    png = render_timeline(ops, path.replace(".json", ".png"), schedule, comm)
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("schedule", ["dualpipe", "dualpipev"])
def test_overlapped_pairs_alternate_at_the_expert_all_to_alls(runs, schedule):
    """--overlap-moe-expert-parallel-comm: the same step bit for bit; inside every F&B pair the forward and the
    backward half take turns, each handing over when it has posted an expert all-to-all (dispatch, combine
    and their gradients), so every transfer but the last of a pair is in flight while the other half computes."""
    ranks = load(runs["pp2_ep2_dp2"])
    for r in ranks:
        plain, overlapped = r[schedule], r[f"{schedule}+overlap"]
        assert (plain["loss"] is None) == (overlapped["loss"] is None)
        if plain["loss"] is not None:
            assert torch.equal(plain["loss"], overlapped["loss"])
        for mine, theirs in zip(plain["grads"], overlapped["grads"]):
            assert mine.keys() == theirs.keys() and all(torch.equal(mine[n], theirs[n]) for n in mine)
    path = f"{runs['pp2_ep2_dp2']}/{schedule}+overlap_trace"
    with open(f"{path}.json") as fh:
        ops = json.load(fh)
    with open(f"{path}.comm.json") as fh:
        comm = json.load(fh)
    pairs = [o for o in ops if o["kind"] == "FB"]
    assert pairs
    for op in pairs:
        inside = sorted((c for c in comm if c["rank"] == op["rank"] and c["kind"] in ("piece", "a2a")
                         and op["start"] <= c["start"] <= op["end"]), key=lambda c: c["start"])
        pieces = [c["half"] for c in inside if c["kind"] == "piece"]
        transfers = [c for c in inside if c["kind"] == "a2a"]
        assert {(c["half"], c["label"]) for c in transfers} == {
            ("F", "dispatch"), ("F", "combine"), ("B", "combine grad"), ("B", "dispatch grad")}
        halves = {"F": (op["chunk"], op["mb"]), "B": (op["bwd_chunk"], op["bwd_mb"])}
        assert all((c["chunk"], c["mb"]) == halves[c["half"]] for c in transfers)
        alternating = pieces[:2 * min(pieces.count("F"), pieces.count("B"))]
        assert alternating == ["F", "B"] * (len(alternating) // 2) and len(alternating) >= 4
        for t in transfers:
            assert 0 <= t["exposed"] <= t["end"] - t["start"] + 1e-6
    png = render_timeline(ops, f"{path}.png", schedule, comm)
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
        validate_dual_pipeline("dualpipev", 2, 8, 8, uneven_first_last=True)
    validate_dual_pipeline("dualpipe", 16, 61, 32, uneven_first_last=True)  # DeepSeek-V3: 4 + 14 x 4 + 1
    validate_dual_pipeline("dualpipev", 3, 12, 6)  # the smallest valid odd-PP DualPipeV


def test_saved_activation_meter_counts_each_storage_once():
    """The benchmark's activation memory: tensors autograd saves, once per storage, parameters excluded, freed
    by the backward."""
    weight = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(32, 64, requires_grad=True)
    with SavedActivationMeter([weight]) as meter:
        y = torch.tanh(x @ weight)  # mm saves x and the weight, tanh its output
        loss = (y * y).sum()  # mul saves y twice: one storage
        assert meter.live == x.nbytes + y.nbytes
        loss.backward()
    assert meter.live == 0 and meter.peak == x.nbytes + y.nbytes


TINY = ["--pipeline-model-parallel-size", "2", "--seq-length", "16", "--micro-batch-size", "1",
        "--global-batch-size", "4"]


@pytest.fixture(scope="module")
def dual_checkpoints(tmp_path_factory):
    """Per schedule at PP=2: 4 steps saving at 2 and 4, then a resume from step 2 (`--load DIR/iter_0000002`);
    a DualPipeV checkpoint of step 2 loaded by 1F1B on one rank."""
    root = tmp_path_factory.mktemp("dual_ckpt")
    for schedule in ("dualpipe", "dualpipev"):
        ckpt = root / schedule
        torchrun(2, "pretrain_dsv3.py", *TINY, "--pipeline-schedule", schedule, "--train-iters", "4",
                 "--save", ckpt, "--save-interval", "2", "--metrics-jsonl", root / f"{schedule}_full.jsonl")
        torchrun(2, "pretrain_dsv3.py", *TINY, "--pipeline-schedule", schedule, "--train-iters", "4",
                 "--load", ckpt / "iter_0000002", "--metrics-jsonl", root / f"{schedule}_resumed.jsonl")
    torchrun(1, "pretrain_dsv3.py", *TINY[2:], "--train-iters", "3", "--load", root / "dualpipev" / "iter_0000002",
             "--no-load-optim",
             "--metrics-jsonl", root / "1f1b_pp1.jsonl")
    return root


@pytest.mark.parametrize("schedule", ("dualpipe", "dualpipev"))
def test_dual_checkpoint_resume_is_bit_identical(dual_checkpoints, schedule):
    full = read_metrics(dual_checkpoints / f"{schedule}_full.jsonl")
    resumed = read_metrics(dual_checkpoints / f"{schedule}_resumed.jsonl")
    assert [m["iteration"] for m in resumed] == [3, 4]
    for key in ("lm_loss", "mtp_loss", "grad_norm"):
        assert [m[key] for m in resumed] == [m[key] for m in full[2:]], key


def test_dualpipe_checkpoint_stores_each_stage_once(dual_checkpoints):
    """DualPipe's mirrored copies share their keys: the checkpoint has the same tensors as DualPipeV's (one copy
    of every layer, embedding, head and MTP)."""
    from megatron.core.dist_checkpointing import load_tensors_metadata

    keys = {s: set(load_tensors_metadata(str(dual_checkpoints / s / "iter_0000002"))) for s in ("dualpipe", "dualpipev")}
    assert keys["dualpipe"] == keys["dualpipev"]
    expected = {"embedding.word_embeddings.weight", "output_layer.weight", "decoder.layers.0.input_layernorm.weight",
                "decoder.layers.3.input_layernorm.weight", "optimizer.state.exp_avg.output_layer.weight"}
    assert expected <= keys["dualpipe"] and any(k.startswith("mtp.layers.0.") for k in keys["dualpipe"])


def test_dualpipev_checkpoint_loads_under_1f1b(dual_checkpoints):
    """DualPipeV's 4 stages on 2 ranks resharded to one 1F1B rank: the same weights and data position."""
    full = read_metrics(dual_checkpoints / "dualpipev_full.jsonl")
    pp1 = read_metrics(dual_checkpoints / "1f1b_pp1.jsonl")
    assert [m["iteration"] for m in pp1] == [3]
    assert pp1[0]["lm_loss"] == pytest.approx(full[2]["lm_loss"], rel=1e-5)


def test_dualpipev_trains_50_steps_like_1f1b(tmp_path):
    """The tiny preset, 50 steps at PP=2: DualPipeV's losses equal 1F1B's at every step (fp32 tolerance)."""
    flags = [*TINY, "--train-iters", "50", "--log-interval", "1"]
    torchrun(2, "pretrain_dsv3.py", *flags, "--metrics-jsonl", tmp_path / "1f1b.jsonl")
    torchrun(2, "pretrain_dsv3.py", *flags, "--pipeline-schedule", "dualpipev", "--metrics-jsonl", tmp_path / "v.jsonl")
    one_f_one_b, dualpipev = read_metrics(tmp_path / "1f1b.jsonl"), read_metrics(tmp_path / "v.jsonl")
    assert [m["iteration"] for m in dualpipev] == list(range(1, 51))
    for a, b in zip(one_f_one_b, dualpipev):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-4), a["iteration"]
        assert b["mtp_loss"] == pytest.approx(a["mtp_loss"], rel=1e-4), a["iteration"]
    assert dualpipev[-1]["lm_loss"] < dualpipev[0]["lm_loss"]


def test_schedule_benchmark_table(tmp_path):
    """benchmarks/pipeline_schedules.py at PP=2 on 2 ranks: a row per schedule it can run, the refusal of the
    ones it cannot (interleaved at PP=2 on gloo; the all-to-all overlap without expert parallelism), timelines, and
    memory where the placement puts it."""
    out = torchrun(2, "benchmarks/pipeline_schedules.py", "--pp", "2", "--num-layers", "4", "--microbatches", "4",
                   "--seq-length", "16", "--steps", "1", "--schedules", "1f1b,interleaved,dualpipev,dualpipev+overlap",
                   "--out", tmp_path)
    assert "peak bytes of tensors saved for backward" in out
    with open(tmp_path / "results.json") as fh:
        results = json.load(fh)
    rows = {r["schedule"]: r for r in results["rows"]}
    assert set(rows) == {"1f1b", "dualpipev"} and "gloo cannot tell apart" in results["skipped"]["interleaved"]
    assert "--expert-model-parallel-size > 1" in results["skipped"]["dualpipev+overlap"]
    for r in rows.values():
        assert 0 < r["bubble_fraction"] < 1 and r["predicted_ms"] > 0 and min(r["act_mb"]) > 0
        assert (tmp_path / f"{r['schedule']}_trace.png").stat().st_size > 0
    assert rows["1f1b"]["param_mb"][1] > rows["1f1b"]["param_mb"][0]  # output head and MTP on the last stage
    assert rows["dualpipev"]["param_mb"][0] > rows["dualpipev"]["param_mb"][1]  # ... on rank 0 in the V
