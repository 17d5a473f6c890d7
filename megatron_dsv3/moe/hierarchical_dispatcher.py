"""Node-limited hierarchical all-to-all (DeepSeek-V3 §3.2.2).

The router keeps each token on at most M nodes. Dispatch then crosses the fabric once per chosen
node and fans out over the fast intra-node links:

    stage 1 (inter-node): token --one copy per chosen node--> the rank with my local index there
    stage 2 (intra-node): relay --one copy per chosen expert--> the rank hosting the expert
    combine: expert outputs --intra-node--> relay, summed per token --inter-node--> origin, summed

Rows in flight (N nodes, G ranks per node, L experts per rank, E_n = G·L experts per node):
    stage 1 send: [to node 0: tokens | to node 1: tokens | ...]        (+ [rows, E_n] gate weights)
    stage 2 send: [to local rank 0: (row, expert) pairs expert-major | ...]
    to the experts: [local expert 0: from local ranks 0..G-1 | ...]
With `fp8_dispatch` the tokens cross both stages in FP8 (see token_dispatcher).
"""

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from megatron_dsv3.moe.token_dispatcher import (
    ExpertMajorRows,
    TrafficCounter,
    all_to_all,
    exchange_counts,
    rank_splits,
    to_host,
    wire_bytes_per_row,
)
from megatron_dsv3.moe.topology import get_ep_topology


class HierarchicalTokenDispatcher(ExpertMajorRows, MoETokenDispatcher):
    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection=None, fp8_dispatch=False):
        super().__init__(config=config, pg_collection=pg_collection)
        self.fp8_dispatch = fp8_dispatch
        if self.tp_size > 1:
            raise ValueError("--expert-tensor-parallel-size > 1 is not supported by this dispatcher")
        self.topology = get_ep_topology()
        self.num_local_experts = num_local_experts
        self.experts_per_node = num_local_experts * self.topology.ranks_per_node
        self.traffic = TrafficCounter()

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        self.hidden_shape = hidden_states.shape
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        tokens, topo = hidden.shape[0], self.topology
        node_map = routing_map.view(tokens, topo.num_nodes, self.experts_per_node)
        token_nodes = node_map.any(-1)  # [T, N]: the ≤ M nodes of each token
        node_counts = token_nodes.sum(0).long()
        # stage 1's one host sync: the split sizes, which also size the (node, token) pairs
        self.send1, self.recv1 = to_host(node_counts, exchange_counts(topo.inter_node_group, node_counts))
        pairs = torch.nonzero_static(token_nodes.t(), size=sum(self.send1))  # node-major (node, token) pairs
        node_idx, token_idx = pairs[:, 0], pairs[:, 1]
        self.token_idx = token_idx
        self.row_map = node_map[token_idx, node_idx]  # [R, E_n] chosen experts on that node
        self.traffic.observe_nodes_per_token(token_nodes.sum(1))
        row_probs = probs.view(tokens, topo.num_nodes, self.experts_per_node)[token_idx, node_idx]
        return hidden.index_select(0, token_idx), row_probs  # hidden[token_idx], one gather kernel

    def token_dispatch(self, rows, row_probs):
        topo, fp8 = self.topology, self.fp8_dispatch
        bytes_per_row = wire_bytes_per_row(rows, fp8)
        # stage 1: across nodes
        self.traffic.add_inter(sum(self.send1) - self.send1[topo.node], bytes_per_row)
        relay_rows, relay_probs = all_to_all(topo.inter_node_group, [rows, row_probs], self.recv1, self.send1,
                                             "dispatch inter-node", fp8)
        relay_map = _all_to_all_no_grad(topo.inter_node_group, self.row_map, self.recv1, self.send1)
        # stage 2: inside the node, one copy per chosen expert
        self.relay_count = relay_rows.shape[0]
        per_expert = relay_map.sum(0).long()
        self.received_counts = exchange_counts(topo.intra_node_group, per_expert)
        self.num_sources = topo.ranks_per_node
        send, recv = to_host(per_expert, self.received_counts)  # stage 2's one host sync
        self.send2, self.recv2, self.tokens_per_expert = rank_splits(send, recv, self.num_sources,
                                                                     self.num_local_experts)
        pairs = torch.nonzero_static(relay_map.t(), size=sum(send))  # expert-major = rank-major
        pair_expert, pair_row = pairs[:, 0], pairs[:, 1]
        self.pair_row = pair_row
        self.traffic.add_intra(sum(self.send2) - self.send2[topo.local_rank], bytes_per_row)
        # in FP8 again: re-quantizing dequantized rows with power-of-two scales is exact, no added error
        return all_to_all(topo.intra_node_group, [relay_rows[pair_row], relay_probs[pair_row, pair_expert]],
                          self.recv2, self.send2, "dispatch intra-node", fp8)

    def token_combine(self, expert_output):
        topo, bytes_per_row = self.topology, wire_bytes_per_row(expert_output)
        pairs = all_to_all(topo.intra_node_group, [expert_output], self.send2, self.recv2, "combine intra-node")[0]
        self.traffic.add_intra(sum(self.recv2) - self.recv2[topo.local_rank], bytes_per_row)
        relay = pairs.new_zeros((self.relay_count, pairs.shape[-1])).index_add(0, self.pair_row, pairs)
        self.traffic.add_inter(sum(self.recv1) - self.recv1[topo.node], bytes_per_row)
        return all_to_all(topo.inter_node_group, [relay], self.send1, self.recv1, "combine inter-node")[0]

    def combine_postprocess(self, rows):
        out = rows.new_zeros((self.hidden_shape.numel() // self.hidden_shape[-1], rows.shape[-1]))
        return out.index_add(0, self.token_idx, rows).view(self.hidden_shape)


def _all_to_all_no_grad(group, tensor, output_splits, input_splits):
    if dist.get_world_size(group) == 1:
        return tensor
    as_int = tensor.to(torch.uint8).contiguous()
    out = as_int.new_empty((sum(output_splits),) + tuple(as_int.shape[1:]))
    dist.all_to_all_single(out, as_int, output_splits, input_splits, group=group)
    return out.to(tensor.dtype)
