"""Runtime of the DualPipe and DualPipeV pipeline schedules (DeepSeek-V3 §3.2.1).

Each pipeline rank runs its op list from `schedule_plan` in order, on the two chunks `placement` built:
  F   forward of (chunk, mb): stage 0 reads the micro-batch, other stages take the activation of `prev_hop`
  BW  full backward (megatron's backward_step): dL/dθ accumulates, dL/dx goes to `prev_hop`
  B   the same backward with a WeightGradStore open: the decoder and MTP linears queue their weight-gradient
      GEMMs dL/dW = dL/dyᵀ·x instead of running them (every other parameter gets its gradient here)
  W   runs the queued weight-gradients of that B (the oldest B on this rank: FIFO, as the plan orders them)
  FB  DeepSeek's overlapped F&B pair: the receives of both halves are posted before the forward runs, and
      the forward's output is sent (isend) while the backward computes, so the p2p of one micro-batch hides
      behind the compute of the other. With `overlap_moe_expert_parallel_comm` the two halves also alternate
      layer piece by layer piece (pipeline.overlap): each expert all-to-all of one half is in flight while the
      other half computes.
Activations go to `next_hop`, input-grads back to `prev_hop`, by isend/irecv on the pipeline group (tag =
message id, so gloo tells them apart); a hop to the same rank (DualPipeV's turn) is a local hand-over.

Timeline (`LAST_TRACE`, `gather_trace`): an op waits for the inputs of all its parts before its span starts
(the simulator's rule), so a span is compute only; each blocking wait is a "wait" record, each p2p message a
"send" (isend posted .. completed) or "recv" (irecv posted .. arrived) record. In an overlapped FB, each half's
compute between hand-overs is a "piece" record and each expert all-to-all an "a2a" record (posted ..
completed; `exposed`: how long its half still waited for it after the other half's piece).

The B/W split lives in the linear layers (weight_grad_store, DeepSeek's WeightGradStore): autograd cannot run
the weight-grad half of a graph after its input-grad half without re-walking it, and megatron-core's
vocab-parallel cross entropy (LM and MTP losses) modifies its saved softmax in its backward, so a second walk
fails. All W ops run before the mirrored-gradient sums and `finalize_model_grads`; the step ends with the store
empty.

Contract: megatron-core's forward_backward_func (same keywords; returns the per-micro-batch loss dicts on the
last pipeline rank, in micro-batch order). Loss scaling, MoE-aux/MTP loss scales and set_input_tensor come
from megatron's own forward_step/backward_step. Before `config.finalize_model_grads_func`, DualPipe's two
copies of every stage get the sum of both copies' gradients (and router token counts); the word embedding is
one parameter on each rank (stage 0 and MTP share it: placement.DualStage; with --no-share-mtp-embedding its two
copies on a rank get the sum of their gradients), so megatron's own first/last-stage embedding all-reduce is
skipped.

Free-after-send (config.deallocate_pipeline_outputs, on unless --no-deallocate-pipeline-outputs): a sent stage
output keeps only its grad_fn, its data lives on in the send buffer until the isend completes.
"""

import argparse
import contextlib
import json
import threading
import time
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel.schedules import backward_step, deallocate_output_tensor, forward_step
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_model_config, get_model_type

from megatron_dsv3.pipeline.overlap import PairRecord, run_pair
from megatron_dsv3.pipeline.placement import StageView, embedding_copies, validate_dual_pipeline
from megatron_dsv3.pipeline.recording import SavedActivationMeter, storage_of
from megatron_dsv3.pipeline.schedule_plan import B, BW, F, FB, W, Op, build_plan, next_hop, prev_hop
from megatron_dsv3.pipeline.weight_grad_store import WeightGradStore

ACT, GRAD = 0, 1  # what a p2p message carries: a stage's output activation or its input gradient
_MIRROR_TAG = 1 << 30  # the end-of-step exchange of DualPipe's mirrored gradients

LAST_TRACE: dict = {"ops": [], "comm": [], "weight_grad_peak_bytes": 0}  # this rank's records of the last step


class _Trace:
    """Wall-clock spans of this rank's ops (the dicts timeline.render_timeline draws) and p2p messages."""

    def __init__(self, rank: int):
        self.rank = rank
        self.ops: List[dict] = []
        self.comm: List[dict] = []

    def op(self, op: Op, start: float, end: float) -> None:
        record = dict(rank=self.rank, kind=op.kind, chunk=op.chunk, mb=op.mb, start=start, end=end)
        if op.kind == FB:
            record.update(bwd_chunk=op.bwd_chunk, bwd_mb=op.bwd_mb)
        self.ops.append(record)

    def message(self, direction: str, what: int, chunk: int, mb: int, peer: int, start: float, end: float):
        self.comm.append(dict(rank=self.rank, kind=direction, what="act" if what == ACT else "grad",
                              chunk=chunk, mb=mb, peer=peer, start=start, end=end))

    def pair(self, op: Op, record: PairRecord) -> None:
        """The pieces and expert all-to-alls of an overlapped FB op."""
        names = {"F": (op.chunk, op.mb), "B": (op.bwd_chunk, op.bwd_mb)}
        for piece in record.compute:
            chunk, mb = names[piece["half"]]
            self.comm.append(dict(rank=self.rank, kind="piece", half=piece["half"], chunk=chunk, mb=mb,
                                  start=piece["start"], end=piece["end"]))
        for t in record.transfers:
            chunk, mb = names[t["half"]]
            self.comm.append(dict(rank=self.rank, kind="a2a", half=t["half"], label=t["label"], chunk=chunk, mb=mb,
                                  start=t["posted"], end=t["done"], exposed=t["done"] - t["resumed"]))


class _Mailbox:
    """The step's p2p messages, keyed (what, chunk, mb) as the receiving chunk names them."""

    def __init__(self, pp_rank: int, group, shape, dtype, device, trace: _Trace):
        self.pp_rank, self.group, self.ranks = pp_rank, group, dist.get_process_group_ranks(group)
        self.shape, self.dtype, self.device = shape, dtype, device
        self.trace = trace
        self.ready: Dict[tuple, torch.Tensor] = {}
        self.posted: Dict[tuple, tuple] = {}
        self.sends: List[tuple] = []

    @staticmethod
    def _tag(what: int, chunk: int, mb: int) -> int:
        return (2 * mb + chunk) * 2 + what

    def expect(self, what: int, chunk: int, mb: int, src: int) -> None:
        """Post the receive now, so the transfer runs while this rank computes."""
        key = (what, chunk, mb)
        if src == self.pp_rank or key in self.ready or key in self.posted:
            return
        buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        work = dist.irecv(buffer, src=self.ranks[src], group=self.group, tag=self._tag(*key))
        self.posted[key] = (work, buffer, src, time.time())

    def take(self, what: int, chunk: int, mb: int) -> torch.Tensor:
        key = (what, chunk, mb)
        if key in self.posted:
            work, buffer, src, posted = self.posted.pop(key)
            blocked = time.time()
            work.wait()
            arrived = time.time()
            self.trace.message("wait", what, chunk, mb, src, blocked, arrived)
            self.trace.message("recv", what, chunk, mb, src, posted, arrived)
            self.ready[key] = buffer
        return self.ready.pop(key)

    def put(self, what: int, chunk: int, mb: int, dst: int, tensor: torch.Tensor) -> None:
        """Send to (dst rank, chunk); a copy stays local when dst is this rank."""
        key = (what, chunk, mb)
        tensor = tensor.detach().clone() if dst == self.pp_rank else tensor.detach().contiguous()
        if dst == self.pp_rank:
            self.ready[key] = tensor
            return
        work = dist.isend(tensor, dst=self.ranks[dst], group=self.group, tag=self._tag(*key))
        _hold(tensor)  # alive until the send completes
        self.sends.append((tensor, key, dst, time.time(), _SendCompletion(work, self.group)))

    def reap(self, wait: bool = False) -> None:
        """Drop the sends that have completed (all of them with `wait`): their buffers, the senders' stage
        outputs once those were deallocated, are freed here."""
        pending = []
        for send in self.sends:
            tensor, (what, chunk, mb), dst, posted, completion = send
            if wait:
                completion.wait()
            if wait or completion.done():
                self.trace.message("send", what, chunk, mb, dst, posted, time.time())
                _hold(tensor, release=True)
            else:
                pending.append(send)
        self.sends = pending

    def finish(self) -> None:
        self.reap(wait=True)
        assert not self.posted and not self.ready, f"unconsumed p2p messages {list(self.posted) + list(self.ready)}"


class _SendCompletion:
    """Whether an isend has completed (`done`, without blocking) and waiting for it (`wait`). Work.is_completed,
    except on gloo, whose send work reports completion only once waited on (its wait returns when the receiver
    has posted its irecv): there a helper thread is the one waiter (a gloo send cannot be waited on twice)."""

    def __init__(self, work, group):
        self.work, self.thread, self.error = work, None, None
        if dist.get_backend(group) == dist.Backend.GLOO:
            self.thread = threading.Thread(target=self._wait_in_thread, daemon=True)
            self.thread.start()

    def _wait_in_thread(self) -> None:
        try:
            self.work.wait()
        except Exception as err:  # raised again in wait(), on the schedule's thread
            self.error = err

    def done(self) -> bool:
        return self.work.is_completed() if self.thread is None else not self.thread.is_alive()

    def wait(self) -> None:
        if self.thread is None:
            self.work.wait()
            return
        self.thread.join()
        if self.error is not None:
            raise self.error


class _MicroBatches:
    """Micro-batch `mb` of the step for a chunk. megatron hands one iterator (or one per chunk) yielding
    micro-batches 0..N-1 in order; DualPipe's chunk 1 starts at N/2, so each iterator is read ahead into a
    cache and drained to N at the end of the step."""

    def __init__(self, data_iterator, num_chunks: int, num_microbatches: int):
        iterators = data_iterator if isinstance(data_iterator, list) else [data_iterator]
        iterators = iterators * num_chunks if len(iterators) == 1 else iterators
        self.caches = {id(it): (it, []) for it in iterators}
        self.source = [id(it) for it in iterators]
        self.num_microbatches = num_microbatches

    def iterator(self, chunk: int, mb: int):
        it, cache = self.caches[self.source[chunk]]
        if it is None:
            return None
        while len(cache) <= mb:
            cache.append(next(it))
        return iter([cache[mb]])

    def finish(self) -> None:
        for it, cache in self.caches.values():
            while it is not None and len(cache) < self.num_microbatches:
                cache.append(next(it))


def add_pipeline_output_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("pipeline outputs")
    g.add_argument("--no-deallocate-pipeline-outputs", dest="deallocate_pipeline_outputs", action="store_false",
                   help="keep each pipeline stage's output whole until its backward instead of freeing its data once "
                        "sent (megatron-core's deallocate_pipeline_outputs; every pipeline schedule)")


def validate_pipeline_output_args(args) -> None:
    """Raises ValueError (one line naming the flag and the fix)."""
    if not args.deallocate_pipeline_outputs and args.pipeline_model_parallel_size < 2:
        raise ValueError("--no-deallocate-pipeline-outputs needs --pipeline-model-parallel-size >= 2 (no stage "
                         "output is sent at 1); drop the flag")


def get_dual_forward_backward_func(schedule: str, overlap_moe_expert_parallel_comm: bool = False):
    """megatron's `get_forward_backward_func()` for --pipeline-schedule dualpipe|dualpipev
    [--overlap-moe-expert-parallel-comm]."""
    return partial(forward_backward_dual, schedule, overlap_moe_expert_parallel_comm=overlap_moe_expert_parallel_comm)


def forward_backward_dual(
    schedule: str,
    *,
    overlap_moe_expert_parallel_comm: bool = False,
    forward_step_func,
    data_iterator,
    model,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    decoder_seq_length: Optional[int] = None,
    forward_only: bool = False,
    collect_non_loss_data: bool = False,
    first_val_step: Optional[bool] = None,  # megatron's signature; nothing to do here
    force_all_reduce: Optional[bool] = False,
):
    """One step of `schedule` ("dualpipe" or "dualpipev") over this rank's two model chunks."""
    chunks = model if isinstance(model, list) else [model]
    config = get_model_config(chunks[0])
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_rank, pp_size = pp_group.rank(), pp_group.size()
    if len(chunks) != 2:
        raise ValueError(f"--pipeline-schedule {schedule} runs the two chunks of placement.build_dual_chunks "
                         f"per rank, got {len(chunks)}")
    if collect_non_loss_data:
        raise ValueError(f"--pipeline-schedule {schedule} does not collect non-loss data")
    validate_dual_pipeline(schedule, pp_size, config.num_layers, num_microbatches)
    plan = build_plan(schedule, pp_size, num_microbatches)

    seq = (decoder_seq_length or seq_length) // parallel_state.get_context_parallel_world_size()
    if config.sequence_parallel:
        seq //= parallel_state.get_tensor_model_parallel_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    trace = _Trace(pp_rank)
    mail = _Mailbox(pp_rank, pp_group, (seq, micro_batch_size, config.hidden_size),
                    config.pipeline_dtype or torch.float32, device, trace)
    batches = _MicroBatches(data_iterator, len(chunks), num_microbatches)
    model_type = get_model_type(chunks[0])
    cp_size = parallel_state.get_context_parallel_world_size()
    losses: Dict[int, object] = {}
    num_tokens = torch.zeros((), dtype=torch.int)
    stash: Dict[tuple, tuple] = {}  # (chunk, mb) -> (stage input x, stage output y), from F to its backward
    weight_grads = WeightGradStore()

    def take_input(part):
        """F: the stage input x (None at stage 0); B/BW: dL/dy (None at the last stage, whose y is the loss)."""
        if part.kind == F:
            has_input = prev_hop(plan, pp_rank, part.chunk) is not None
            return mail.take(ACT, part.chunk, part.mb).requires_grad_() if has_input else None
        if part.kind in (B, BW) and next_hop(plan, pp_rank, part.chunk) is not None:
            return mail.take(GRAD, part.chunk, part.mb)
        return None

    def send_input_grad(chunk, mb, dx):
        hop = prev_hop(plan, pp_rank, chunk)
        if hop is not None:
            mail.put(GRAD, hop[1], mb, hop[0], dx)

    def run_f(chunk, mb, x):
        nonlocal num_tokens
        dst, store = next_hop(plan, pp_rank, chunk), []
        y, tokens = forward_step(forward_step_func, batches.iterator(chunk, mb), chunks[chunk], num_microbatches,
                                 x, store, config, cp_size, current_microbatch=mb, is_last_stage=dst is None)
        if dst is None:
            losses[mb] = store[0]
            num_tokens += tokens
        else:
            mail.put(ACT, dst[1], mb, dst[0], y)
            # megatron's free-after-send: y keeps its grad_fn, its data lives on only in the send buffer until
            # the isend completes; backward_step then runs custom_backward (no shape check against dy)
            deallocate_output_tensor(y, config.deallocate_pipeline_outputs)
        if not forward_only:
            stash[(chunk, mb)] = (x, y)
            _hold(x, y)

    def run_bw(chunk, mb, dy):
        x, y = stash.pop((chunk, mb))
        _hold(x, y, release=True)
        send_input_grad(chunk, mb, backward_step(x, y, dy, model_type, config))

    def run_b(chunk, mb, dy):
        with weight_grads.input_grad_only((chunk, mb)):
            run_bw(chunk, mb, dy)

    run = {F: run_f, B: run_b, W: lambda chunk, mb, _: weight_grads.flush((chunk, mb)), BW: run_bw}

    def expect_inputs(op):
        for part in op.parts():
            hop = (prev_hop if part.kind == F else next_hop)(plan, pp_rank, part.chunk)
            if hop is not None and part.kind in (F, B, BW):
                mail.expect(ACT if part.kind == F else GRAD, part.chunk, part.mb, hop[0])

    ops = plan.ranks[pp_rank]
    if forward_only:
        ops = [part for op in ops for part in op.parts() if part.kind == F]
    with _no_sync(config):
        for i, op in enumerate(ops):
            for upcoming in ops[i:i + 2]:  # this op's inputs and the next one's: transfers overlap compute
                expect_inputs(upcoming)
            inputs = [take_input(part) for part in op.parts()]
            mail.reap()
            start = time.time()
            if op.kind == FB and overlap_moe_expert_parallel_comm:
                (f, bw), (x, dy) = op.parts(), inputs
                trace.pair(op, run_pair(lambda: run_f(f.chunk, f.mb, x), lambda: run_bw(bw.chunk, bw.mb, dy), device))
            else:
                for part, received in zip(op.parts(), inputs):
                    run[part.kind](part.chunk, part.mb, received)
            trace.op(op, start, time.time())
        mail.finish()
    batches.finish()
    assert not stash, "plan left activations without backward"
    weight_grads.check_empty()

    if not forward_only:
        if schedule == "dualpipe":
            _sum_mirrored_copies(chunks, pp_group, pp_rank, pp_size)
        _sum_embedding_copies(chunks)
        if config.finalize_model_grads_func is not None:
            if config.calculate_per_token_loss:  # megatron broadcasts the count from the last rank
                dist.all_reduce(num_tokens, group=pp_group)
            config.finalize_model_grads_func(
                chunks,
                num_tokens if config.calculate_per_token_loss else None,
                pg_collection=_finalize_groups(pp_group),
                force_all_reduce=force_all_reduce,
            )
    LAST_TRACE.update(ops=trace.ops, comm=trace.comm, weight_grad_peak_bytes=weight_grads.peak_bytes)
    return _losses_on_last_rank(losses, pp_group, pp_rank, pp_size)


def _hold(*tensors, release: bool = False) -> None:
    """Count tensors this schedule keeps alive for the backward, whether autograd saved them or not (the stash's
    stage input x and output y, from F to the backward; send buffers until their isend completes) in the
    active SavedActivationMeter, if any."""
    meter = SavedActivationMeter.active
    if meter is None:
        return
    for storage in filter(None, (storage_of(t) for t in tensors if t is not None)):
        (meter.release if release else meter.acquire)(*storage)


def _no_sync(config):
    """megatron's config.no_sync_func (one per chunk or one for all): no DP reduction until finalize."""
    funcs = config.no_sync_func
    funcs = [] if funcs is None else funcs if isinstance(funcs, list) else [funcs]
    stack = contextlib.ExitStack()
    for func in funcs:
        stack.enter_context(func())
    return stack


def _grad(param: torch.nn.Parameter) -> torch.Tensor:
    if hasattr(param, "main_grad"):  # megatron DDP accumulates here
        return param.main_grad
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


def _summed_state(chunk) -> List[torch.Tensor]:
    """What two copies of a stage must agree on after the step: parameter gradients, and the routers'
    token counts that drive the expert-bias update (DeepSeek-V3 §2.1.2)."""
    grads = [_grad(p) for p in chunk.parameters() if p.requires_grad]
    counts = [m.local_tokens_per_expert for m in chunk.modules() if getattr(m, "expert_bias", None) is not None]
    return grads + counts


def _sum_mirrored_copies(chunks, pp_group, pp_rank: int, pp_size: int) -> None:
    """DualPipe: rank r's chunk 0 and rank PP-1-r's chunk 1 hold the same stage; each gets g_r + g_peer, in the
    state's own dtype (one message per dtype, so fp64 and bf16 states are neither widened nor rounded)."""
    peer = dist.get_process_group_ranks(pp_group)[pp_size - 1 - pp_rank]
    mine = [_summed_state(c) for c in chunks]
    dtypes = sorted({t.dtype for ts in mine for t in ts}, key=str)  # the same set on both ranks of the pair
    for index, dtype in enumerate(dtypes):
        parts = [[t for t in ts if t.dtype == dtype] for ts in mine]
        flat = torch.cat([t.reshape(-1) for ts in parts for t in ts])
        theirs = torch.empty_like(flat)
        works = [dist.isend(flat, dst=peer, group=pp_group, tag=_MIRROR_TAG + index),
                 dist.irecv(theirs, src=peer, group=pp_group, tag=_MIRROR_TAG + index)]
        for work in works:
            work.wait()
        peer_size0 = sum(t.numel() for t in parts[1])  # the peer's chunk 0 mirrors my chunk 1, and vice versa
        peer_parts = {0: theirs[peer_size0:], 1: theirs[:peer_size0]}
        for chunk, tensors in enumerate(parts):
            offset = 0
            for t in tensors:
                t.add_(peer_parts[chunk][offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def _sum_embedding_copies(chunks) -> None:
    """--no-share-mtp-embedding: stage 0's word embedding and MTP's copy on one rank both get g_0 + g_mtp (the
    same sum on every rank holding both, so the copies stay equal)."""
    weights = embedding_copies(chunks)
    if len(weights) == 2:
        total = _grad(weights[0]) + _grad(weights[1])
        for weight in weights:
            _grad(weight).copy_(total)


def _finalize_groups(pp_group) -> ProcessGroupCollection:
    """megatron's groups for finalize_model_grads, with a one-member embedding group: stage 0 and MTP share
    one embedding parameter on this rank (or their copies were summed above)."""
    groups = ProcessGroupCollection()
    groups.tp = parallel_state.get_tensor_model_parallel_group()
    groups.pp = pp_group
    groups.embd = StageView(0, 1)
    groups.pos_embd = None
    groups.cp = parallel_state.get_context_parallel_group()
    groups.dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return groups


def _losses_on_last_rank(losses: dict, pp_group, pp_rank: int, pp_size: int) -> list:
    """The loss dicts of all micro-batches on the last pipeline rank, in micro-batch order (DualPipeV computes
    them on rank 0, DualPipe half on each end)."""
    last = dist.get_process_group_ranks(pp_group)[-1]
    gathered = [None] * pp_size if pp_rank == pp_size - 1 else None
    dist.gather_object(losses, gathered, dst=last, group=pp_group)
    if gathered is None:
        return []
    merged = {mb: loss for part in gathered for mb, loss in part.items()}
    return [merged[mb] for mb in sorted(merged)]


def gather_trace(ops: Optional[List[dict]] = None) -> dict:
    """The last step's op and p2p records of every pipeline rank (collective over the pipeline group), with
    times in seconds from the step's first op; `ops`: this rank's op records of another schedule instead
    (recording.record_megatron_ops)."""
    parts = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    mine = LAST_TRACE if ops is None else {"ops": ops, "comm": []}
    dist.all_gather_object(parts, mine, group=parallel_state.get_pipeline_model_parallel_group())
    ops = [r for part in parts for r in part["ops"]]
    comm = [r for part in parts for r in part["comm"]]
    t0 = min(r["start"] for r in ops)
    for r in ops + comm:
        r["start"], r["end"] = r["start"] - t0, r["end"] - t0
    return {"ops": ops, "comm": comm}


def dump_trace(trace: dict, path: str) -> None:
    """`path`: the op spans (a JSON list, what tools/pipeline_timeline.py --from-trace renders);
    `path` with .comm.json: the p2p spans."""
    with open(path, "w") as fh:
        json.dump(trace["ops"], fh)
    with open(path.rsplit(".json", 1)[0] + ".comm.json", "w") as fh:
        json.dump(trace["comm"], fh)
