"""Where each expert-parallel rank sits: node and local index, and the two sub-groups of its EP group.

    EP group = N nodes × G ranks.   inter-node group: the N ranks with my local index (one per node)
                                    intra-node group: the G ranks on my node

Nodes come from the launch (`LOCAL_WORLD_SIZE` ranks per node) or from `--simulated-gpus-per-node`
so that CPU tests can run 8 ranks as 4 nodes × 2. The groups are created once, collectively, before
the model is built (pipeline stages build different numbers of MoE layers).
"""

import os
from dataclasses import dataclass

import torch.distributed as dist
from megatron.core import parallel_state


@dataclass(frozen=True)
class EPTopology:
    num_nodes: int
    ranks_per_node: int
    node: int
    local_rank: int
    inter_node_group: object
    intra_node_group: object


_TOPOLOGY = None
_GPUS_PER_NODE = None


def set_gpus_per_node(count) -> None:
    """`--simulated-gpus-per-node`; None means the launch's LOCAL_WORLD_SIZE."""
    global _GPUS_PER_NODE
    _GPUS_PER_NODE = count


def gpus_per_node() -> int:
    return _GPUS_PER_NODE or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def node_layout(ep_ranks, per_node: int):
    """[(node id, [global ranks of the EP group on it])] in EP order; raises if misaligned."""
    nodes = {}
    for rank in ep_ranks:
        nodes.setdefault(rank // per_node, []).append(rank)
    sizes = {len(members) for members in nodes.values()}
    ordered = [r for members in nodes.values() for r in members]
    if len(sizes) != 1 or ordered != list(ep_ranks):
        raise ValueError(
            f"expert-parallel group {list(ep_ranks)} is not aligned with nodes of {per_node} ranks: "
            "each node must hold the same number of consecutive EP ranks; "
            "make --expert-model-parallel-size a multiple or a divisor of the GPUs per node"
        )
    return list(nodes.items())


def initialize_ep_topology() -> EPTopology:
    """Collective over the world: builds every EP group's inter- and intra-node sub-groups."""
    global _TOPOLOGY
    per_node = gpus_per_node()
    my_ep = tuple(dist.get_process_group_ranks(parallel_state.get_expert_model_parallel_group()))
    all_ep = [None] * dist.get_world_size()
    dist.all_gather_object(all_ep, my_ep)
    mine = {}
    for ep_ranks in sorted(set(all_ep)):
        layout = node_layout(ep_ranks, per_node)
        width = len(layout[0][1])
        for local in range(width):
            group = dist.new_group([members[local] for _, members in layout])
            if ep_ranks == my_ep and dist.get_rank() in [m[local] for _, m in layout]:
                mine["inter"] = group
        for _, members in layout:
            group = dist.new_group(members)
            if dist.get_rank() in members:
                mine["intra"] = group
        if ep_ranks == my_ep:
            position = my_ep.index(dist.get_rank())
            mine.update(num_nodes=len(layout), ranks_per_node=width, node=position // width, local=position % width)
    _TOPOLOGY = EPTopology(
        mine["num_nodes"], mine["ranks_per_node"], mine["node"], mine["local"], mine["inter"], mine["intra"]
    )
    return _TOPOLOGY


def get_ep_topology() -> EPTopology:
    if _TOPOLOGY is None:
        raise RuntimeError("the hierarchical dispatcher needs initialize_ep_topology() before the model is built")
    return _TOPOLOGY


def destroy_ep_topology() -> None:
    global _TOPOLOGY
    _TOPOLOGY = None
