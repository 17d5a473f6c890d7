"""Device-agnostic all-to-all token dispatcher for megatron-core's MoELayer.

megatron-core's `MoEAlltoAllTokenDispatcher` needs CUDA streams; this one only needs
`torch.distributed.all_to_all_single` with split sizes, so it runs on gloo (CPU) and NCCL alike.
One copy of a token travels to each EP rank for each of its experts there (the flat scheme).

Order of the rows in flight:
  local, after permute:        [expert 0 tokens | expert 1 tokens | ...]     (global expert order)
  after all-to-all (receiver): [from rank 0: local experts 0..L-1 | from rank 1: ... ]
  to the experts:              [local expert 0: from ranks 0..EP-1 | local expert 1: ...]

With `fp8_dispatch` (the FP8 layers under --fp8-emulation) tokens cross in FP8, as in DeepSeek-V3
§3.3.3: E4M3 bytes plus an FP32 power-of-two scale per 1×128 tile, dequantized on arrival; the
combine and the dispatch's gradient stay in high precision.

Every token all-to-all (`exchange`; the hierarchical dispatcher's too) is posted asynchronously and awaited
through `pipeline.overlap.wait`: inside an overlapped DualPipe F&B pair the other micro-batch computes meanwhile.
"""

from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from megatron_dsv3.fp8.blockwise import FP8_DTYPE, TILE, dequantize_1x128, quantize_1x128
from megatron_dsv3.moe.topology import gpus_per_node
from megatron_dsv3.pipeline import overlap


@dataclass
class TrafficCounter:
    """Bytes of token rows a dispatcher sent to other ranks, split by the link they cross, and the most nodes
    one token reached (kept on the device, read only when asked: no host sync in the dispatch)."""

    inter_node_bytes: int = 0
    intra_node_bytes: int = 0
    nodes_per_token_peak: Optional[torch.Tensor] = None

    def add_inter(self, rows: int, bytes_per_row: int) -> None:
        self.inter_node_bytes += rows * bytes_per_row

    def add_intra(self, rows: int, bytes_per_row: int) -> None:
        self.intra_node_bytes += rows * bytes_per_row

    def observe_nodes_per_token(self, nodes_per_token: torch.Tensor) -> None:
        peak = nodes_per_token.max() if nodes_per_token.numel() else nodes_per_token.new_zeros(())
        self.nodes_per_token_peak = peak if self.nodes_per_token_peak is None else torch.maximum(
            self.nodes_per_token_peak, peak)

    @property
    def max_nodes_per_token(self) -> int:
        return 0 if self.nodes_per_token_peak is None else int(self.nodes_per_token_peak)

    def reset(self) -> None:
        self.inter_node_bytes = self.intra_node_bytes = 0
        self.nodes_per_token_peak = None


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of several row tensors in one transfer; with `fp8` the first travels as 1×128-tile
    E4M3 + scales and is dequantized on arrival. Backward: the reverse exchange, in high precision."""

    @staticmethod
    def forward(ctx, group, output_splits: List[int], input_splits: List[int], label: str, fp8: bool, *tensors):
        ctx.group, ctx.output_splits, ctx.input_splits, ctx.label = group, output_splits, input_splits, label
        send = list(tensors)
        if fp8:  # gloo lacks FP8: the bytes travel as uint8
            rows_fp8, scales = quantize_1x128(tensors[0], power_of_two_scales=True)
            send[:1] = [rows_fp8.view(torch.uint8), scales]
        received = exchange(group, send, output_splits, input_splits, label)
        if fp8:
            received[:2] = [dequantize_1x128(received[0].view(FP8_DTYPE), received[1], tensors[0].dtype)]
        return tuple(received)

    @staticmethod
    def backward(ctx, *grads):
        reverse = exchange(ctx.group, grads, ctx.input_splits, ctx.output_splits, f"{ctx.label} grad")
        return (None, None, None, None, None, *reverse)


class _Works:
    def __init__(self, works):
        self.works = works

    def wait(self):
        for work in self.works:
            work.wait()


def exchange(group, tensors, output_splits: List[int], input_splits: List[int], label: str) -> List[torch.Tensor]:
    """all_to_all_single of each tensor's rows, posted together and awaited through `overlap.wait` (inside an
    overlapped F&B pair the other micro-batch computes meanwhile)."""
    outs, works = [], []
    for tensor in tensors:
        tensor = tensor.contiguous()
        out = tensor.new_empty((sum(output_splits),) + tuple(tensor.shape[1:]))
        works.append(dist.all_to_all_single(out, tensor, output_splits, input_splits, group=group, async_op=True))
        outs.append(out)
    overlap.wait(_Works(works), label)
    return outs


def all_to_all(group, tensors, output_splits: List[int], input_splits: List[int], label: str, fp8: bool = False):
    """Differentiable all-to-all of row tensors (one transfer named `label` in overlap records); with `fp8`
    the first one travels in FP8 (dispatch only)."""
    if group is None or dist.get_world_size(group) == 1:
        return list(tensors)
    return list(_AllToAll.apply(group, output_splits, input_splits, label, fp8, *tensors))


def wire_bytes_per_row(rows: torch.Tensor, fp8: bool = False) -> int:
    """Bytes one row puts on the wire: in FP8 1 per element + a 4-byte scale per 1×128 tile, else its dtype's."""
    width = rows.shape[-1]
    return width + 4 * -(-width // TILE) if fp8 else width * rows.element_size()


def exchange_counts(group, counts: torch.Tensor) -> torch.Tensor:
    """counts[r * L + e] = rows for rank r's local expert e  ->  rows each rank sends me, same layout."""
    if group is None or dist.get_world_size(group) == 1:
        return counts
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts.contiguous(), group=group)
    return received


def to_host(*counts: torch.Tensor) -> List[List[int]]:
    """Several count tensors as Python lists in one device-to-host transfer (one host sync)."""
    flat = torch.cat([c.reshape(-1).long() for c in counts]).tolist()
    out, start = [], 0
    for c in counts:
        out.append(flat[start:start + c.numel()])
        start += c.numel()
    return out


def chunk_order(counts: torch.Tensor, num_outer: int, num_inner: int, total: int) -> torch.Tensor:
    """Row indices that reorder row chunks laid out [outer][inner] (sizes `counts`, same layout, `total` rows)
    into [inner][outer]: one gather instead of split + cat, computed on the device (no host sync)."""
    counts = counts.long()
    starts = counts.cumsum(0) - counts
    order = torch.arange(num_outer * num_inner, device=counts.device).view(num_outer, num_inner).t().reshape(-1)
    sizes = counts[order]
    chunk = torch.repeat_interleave(torch.arange(order.numel(), device=counts.device), sizes, output_size=total)
    offset_in_chunk = torch.arange(total, device=counts.device) - (sizes.cumsum(0) - sizes)[chunk]
    return starts[order][chunk] + offset_in_chunk


def inverse_order(order: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def routed_pairs(routing_map: torch.Tensor, topk: int):
    """(expert, token) index pairs of a routing map with `topk` experts per token, expert-major; the pair
    count is known (tokens × topk), so no host sync (torch.nonzero's output size needs one)."""
    pairs = torch.nonzero_static(routing_map.t(), size=routing_map.shape[0] * topk)
    return pairs[:, 0], pairs[:, 1]


def rank_splits(send, recv, num_ranks: int, local: int):
    """Host counts laid out [rank][local expert] -> (rows to each rank, rows from each rank, rows per local
    expert as a host tensor)."""
    def per_rank(counts):
        return [sum(counts[r * local:(r + 1) * local]) for r in range(num_ranks)]
    return per_rank(send), per_rank(recv), torch.tensor([sum(recv[e::local]) for e in range(local)])


class ExpertMajorRows:
    """Received rows arrive [source rank][local expert]; the experts take them [local expert][source rank].
    The dispatcher sets `received_counts` (per (source rank, local expert), on the device) and `num_sources`."""

    def dispatch_postprocess(self, hidden, probs):
        if self.num_sources == 1 or self.num_local_experts == 1:  # already expert-major: no reorder
            self.order = None
            return hidden, self.tokens_per_expert, probs
        self.order = chunk_order(self.received_counts, self.num_sources, self.num_local_experts, hidden.shape[0])
        return hidden.index_select(0, self.order), self.tokens_per_expert, probs.index_select(0, self.order)

    def combine_preprocess(self, expert_output):
        if self.order is None:
            return expert_output
        return expert_output.index_select(0, inverse_order(self.order))


class AllToAllTokenDispatcher(ExpertMajorRows, MoETokenDispatcher):
    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection=None, fp8_dispatch=False):
        super().__init__(config=config, pg_collection=pg_collection)
        self.num_local_experts = num_local_experts
        self.fp8_dispatch = fp8_dispatch
        self.num_experts = config.num_moe_experts
        self.ep_rank = dist.get_rank(self.ep_group) if self.ep_size > 1 else 0
        if self.tp_size > 1:
            raise ValueError("--expert-tensor-parallel-size > 1 is not supported by this dispatcher")
        ep_ranks = dist.get_process_group_ranks(self.ep_group) if self.ep_size > 1 else [dist.get_rank()]
        per_node = gpus_per_node()
        self.same_node = [r // per_node == ep_ranks[self.ep_rank] // per_node for r in ep_ranks]
        self.traffic = TrafficCounter()

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        self.hidden_shape = hidden_states.shape
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        expert_idx, token_idx = routed_pairs(routing_map, self.config.moe_router_topk)
        self.token_idx = token_idx
        self.num_tokens = hidden.shape[0]
        self.send_counts = routing_map.sum(0).long()  # per global expert
        # index_select/flat gathers: the same rows as hidden[token_idx], probs[token_idx, expert_idx], fewer kernels
        pair_probs = probs.reshape(-1).index_select(0, token_idx * probs.shape[1] + expert_idx)
        return hidden.index_select(0, token_idx), pair_probs

    def token_dispatch(self, permuted, probs):
        ep, local = self.ep_size, self.num_local_experts
        if ep == 1:  # nothing crosses: the counts stay on the device (grouped experts need no host sync)
            self.received_counts, self.num_sources, self.tokens_per_expert = self.send_counts, 1, self.send_counts
            return permuted, probs
        self.received_counts, self.num_sources = exchange_counts(self.ep_group, self.send_counts), ep
        send, recv = to_host(self.send_counts, self.received_counts)  # the one host sync of this dispatch
        self.input_splits, self.output_splits, self.tokens_per_expert = rank_splits(send, recv, ep, local)
        self._count(self.input_splits, wire_bytes_per_row(permuted, self.fp8_dispatch))
        received, received_probs = all_to_all(self.ep_group, [permuted, probs], self.output_splits,
                                              self.input_splits, "dispatch", self.fp8_dispatch)
        return received, received_probs

    def _count(self, splits, bytes_per_row: int):
        for rank, count in enumerate(splits):
            if rank != self.ep_rank:
                (self.traffic.add_intra if self.same_node[rank] else self.traffic.add_inter)(count, bytes_per_row)

    def token_combine(self, expert_output):
        if self.ep_size == 1:
            return expert_output
        self._count(self.output_splits, wire_bytes_per_row(expert_output))
        return all_to_all(self.ep_group, [expert_output], self.input_splits, self.output_splits, "combine")[0]

    def combine_postprocess(self, permuted_output):
        out = permuted_output.new_zeros((self.num_tokens, permuted_output.shape[-1]))
        out.index_add_(0, self.token_idx, permuted_output)
        return out.view(self.hidden_shape)
