"""Pipeline-schedule plans: the ordered list of compute ops every pipeline rank runs (no torch).

A plan is the single source of truth for a runtime executor and for the simulator.

Ops (`Op.kind`):
  F   forward of (chunk, mb)
  B   input-grad backward of (chunk, mb); its weight-grad is deferred to a later W
  W   weight-grad backward of the oldest deferred B on this rank (FIFO; `chunk`/`mb` name it)
  BW  full backward (input-grad and weight-grad together)
  FB  forward of (chunk, mb) overlapped with a full backward of (bwd_chunk, bwd_mb): DeepSeek-V3's F&B

`chunk` is a model chunk held by the rank: 1F1B has chunk 0 only; interleaved 1F1B's chunk c of rank r holds
stage c*PP+r (Megatron's virtual pipeline); DualPipe's chunk 0 is the forward
direction (micro-batches 0..N/2-1 enter at rank 0) and chunk 1 the reverse direction (micro-batches
N/2..N-1 enter at rank PP-1); DualPipeV's chunk 0 is stage `rank` and chunk 1 stage 2*PP-1-rank.

Dependencies (stage s of a pipeline, micro-batch mb; `prev_hop`/`next_hop` name the neighbouring (rank, chunk)):
  F(s, mb)       needs the output of F(s-1, mb)                       (s > 0; s = 0 reads the data)
  B/BW(s, mb)    needs F(s, mb) and the input-grad of B/BW(s+1, mb)    (the last stage starts from its loss)
  W(s, mb)       needs B(s, mb)
Every op sends its results (activation to next_hop, input-grad to prev_hop) when it ends; an FB op starts
when the inputs of both halves are there. DualPipe's last stage of a direction (rank PP-1 for chunk 0, rank 0
for chunk 1) and DualPipeV's chunk 1 on rank 0 compute the loss in their F. Each rank runs its list in order;
ranks are coupled only through these dependencies, so any executor honouring them cannot deadlock
(`simulator.simulate` replays the lists and raises if one would).
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

F, B, W, BW, FB = "F", "B", "W", "BW", "FB"
OP_KINDS = (F, B, W, BW, FB)


@dataclass(frozen=True)
class Op:
    kind: str
    chunk: int
    mb: int
    bwd_chunk: Optional[int] = None  # FB only: the backward half (a full backward, BW)
    bwd_mb: Optional[int] = None

    def parts(self) -> Tuple["Op", ...]:
        """The unit ops this op runs: (F, BW) for FB, (self,) otherwise."""
        if self.kind == FB:
            return Op(F, self.chunk, self.mb), Op(BW, self.bwd_chunk, self.bwd_mb)
        return (self,)

    def __str__(self) -> str:
        if self.kind == FB:
            return f"F{self.chunk}.{self.mb}&BW{self.bwd_chunk}.{self.bwd_mb}"
        return f"{self.kind}{self.chunk}.{self.mb}"


@dataclass(frozen=True)
class SchedulePlan:
    """Per-rank op lists plus the stage placement.

    pipelines[d] lists the (rank, chunk) holding stage 0, 1, ... of pipeline (direction) d, and
    microbatches[d] the micro-batch ids that travel through it.
    """

    name: str
    pp_size: int
    num_microbatches: int
    ranks: List[List[Op]]
    pipelines: List[List[Tuple[int, int]]]
    microbatches: List[List[int]]

    def chunks(self, rank: int) -> List[int]:
        return sorted(c for line in self.pipelines for (r, c) in line if r == rank)


def _locate(plan: SchedulePlan, rank: int, chunk: int) -> Tuple[int, int]:
    for d, line in enumerate(plan.pipelines):
        if (rank, chunk) in line:
            return d, line.index((rank, chunk))
    raise ValueError(f"{plan.name}: rank {rank} holds no chunk {chunk} (chunks: {plan.chunks(rank)})")


def stage_of(plan: SchedulePlan, rank: int, chunk: int) -> int:
    """Model stage index (0 = embedding side) of `chunk` on `rank`; DualPipe's chunk 1 holds a copy of stage
    PP-1-rank."""
    return _locate(plan, rank, chunk)[1]


def next_hop(plan: SchedulePlan, rank: int, chunk: int) -> Optional[Tuple[int, int]]:
    """(rank, chunk) that receives this chunk's forward output (and sends back its output-grad); None at the
    last stage. The rank may be this rank (DualPipeV's turn at rank PP-1): a local hand-over, no p2p."""
    d, s = _locate(plan, rank, chunk)
    line = plan.pipelines[d]
    return line[s + 1] if s + 1 < len(line) else None


def prev_hop(plan: SchedulePlan, rank: int, chunk: int) -> Optional[Tuple[int, int]]:
    """(rank, chunk) whose forward output is this chunk's input; None at stage 0 (reads the data)."""
    d, s = _locate(plan, rank, chunk)
    return plan.pipelines[d][s - 1] if s > 0 else None


def microbatches_of(plan: SchedulePlan, rank: int, chunk: int) -> List[int]:
    """Micro-batch ids that pass through `chunk` on `rank`."""
    return plan.microbatches[_locate(plan, rank, chunk)[0]]


def _check_pp(pp_size: int, num_microbatches: int) -> None:
    if pp_size < 2:
        raise ValueError(f"pipeline schedules need pp_size >= 2, got {pp_size}")
    if num_microbatches < 1:
        raise ValueError(f"num_microbatches must be >= 1, got {num_microbatches}")


def plan_1f1b(pp_size: int, num_microbatches: int) -> SchedulePlan:
    """1F1B (PipeDream-flush): rank r runs min(PP-r-1, N) warm-up forwards, then alternates F and full
    backward, then drains the remaining backwards."""
    _check_pp(pp_size, num_microbatches)
    n = num_microbatches
    ranks = []
    for r in range(pp_size):
        warmup = min(pp_size - r - 1, n)
        ops = [Op(F, 0, i) for i in range(warmup)]
        for i in range(n - warmup):
            ops += [Op(F, 0, warmup + i), Op(BW, 0, i)]
        ops += [Op(BW, 0, i) for i in range(n - warmup, n)]
        ranks.append(ops)
    return SchedulePlan("1f1b", pp_size, n, ranks, [[(r, 0) for r in range(pp_size)]], [list(range(n))])


def plan_interleaved(pp_size: int, num_microbatches: int, num_chunks: int = 2) -> SchedulePlan:
    """Megatron-Core's interleaved 1F1B (Narayanan et al. 2021 §2.2), with its default micro-batch group of
    PP per virtual stage: forwards walk the chunks in groups of PP micro-batches (mb 0..PP-1 through chunk 0,
    then chunk 1, ..., then the next PP), backwards the same groups with the chunks reversed; rank r runs
    2(PP-r-1) + (v-1)PP warm-up forwards, then alternates F and BW, then drains."""
    _check_pp(pp_size, num_microbatches)
    if num_chunks < 2 or num_microbatches % pp_size:
        raise ValueError(f"interleaved needs num_chunks >= 2 and num_microbatches a multiple of pp_size={pp_size}, "
                         f"got {num_chunks} chunks and {num_microbatches} micro-batches")
    P, n, v = pp_size, num_microbatches, num_chunks
    table = [(c, mb) for first in range(0, n, P) for c in range(v) for mb in range(first, first + P)]
    forwards = [Op(F, c, mb) for c, mb in table]
    backwards = [Op(BW, v - 1 - c, mb) for c, mb in table]
    ranks = []
    for r in range(P):
        warmup = min(2 * (P - r - 1) + (v - 1) * P, n * v)
        ops = forwards[:warmup]
        for i in range(n * v - warmup):
            ops += [forwards[warmup + i], backwards[i]]
        ranks.append(ops + backwards[n * v - warmup:])
    pipelines = [[(r, c) for c in range(v) for r in range(P)]]
    return SchedulePlan("interleaved", P, n, ranks, pipelines, [list(range(n))])


class _RankOps:
    """Builds one rank's op list from phase-level steps: per-phase F/B micro-batch counters and a FIFO of
    deferred weight-grads (a W always runs the oldest B that deferred its weight-grad)."""

    def __init__(self, chunk_of_phase: Tuple[int, int], mbs_of_phase: Tuple[List[int], List[int]]):
        self.chunk_of_phase = chunk_of_phase
        self.mbs_of_phase = mbs_of_phase
        self.next_f = [0, 0]
        self.next_b = [0, 0]
        self.deferred: List[Op] = []
        self.ops: List[Op] = []

    def _take(self, counter: List[int], phase: int) -> Tuple[int, int]:
        mb = self.mbs_of_phase[phase][counter[phase]]
        counter[phase] += 1
        return self.chunk_of_phase[phase], mb

    def f(self, phase: int) -> None:
        self.ops.append(Op(F, *self._take(self.next_f, phase)))

    def b(self, phase: int, defer_w: bool) -> None:
        op = Op(B if defer_w else BW, *self._take(self.next_b, phase))
        self.ops.append(op)
        if defer_w:
            self.deferred.append(Op(W, op.chunk, op.mb))

    def w(self) -> None:
        self.ops.append(self.deferred.pop(0))

    def fb(self, f_phase: int, b_phase: int) -> None:
        fc, fmb = self._take(self.next_f, f_phase)
        bc, bmb = self._take(self.next_b, b_phase)
        self.ops.append(Op(FB, fc, fmb, bc, bmb))


def _dual_rank_ops(ops: _RankOps, h: int, H: int, n: int, turning: bool) -> List[Op]:
    """DeepSeek's 8-step bidirectional schedule for one rank (arXiv:2412.19437 §3.2.1, Fig. 5).

    Phase 0 is the chunk whose pipeline starts nearer this rank, phase 1 the other one. h: the rank's
    distance from its nearer end (0..H-1), H: ranks per half-path, n: micro-batches per phase, turning: the
    rank where both phases meet (DeepSeek runs its first F&B as a separate F and BW).
    """
    outer, inner = H - h - 1, h + 1
    for _ in range(2 * outer):  # 1: warm-up forwards of phase 0
        ops.f(0)
    for _ in range(inner):  # 2: forward-forward
        ops.f(0)
        ops.f(1)
    for _ in range(outer):  # 3: B1, its W while F1's input is on the way, F1
        ops.b(1, defer_w=True)
        ops.w()
        ops.f(1)
    for i in range(n - 2 * H + h + 1):  # 4: steady state F0&B1, F1&B0
        if i == 0 and turning:
            ops.f(0)
            ops.b(1, defer_w=False)
        else:
            ops.fb(0, 1)
        ops.fb(1, 0)
    for _ in range(outer):  # 5: B1, F1&B0
        ops.b(1, defer_w=False)
        ops.fb(1, 0)
    defer = False
    for i in range(inner):  # 6: backward-backward; the second half defers its weight-grads
        if i == inner // 2 and h % 2 == 1:
            defer = True
        ops.b(1, defer_w=defer)
        if i == inner // 2 and h % 2 == 0:
            defer = True
        ops.b(0, defer_w=defer)
    for _ in range(outer):  # 7: W, B0
        ops.w()
        ops.b(0, defer_w=True)
    for _ in range(inner):  # 8: remaining weight-grads
        ops.w()
    assert not ops.deferred
    return ops.ops


def plan_dualpipe(pp_size: int, num_microbatches: int) -> SchedulePlan:
    """DualPipe: micro-batches 0..N/2-1 enter at rank 0 (chunk 0 = stage r), N/2..N-1 at rank PP-1
    (chunk 1 = a copy of stage PP-1-r); each rank holds two parameter copies."""
    _check_pp(pp_size, num_microbatches)
    if pp_size % 2:
        raise ValueError(f"DualPipe needs an even pp_size (two half-pipelines meet in the middle), got {pp_size}")
    if num_microbatches % 2 or num_microbatches < 2 * pp_size:
        raise ValueError(
            f"DualPipe needs an even num_microbatches >= 2*pp_size={2 * pp_size} (half enter from each end), "
            f"got {num_microbatches}"
        )
    P, H, n = pp_size, pp_size // 2, num_microbatches // 2
    fwd_mbs, rev_mbs = list(range(n)), list(range(n, 2 * n))
    ranks = []
    for r in range(P):
        second_half = r >= H
        chunk_of_phase = (1, 0) if second_half else (0, 1)
        mbs = (rev_mbs, fwd_mbs) if second_half else (fwd_mbs, rev_mbs)
        h = min(r, P - 1 - r)
        ranks.append(_dual_rank_ops(_RankOps(chunk_of_phase, mbs), h, H, n, turning=h == H - 1))
    pipelines = [[(r, 0) for r in range(P)], [(r, 1) for r in reversed(range(P))]]
    return SchedulePlan("dualpipe", P, num_microbatches, ranks, pipelines, [fwd_mbs, rev_mbs])


def plan_dualpipev(pp_size: int, num_microbatches: int) -> SchedulePlan:
    """DualPipeV ("cut-in-half" DualPipe): a 2*PP-stage model in a V, rank r holds stage r (chunk 0) and
    stage 2*PP-1-r (chunk 1), one parameter copy; all micro-batches enter at rank 0 and leave there."""
    _check_pp(pp_size, num_microbatches)
    if num_microbatches < 2 * pp_size:
        raise ValueError(
            f"DualPipeV needs num_microbatches >= 2*pp_size={2 * pp_size} to fill its steady state, "
            f"got {num_microbatches}"
        )
    P, n = pp_size, num_microbatches
    mbs = list(range(n))
    ranks = [_dual_rank_ops(_RankOps((0, 1), (mbs, mbs)), r, P, n, turning=r == P - 1) for r in range(P)]
    pipelines = [[(r, 0) for r in range(P)] + [(r, 1) for r in reversed(range(P))]]
    return SchedulePlan("dualpipev", P, n, ranks, pipelines, [mbs])


PLANNERS = {"1f1b": plan_1f1b, "interleaved": plan_interleaved, "dualpipe": plan_dualpipe,
            "dualpipev": plan_dualpipev}


def build_plan(schedule: str, pp_size: int, num_microbatches: int, num_chunks: int = 2) -> SchedulePlan:
    """The plan of `schedule`; `num_chunks` (virtual stages per rank) applies to interleaved only."""
    if schedule not in PLANNERS:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; choose one of {sorted(PLANNERS)}")
    if schedule == "interleaved":
        return plan_interleaved(pp_size, num_microbatches, num_chunks)
    return PLANNERS[schedule](pp_size, num_microbatches)


def check_plan(plan: SchedulePlan) -> None:
    """Raise ValueError unless every rank runs, for every chunk it holds and every micro-batch of that chunk,
    exactly one F and either one BW or one B followed later by its W (and nothing else)."""
    for r, ops in enumerate(plan.ranks):
        seen: Dict[Tuple[str, int, int], int] = {}
        for pos, op in enumerate(ops):
            for part in op.parts():
                key = (part.kind, part.chunk, part.mb)
                if key in seen:
                    raise ValueError(f"{plan.name} rank {r}: {part} appears twice")
                seen[key] = pos
        expected = {(c, mb) for c in plan.chunks(r) for mb in microbatches_of(plan, r, c)}
        for kind, c, mb in seen:
            if (c, mb) not in expected:
                raise ValueError(f"{plan.name} rank {r}: {kind}{c}.{mb} is not hosted on this rank")
        for c, mb in expected:
            has = {k for k in OP_KINDS if (k, c, mb) in seen}
            if has not in ({F, BW}, {F, B, W}):
                raise ValueError(f"{plan.name} rank {r}: chunk {c} mb {mb} has ops {sorted(has)}")
            if B in has and seen[(W, c, mb)] < seen[(B, c, mb)]:
                raise ValueError(f"{plan.name} rank {r}: W{c}.{mb} runs before its B")


def peak_activations(plan: SchedulePlan) -> List[int]:
    """Per rank: the most chunk activations held at once (an F stores one, its B/BW frees it).

    Published counts (DualPipe README, per rank in stages' worth): 1F1B PP, DualPipe PP+1; DualPipeV holds
    2*pp+1 half-size chunks (PP+1 with PP = 2*pp stages); interleaved with v chunks holds
    2(PP-1) + (v-1)PP + 1 chunks of 1/v stage (its warm-up plus one).
    """
    peaks = []
    for ops in plan.ranks:
        live = peak = 0
        for part in (p for op in ops for p in op.parts()):
            live += {F: 1, B: -1, BW: -1}.get(part.kind, 0)
            peak = max(peak, live)
        peaks.append(peak)
    return peaks
