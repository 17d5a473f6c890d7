"""Render a pipeline timeline (simulated or recorded) as a PNG, one row per rank, like DeepSeek-V3 Fig. 5.

Input: span records, per rank or flat, as `simulator.Span`s, dicts (rank, kind, chunk, mb, start, end; an FB
also bwd_chunk, bwd_mb) or tuples in that order. An overlapped F&B is drawn as one box with a bold border,
its forward half on top and its backward half below. Optional p2p records (dualpipe's trace: kind send, recv or
wait) add the waits for inputs as red strips under each rank's row, and the expert all-to-alls of overlapped
F&B pairs (kind a2a) blue strips along the edge of their half.
"""

from typing import Iterable, List, Union

from matplotlib.figure import Figure  # drawn with the Agg canvas, no pyplot state
from matplotlib.patches import Patch, Rectangle

from megatron_dsv3.pipeline.schedule_plan import B, BW, F, FB, W
from megatron_dsv3.pipeline.simulator import Span, bubble_time, group_by_rank, to_span

# (chunk 0, chunk 1) colours per unit kind
_COLOURS = {
    F: ("#f4b183", "#fbe0c9"),
    B: ("#9dc3e6", "#d6e7f6"),
    BW: ("#a9d18e", "#d9ecc9"),
    W: ("#c9a0dc", "#e8d8f0"),
}
_LABELS = {F: "forward", B: "backward (input)", BW: "backward (full)", W: "backward (weight)"}


def _per_rank(spans: Union[List[list], Iterable]) -> List[List[Span]]:
    """Per-rank lists stay as they are; a flat sequence of records is grouped by its `rank` field."""
    spans = list(spans)
    if spans and isinstance(spans[0], list):
        return [[to_span(s) for s in row] for row in spans]
    return group_by_rank(spans)


def bubble_fraction(spans_per_rank) -> float:
    """Idle share of the step over all ranks: sum of bubbles / (ranks x makespan)."""
    rows = _per_rank(spans_per_rank)
    bubbles = bubble_time(rows)
    t0 = min(r[0].start for r in rows if r)
    t1 = max(s.end for r in rows for s in r)
    return sum(bubbles) / (len(rows) * (t1 - t0))


def _box(ax, x, y, width, height, kind, chunk, mb, labelled):
    ax.add_patch(Rectangle((x, y), width, height, facecolor=_COLOURS[kind][chunk % 2], edgecolor="black", lw=0.5))
    if labelled:
        ax.text(x + width / 2, y + height / 2, str(mb), ha="center", va="center", fontsize=6)


def render_timeline(spans_per_rank, path: str, title: str = "", comm: Iterable[dict] = ()) -> str:
    """Write the timeline PNG to `path` and return it."""
    rows = _per_rank(spans_per_rank)
    comm = list(comm)
    waits = [c for c in comm if c["kind"] == "wait"]
    transfers = [c for c in comm if c["kind"] == "a2a"]
    t0 = min(r[0].start for r in rows if r)
    t1 = max(s.end for r in rows for s in r)
    width_in = max(8.0, min(40.0, 0.12 * (t1 - t0) + 2))
    min_labelled = 0.1 * (t1 - t0) / width_in  # narrowest box (time units) that fits a micro-batch number
    fig = Figure(figsize=(width_in, 0.45 * len(rows) + 1.6))
    ax = fig.subplots()
    for r, row in enumerate(rows):
        y = len(rows) - 1 - r
        for s in row:
            x, width = s.start - t0, s.end - s.start
            if s.kind == FB:
                _box(ax, x, y + 0.45, width, 0.45, F, s.chunk, s.mb, width >= min_labelled)
                _box(ax, x, y, width, 0.45, BW, s.bwd_chunk, s.bwd_mb, width >= min_labelled)
                ax.add_patch(Rectangle((x, y), width, 0.9, fill=False, edgecolor="black", lw=1.6))
            else:
                _box(ax, x, y, width, 0.9, s.kind, s.chunk, s.mb, width >= min_labelled)
    for w in waits:
        ax.add_patch(Rectangle((w["start"] - t0, len(rows) - 1 - w["rank"] - 0.08), w["end"] - w["start"], 0.07,
                               facecolor="#d62728", lw=0))
    for c in transfers:  # the forward half's along the top edge, the backward half's along the bottom
        y = len(rows) - 1 - c["rank"] + (0.8 if c["half"] == "F" else 0.02)
        ax.add_patch(Rectangle((c["start"] - t0, y), c["end"] - c["start"], 0.08, facecolor="#1f4e9c", lw=0))
    ax.set_xlim(0, t1 - t0)
    ax.set_ylim(-0.1, len(rows))
    ax.set_yticks([len(rows) - 1 - r + 0.45 for r in range(len(rows))])
    ax.set_yticklabels([f"rank {r}" for r in range(len(rows))])
    ax.set_xlabel("time")
    frac = bubble_fraction(rows)
    ax.set_title(f"{title}  (bubble {100 * frac:.1f}% of rank-time)".strip())
    kinds = {s.kind for row in rows for s in row}
    drawn = kinds | ({F, BW} if FB in kinds else set())
    handles = [Patch(facecolor=_COLOURS[k][0], edgecolor="black", label=_LABELS[k]) for k in _LABELS if k in drawn]
    if any(s.chunk == 1 for row in rows for s in row):
        handles.append(Patch(facecolor="white", edgecolor="black", label="light: chunk 1"))
    if FB in kinds:
        handles.append(Patch(facecolor="white", edgecolor="black", lw=1.6, label="F&B overlapped"))
    if waits:
        handles.append(Patch(facecolor="#d62728", label="waiting for p2p input"))
    if transfers:
        handles.append(Patch(facecolor="#1f4e9c", label="expert all-to-all in flight"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(len(handles), 4),
              fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend below the axes included
    return path
