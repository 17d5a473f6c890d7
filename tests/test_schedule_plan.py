"""Pipeline-schedule plans, their replay, the published bubble formulas and the timeline renderer.

Reference: the bubble formulas of DeepSeek-V3 §3.2.1 / the DualPipe README (B there is a full backward):
1F1B (PP-1)(F+B); DualPipe (PP/2-1)(F&B+B-3W); DualPipeV the same with PP = 2*pp stages on pp ranks.
The bubble of a rank is (step makespan - its busy time) and the formula is the largest one. With comm = 0,
1F1B matches for any costs; DualPipe/V match when the input-grad backward b equals the forward f (the paper's
figure draws F and B cells equally wide), w <= f and F&B >= f + w, so the cost sets below keep to that (F, B, W
distinct: F=1/B=2/W=1 and F=2/B=3/W=1) and one test shows the formula is off outside it.
"""

import importlib.util
import json
import os

import pytest

from megatron_dsv3.pipeline.schedule_plan import (
    BW,
    B,
    F,
    Op,
    W,
    build_plan,
    check_plan,
    next_hop,
    peak_activations,
    prev_hop,
    stage_of,
)
from megatron_dsv3.pipeline.simulator import (
    Costs,
    bubble_1f1b,
    bubble_dualpipe,
    bubble_dualpipev,
    bubble_interleaved,
    bubble_time,
    simulate,
)
from megatron_dsv3.pipeline.timeline import bubble_fraction, render_timeline

CASES = [
    (s, pp, m) for s in ("1f1b", "dualpipe", "dualpipev") for pp in (4, 8, 16) for m in (2 * pp, 2 * pp + 2, 3 * pp)
]


def _unit_ops(plan, rank):
    return [p for op in plan.ranks[rank] for p in op.parts()]


@pytest.mark.parametrize("schedule,pp,m", CASES)
def test_every_op_once(schedule, pp, m):
    plan = build_plan(schedule, pp, m)
    check_plan(plan)
    # Independent count: each rank computes m micro-batch passes of one stage's worth (1F1B, DualPipe) or
    # of two half stages (DualPipeV); every F has one backward and every deferred B one W.
    passes = 2 * m if schedule == "dualpipev" else m
    for r in range(pp):
        kinds = [p.kind for p in _unit_ops(plan, r)]
        assert kinds.count(F) == passes
        assert kinds.count(B) + kinds.count(BW) == passes
        assert kinds.count(W) == kinds.count(B)
        assert len({(p.kind, p.chunk, p.mb) for p in _unit_ops(plan, r)}) == len(kinds)


def test_dualpipe_turning_rank_follows_the_eight_steps():
    # PP=4, N=8, rank 1 (half-rank 1 of 2: where the directions meet), expanded by hand from DeepSeek's steps:
    # 1: no warm-up; 2: F0 F1 twice; 3: none; 4: two rounds, the first F&B split; 5: none;
    # 6: B1 B0 twice, the second round deferring W; 7: none; 8: the two W.
    expected = ["F0.0", "F1.4", "F0.1", "F1.5", "F0.2", "BW1.4", "F1.6&BW0.0", "F0.3&BW1.5", "F1.7&BW0.1",
                "BW1.6", "BW0.2", "B1.7", "B0.3", "W1.7", "W0.3"]
    assert [str(op) for op in build_plan("dualpipe", 4, 8).ranks[1]] == expected


def test_check_plan_catches_missing_and_misordered_ops():
    plan = build_plan("dualpipe", 4, 8)
    plan.ranks[2].pop()  # the last op is a W
    with pytest.raises(ValueError, match="rank 2"):
        check_plan(plan)
    plan = build_plan("dualpipev", 4, 8)
    ops = plan.ranks[0]
    i = next(k for k, op in enumerate(ops) if op.kind == B)
    j = next(k for k, op in enumerate(ops) if op == Op(W, ops[i].chunk, ops[i].mb))
    ops[i], ops[j] = ops[j], ops[i]
    with pytest.raises(ValueError, match="before its B"):
        check_plan(plan)


def test_placement_and_hops():
    pp = 4
    p1 = build_plan("1f1b", pp, 8)
    assert [stage_of(p1, r, 0) for r in range(pp)] == [0, 1, 2, 3]
    assert prev_hop(p1, 0, 0) is None and next_hop(p1, 3, 0) is None and next_hop(p1, 1, 0) == (2, 0)
    dp = build_plan("dualpipe", pp, 8)
    assert [stage_of(dp, r, 1) for r in range(pp)] == [3, 2, 1, 0]  # reverse direction: copy of stage PP-1-r
    assert next_hop(dp, 2, 1) == (1, 1) and prev_hop(dp, 3, 1) is None and next_hop(dp, 0, 1) is None
    assert {p.mb for p in _unit_ops(dp, 3) if p.kind == F and p.chunk == 1} == set(range(4, 8))
    dv = build_plan("dualpipev", pp, 8)
    assert [stage_of(dv, r, 1) for r in range(pp)] == [7, 6, 5, 4]
    assert next_hop(dv, 3, 0) == (3, 1)  # the V turns on the last rank: a local hand-over
    assert next_hop(dv, 0, 1) is None and prev_hop(dv, 0, 0) is None
    with pytest.raises(ValueError, match="holds no chunk 1"):
        stage_of(p1, 0, 1)


def test_replay_detects_deadlock():
    plan = build_plan("1f1b", 4, 8)
    plan.ranks[1].insert(0, plan.ranks[1].pop(plan.ranks[1].index(Op(BW, 0, 0))))  # backward before any forward
    with pytest.raises(RuntimeError, match="deadlocks"):
        simulate(plan, Costs())


FORMULAS = {
    "1f1b": lambda pp, c: bubble_1f1b(pp, c.f, c.b + c.w),
    "dualpipe": lambda pp, c: bubble_dualpipe(pp, c.f, c.b + c.w, c.w, c.fb),
    "dualpipev": lambda pp, c: bubble_dualpipev(pp, c.f, c.b + c.w, c.w, c.fb),
}
# (f, b, w, F&B): the paper's F=1 B=2 W=1 with F&B=3 (no overlap gain) and F&B=2 = f+w (the largest gain the
# formula covers; it also needs the turning rank's split first F&B); F=2 B=3 W=1 with F&B = 3 and 4.5
COSTS = [Costs(1, 1, 1, fb=3.0), Costs(1, 1, 1, fb=2.0), Costs(2, 2, 1, fb=3.0), Costs(2, 2, 1, fb=4.5)]


@pytest.mark.parametrize("schedule,pp,m", CASES)
def test_simulated_bubble_equals_published_formula(schedule, pp, m):
    plan = build_plan(schedule, pp, m)
    for costs in COSTS + ([Costs(1, 3, 0.5)] if schedule == "1f1b" else []):
        bubbles = bubble_time(simulate(plan, costs).spans)
        assert max(bubbles) == pytest.approx(FORMULAS[schedule](pp, costs), abs=1e-9), costs
        if schedule == "1f1b" or costs.fb == costs.f + costs.b + costs.w:  # no overlap gain: equal busy time
            assert min(bubbles) == pytest.approx(max(bubbles), abs=1e-9)


INTERLEAVED = [(pp, m, v) for pp in (4, 8, 16) for m in (pp, 2 * pp, 3 * pp) for v in (2, 3)]


@pytest.mark.parametrize("pp,m,v", INTERLEAVED)
def test_interleaved_plan_reproduces_megatron_formula(pp, m, v):
    """Megatron's interleaved order (chunk c of rank r = stage c*PP+r): every op once, and the replayed bubble
    is (PP-1)(F+B)/v for a rank's whole-stage costs F = v*f, B = v*(b+w), on every rank."""
    plan = build_plan("interleaved", pp, m, num_chunks=v)
    check_plan(plan)
    assert [stage_of(plan, 1, c) for c in range(v)] == [c * pp + 1 for c in range(v)]
    for costs in (Costs(1, 1, 1), Costs(1, 2, 0.5), Costs(2, 1, 1)):
        bubbles = bubble_time(simulate(plan, costs).spans)
        expected = bubble_interleaved(pp, v * costs.f, v * (costs.b + costs.w), v)
        assert max(bubbles) == pytest.approx(expected) and min(bubbles) == pytest.approx(expected)
    assert max(peak_activations(plan)) == min(2 * (pp - 1) + (v - 1) * pp + 1, m * v)  # chunks of 1/v stage


def test_interleaved_needs_whole_groups_of_pp():
    with pytest.raises(ValueError, match="multiple of pp_size=4"):
        build_plan("interleaved", 4, 10)
    with pytest.raises(ValueError, match="num_chunks >= 2"):
        build_plan("interleaved", 4, 8, num_chunks=1)


def test_dualpipe_formula_is_an_estimate_when_b_differs_from_f():
    costs = Costs(1, 2, 1, fb=4.0)  # input-grad backward twice the forward
    bubble = max(bubble_time(simulate(build_plan("dualpipe", 8, 16), costs).spans))
    assert bubble != pytest.approx(FORMULAS["dualpipe"](8, costs))


def test_step_time_and_comm_latency():
    pp, m, costs = 4, 8, Costs(1, 1, 1)
    assert simulate(build_plan("1f1b", pp, m), costs).total == (m + pp - 1) * 3  # (m+PP-1)(F+B)
    slow = simulate(build_plan("1f1b", pp, m), Costs(1, 1, 1, comm=0.25)).total
    assert slow >= (m + pp - 1) * 3 + 2 * (pp - 1) * 0.25  # the first micro-batch's round trip crosses 2(PP-1) links


def test_measured_costs_predict_the_same_step():
    plan = build_plan("dualpipe", 4, 12)
    costs = Costs(1.0, 1.5, 0.5, fb=2.5, comm=0.1, per_op={(1, F, 0): 1.3})
    recorded = simulate(plan, costs)
    flat = [s.as_dict() for row in recorded.spans for s in row]
    replayed = simulate(plan, Costs.from_spans(flat, comm=0.1))
    assert replayed.total == pytest.approx(recorded.total)


@pytest.mark.parametrize("pp", [4, 8, 16])
def test_dualpipe_bubbles_below_1f1b(pp):
    m, stage = 2 * pp, Costs(1, 1, 1, fb=2.5)
    half = Costs(0.5, 0.5, 0.5, fb=1.25)  # a DualPipeV chunk is half a stage
    b_1f1b = max(bubble_time(simulate(build_plan("1f1b", pp, m), stage).spans))
    b_dp = max(bubble_time(simulate(build_plan("dualpipe", pp, m), stage).spans))
    b_dv = max(bubble_time(simulate(build_plan("dualpipev", pp, m), half).spans))
    assert b_dp < b_1f1b and b_dv < b_1f1b


@pytest.mark.parametrize("pp", [4, 8])
def test_peak_activations_match_published_counts(pp):
    assert max(peak_activations(build_plan("1f1b", pp, 3 * pp))) == pp
    assert max(peak_activations(build_plan("dualpipe", pp, 3 * pp))) == pp + 1
    assert max(peak_activations(build_plan("dualpipev", pp, 3 * pp))) == 2 * pp + 1  # half-size chunks


@pytest.mark.parametrize(
    "schedule,pp,m,match",
    [
        ("1f1b", 1, 4, "pp_size >= 2"),
        ("dualpipe", 6, 11, "even num_microbatches >= 2\\*pp_size=12"),
        ("dualpipe", 4, 6, "even num_microbatches >= 2\\*pp_size=8"),
        ("dualpipe", 5, 10, "even pp_size"),
        ("dualpipev", 4, 7, "num_microbatches >= 2\\*pp_size=8"),
        ("gpipe", 4, 8, "unknown pipeline schedule"),
    ],
)
def test_invalid_inputs(schedule, pp, m, match):
    with pytest.raises(ValueError, match=match) as err:
        build_plan(schedule, pp, m)
    assert "\n" not in str(err.value)


def test_render_timeline_and_bubble_fraction(tmp_path):
    pp, m = 4, 8
    result = simulate(build_plan("1f1b", pp, m), Costs(1, 1, 1))
    assert bubble_fraction(result.spans) == pytest.approx((pp - 1) / (m + pp - 1))
    flat = [s.as_dict() for row in result.spans for s in row]  # a recorded trace's format
    assert bubble_fraction(flat) == pytest.approx(bubble_fraction(result.spans))
    dual = simulate(build_plan("dualpipe", pp, m), Costs(1, 1, 1, fb=2.5))
    for spans, name in ((flat, "1f1b.png"), (dual.spans, "dualpipe.png")):
        path = render_timeline(spans, str(tmp_path / name), name)
        with open(path, "rb") as fh:
            head = fh.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000


def _load_cli():
    path = os.path.join(os.path.dirname(__file__), "..", "tools", "pipeline_timeline.py")
    spec = importlib.util.spec_from_file_location("pipeline_timeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_table_and_trace(tmp_path, capsys):
    cli = _load_cli()
    cli.main(["--pp", "4", "--microbatches", "8", "--schedule", "dualpipe", "--out", str(tmp_path)])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("dualpipe"))
    assert row.split()[3:5] == ["2", "2"]  # simulated bubble, formula (PP/2-1)(F&B+B-3W) = 1*(3+2-3)
    trace = tmp_path / "trace.json"
    spans = simulate(build_plan("1f1b", 4, 8), Costs(1, 1, 1)).spans
    trace.write_text(json.dumps([s.as_dict() for row in spans for s in row]))
    cli.main(["--from-trace", str(trace), "--schedule", "1f1b", "--microbatches", "8", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "predicted 1f1b step at pp=4 microbatches=8: 33" in out and (tmp_path / "trace.png").stat().st_size > 0
    trace.write_text(json.dumps([{"rank": 0, "kind": "F"}]))
    with pytest.raises(SystemExit, match="lacks keys"):
        cli.main(["--from-trace", str(trace), "--out", str(tmp_path)])
