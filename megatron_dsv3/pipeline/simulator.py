"""Replay a `SchedulePlan` with op costs and p2p latency; the published bubble formulas.

Each rank runs its op list in order; an op starts when the rank is free and the inputs of all its parts have
arrived (schedule_plan's dependency rules; a cross-rank input arrives `comm` after its producer ends, a
same-rank one at once).

Bubble convention (DeepSeek-V3 §3.2.1, DualPipe README): bubble of a rank = makespan of the whole step minus
that rank's busy time; the formulas give the largest one. In the formulas B is a full backward (input-grad b
plus weight-grad w) and F&B the overlapped pair. With comm = 0 the simulated plans reproduce them exactly:
  1F1B       (PP-1)(F+B)                             any f, b, w; every rank
  interleaved (PP-1)(F+B)/v, F, B of a whole stage     Megatron's order (Narayanan et al. 2021 §2.2), v chunks
                                                      per rank, micro-batches a multiple of PP; any f, b, w
  DualPipe   (PP/2-1)(F&B+B-3W)                      when b = f, w <= f and F&B >= f + w
  DualPipeV  (PP/2-1)(F&B+B-3W), PP = 2*pp_size stages on pp_size ranks, same conditions
Outside these conditions the DualPipe formulas are estimates (off by about one op per rank pair).
"""

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple, Union

from megatron_dsv3.pipeline.schedule_plan import B, BW, F, FB, W, Op, SchedulePlan, next_hop, prev_hop


@dataclass(frozen=True)
class Span:
    rank: int
    kind: str
    chunk: int
    mb: int
    start: float
    end: float
    bwd_chunk: Optional[int] = None  # FB only
    bwd_mb: Optional[int] = None

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("rank", "kind", "chunk", "mb", "start", "end")}
        if self.kind == FB:
            d.update(bwd_chunk=self.bwd_chunk, bwd_mb=self.bwd_mb)
        return d


def to_span(record: Union[Span, dict, tuple]) -> Span:
    """A Span from a Span, a dict with keys rank, kind, chunk, mb, start, end (FB: bwd_chunk, bwd_mb), or a
    tuple in that order."""
    if isinstance(record, Span):
        return record
    if isinstance(record, dict):
        missing = {"rank", "kind", "chunk", "mb", "start", "end"} - set(record)
        if missing:
            raise ValueError(f"timeline record {record} lacks keys {sorted(missing)}")
        return Span(**{k: record[k] for k in Span.__dataclass_fields__ if k in record})
    return Span(*record)


def group_by_rank(records: Iterable[Union[Span, dict, tuple]]) -> List[List[Span]]:
    spans = [to_span(r) for r in records]
    num_ranks = max(s.rank for s in spans) + 1
    out: List[List[Span]] = [[] for _ in range(num_ranks)]
    for s in spans:
        out[s.rank].append(s)
    return [sorted(row, key=lambda s: s.start) for row in out]


@dataclass
class Costs:
    """Op durations: f forward, b input-grad backward, w weight-grad backward (a full backward costs b + w),
    fb an overlapped F&B (default f + b + w, no overlap gain), comm p2p latency between ranks.

    per_op[(rank, kind, chunk)] overrides the scalar cost, e.g. with durations measured in a real run
    (`from_spans`)."""

    f: float = 1.0
    b: float = 1.0
    w: float = 1.0
    fb: Optional[float] = None
    comm: float = 0.0
    per_op: Dict[Tuple[int, str, int], float] = field(default_factory=dict)

    def duration(self, rank: int, op: Op) -> float:
        key = (rank, op.kind, op.chunk)
        if key in self.per_op:
            return self.per_op[key]
        scalar = {F: self.f, B: self.b, W: self.w, BW: self.b + self.w}
        if op.kind == FB:
            return self.f + self.b + self.w if self.fb is None else self.fb
        return scalar[op.kind]

    @classmethod
    def from_spans(cls, records: Iterable[Union[Span, dict, tuple]], comm: float = 0.0) -> "Costs":
        """Measured costs of a recorded timeline: the mean duration per (rank, kind, chunk), and per kind
        (F, B, W, FB) as the fallback for ops the recording lacks."""
        by_op: Dict[Tuple[int, str, int], List[float]] = defaultdict(list)
        by_kind: Dict[str, List[float]] = defaultdict(list)
        for s in map(to_span, records):
            by_op[(s.rank, s.kind, s.chunk)].append(s.end - s.start)
            by_kind[s.kind].append(s.end - s.start)
        mean = {k: sum(v) / len(v) for k, v in by_kind.items()}
        scalars = {name: mean[kind] for name, kind in (("f", F), ("b", B), ("w", W), ("fb", FB)) if kind in mean}
        return cls(comm=comm, per_op={k: sum(v) / len(v) for k, v in by_op.items()}, **scalars)


@dataclass
class SimResult:
    spans: List[List[Span]]  # per rank, in execution order
    total: float  # makespan: last end minus first start over all ranks


def _inputs(plan: SchedulePlan, rank: int, part: Op) -> List[Tuple[str, int, int, int]]:
    """Results `part` needs, as (F or B, rank, chunk, mb) of their producer; B stands for B or BW."""
    if part.kind == F:
        hop = prev_hop(plan, rank, part.chunk)
        return [] if hop is None else [(F, hop[0], hop[1], part.mb)]
    if part.kind in (B, BW):
        hop = next_hop(plan, rank, part.chunk)
        return [(F, rank, part.chunk, part.mb)] + ([] if hop is None else [(B, hop[0], hop[1], part.mb)])
    return [(B, rank, part.chunk, part.mb)]


def simulate(plan: SchedulePlan, costs: Costs) -> SimResult:
    """Replay every rank's op list in order; raise RuntimeError if the plan deadlocks."""
    done: Dict[Tuple[str, int, int, int], float] = {}  # (F or B, rank, chunk, mb) -> end time
    spans: List[List[Span]] = [[] for _ in plan.ranks]
    cursor = [0] * len(plan.ranks)
    free = [0.0] * len(plan.ranks)

    def arrival(key, rank) -> Optional[float]:
        if key not in done:
            return None
        return done[key] + (costs.comm if key[1] != rank else 0.0)

    progress = True
    while progress:
        progress = False
        for r, ops in enumerate(plan.ranks):
            while cursor[r] < len(ops):
                op = ops[cursor[r]]
                ready = [arrival(k, r) for part in op.parts() for k in _inputs(plan, r, part)]
                if any(t is None for t in ready):
                    break
                start = max([free[r]] + ready)
                end = start + costs.duration(r, op)
                for part in op.parts():
                    done[({BW: B}.get(part.kind, part.kind), r, part.chunk, part.mb)] = end
                spans[r].append(Span(r, op.kind, op.chunk, op.mb, start, end, op.bwd_chunk, op.bwd_mb))
                free[r] = end
                cursor[r] += 1
                progress = True
    stuck = [f"rank {r} at {plan.ranks[r][c]}" for r, c in enumerate(cursor) if c < len(plan.ranks[r])]
    if stuck:
        raise RuntimeError(f"{plan.name} plan deadlocks: " + ", ".join(stuck))
    starts = [row[0].start for row in spans if row]
    return SimResult(spans, max(free) - min(starts))


def bubble_time(spans_per_rank: List[List[Span]]) -> List[float]:
    """Per rank: makespan of the step (all ranks) minus the rank's busy time."""
    rows = [row for row in spans_per_rank if row]
    t0, t1 = min(row[0].start for row in rows), max(s.end for row in rows for s in row)
    return [(t1 - t0) - sum(s.end - s.start for s in row) for row in spans_per_rank]


def bubble_1f1b(pp: int, F: float, B: float) -> float:
    """(PP-1)(F+B), B a full backward."""
    return (pp - 1) * (F + B)


def bubble_interleaved(pp: int, F: float, B: float, num_chunks: int) -> float:
    """(PP-1)(F+B)/v with F, B the costs of a rank's whole stage (v chunks); with per-chunk costs f = F/v,
    b = B/v it is (PP-1)(f+b)."""
    return (pp - 1) * (F + B) / num_chunks


def bubble_dualpipe(pp: int, F: float, B: float, W: float, FB: float) -> float:
    """(PP/2-1)(F&B+B-3W) with PP ranks = PP stages, B a full backward, FB the overlapped F&B."""
    return (pp / 2 - 1) * (FB + B - 3 * W)


def bubble_dualpipev(pp: int, F: float, B: float, W: float, FB: float) -> float:
    """DualPipe's formula for 2*pp stages on pp ranks: (pp-1)(F&B+B-3W), per-stage costs."""
    return bubble_dualpipe(2 * pp, F, B, W, FB)


def published_bubble(schedule: str, pp: int, costs: Costs, num_chunks: int = 1) -> float:
    """The published bubble of `schedule` for per-chunk costs (full backward = b + w)."""
    full = costs.b + costs.w
    fb = costs.f + full if costs.fb is None else costs.fb
    if schedule == "1f1b":
        return bubble_1f1b(pp, costs.f, full)
    if schedule == "interleaved":
        return bubble_interleaved(pp, num_chunks * costs.f, num_chunks * full, num_chunks)
    if schedule == "dualpipe":
        return bubble_dualpipe(pp, costs.f, full, costs.w, fb)
    if schedule == "dualpipev":
        return bubble_dualpipev(pp, costs.f, full, costs.w, fb)
    raise ValueError(f"no published bubble formula for schedule {schedule!r}")
