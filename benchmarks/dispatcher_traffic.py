"""Hierarchical (node-limited) vs flat all-to-all on the same routed batch.

    python -m torch.distributed.run --standalone --nproc-per-node 8 benchmarks/dispatcher_traffic.py

Prints, per node count and M (K = 8 routed experts per token), inter-node and intra-node bytes per
token (dispatch + combine) and the time of one dispatch+combine round trip. CPU ranks stand in for
GPUs: bytes are exact, times show the extra stage's overhead on gloo, not fabric speed.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_dsv3.models.presets import get_preset
from megatron_dsv3.models.transformer_config import build_transformer_config
from megatron_dsv3.moe.hierarchical_dispatcher import HierarchicalTokenDispatcher
from megatron_dsv3.moe.router import group_limited_topk
from megatron_dsv3.moe.token_dispatcher import AllToAllTokenDispatcher
from megatron_dsv3.moe.topology import destroy_ep_topology, initialize_ep_topology, set_gpus_per_node
from megatron_dsv3.platform import enable_cpu_execution


def round_trip(dispatcher, hidden, routing_map, probs):
    start = time.perf_counter()
    rows, row_probs = dispatcher.dispatch_preprocess(hidden, routing_map, probs)
    rows, row_probs = dispatcher.token_dispatch(rows, row_probs)
    expert_in, _, _ = dispatcher.dispatch_postprocess(rows, row_probs)
    out = dispatcher.combine_postprocess(dispatcher.token_combine(dispatcher.combine_preprocess(expert_in)))
    dist.barrier()
    return out, time.perf_counter() - start


def measure(kind, config, hidden, routing_map, probs, repeats):
    dispatcher = kind(
        config.num_moe_experts // dist.get_world_size(), None, config=config, pg_collection=get_default_pg_collection()
    )
    round_trip(dispatcher, hidden, routing_map, probs)  # warm-up
    dispatcher.traffic.reset()
    seconds = min(round_trip(dispatcher, hidden, routing_map, probs)[1] for _ in range(repeats))
    counts = torch.tensor([dispatcher.traffic.inter_node_bytes, dispatcher.traffic.intra_node_bytes], dtype=torch.float64)
    dist.all_reduce(counts)
    return counts / repeats, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens-per-rank", type=int, default=1024)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    enable_cpu_execution()
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    parallel_state.initialize_model_parallel(expert_model_parallel_size=world)
    model = get_preset("tiny").replace(num_experts=args.experts, moe_router_topk=args.topk, hidden_size=args.hidden_size)
    config = build_transformer_config(model, expert_model_parallel_size=world)
    rows = []
    for per_node in (g for g in (4, 2, 1) if world % g == 0 and world // g >= 2):
        nodes = world // per_node
        set_gpus_per_node(per_node)
        initialize_ep_topology()
        for m in range(1, min(4, nodes) + 1):
            torch.manual_seed(dist.get_rank())
            scores = torch.rand(args.tokens_per_rank, args.experts)
            chosen = group_limited_topk(scores, args.topk, nodes, m)
            routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, chosen, True)
            probs = torch.zeros_like(scores).scatter(1, chosen, 1.0 / args.topk)
            hidden = torch.randn(args.tokens_per_rank, 1, args.hidden_size)
            result = {}
            for name, kind in (("flat", AllToAllTokenDispatcher), ("hierarchical", HierarchicalTokenDispatcher)):
                result[name] = measure(kind, config, hidden, routing_map, probs, args.repeats)
            rows.append((nodes, per_node, m, result))
        destroy_ep_topology()
    if dist.get_rank() == 0:
        tokens = args.tokens_per_rank * world
        print(f"K={args.topk}, {args.experts} experts, hidden {args.hidden_size} fp32, {tokens} tokens, "
              f"{world} ranks; bytes per token, dispatch+combine")
        print(f"{'nodes':>5} {'gpus/node':>9} {'M':>2} | {'flat inter':>10} {'hier inter':>10} {'ratio':>6} {'M/K':>5}"
              f" | {'flat intra':>10} {'hier intra':>10} | {'flat ms':>8} {'hier ms':>8}")
        for nodes, per_node, m, result in rows:
            (f_bytes, f_s), (h_bytes, h_s) = result["flat"], result["hierarchical"]
            ratio = h_bytes[0] / f_bytes[0] if f_bytes[0] else float("nan")
            print(f"{nodes:>5} {per_node:>9} {m:>2} | {f_bytes[0] / tokens:>10.0f} {h_bytes[0] / tokens:>10.0f} "
                  f"{ratio:>6.2f} {m / args.topk:>5.2f} | {f_bytes[1] / tokens:>10.0f} {h_bytes[1] / tokens:>10.0f} | "
                  f"{f_s * 1e3:>8.1f} {h_s * 1e3:>8.1f}")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
