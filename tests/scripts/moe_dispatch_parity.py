"""The DeepSeekMoE layer with the hierarchical (and flat) dispatcher on 8 CPU ranks simulating
4 nodes × 2, against the single-process reference MoE, for EP = 2, 4, 8 and M = 1, 2, 4.

    torchrun --nproc-per-node 8 tests/scripts/moe_dispatch_parity.py OUT.json
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.spec_utils import build_module

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from reference_moe import reference_moe  # noqa: E402

from megatron_dsv3.models.presets import get_preset  # noqa: E402
from megatron_dsv3.models.spec import moe_spec  # noqa: E402
from megatron_dsv3.models.transformer_config import build_transformer_config  # noqa: E402
from megatron_dsv3.moe.hierarchical_dispatcher import HierarchicalTokenDispatcher  # noqa: E402
from megatron_dsv3.moe.token_dispatcher import AllToAllTokenDispatcher  # noqa: E402
from megatron_dsv3.moe.topology import destroy_ep_topology, initialize_ep_topology, set_gpus_per_node  # noqa: E402
from megatron_dsv3.platform import enable_cpu_execution  # noqa: E402
from megatron_dsv3.training.init_weights import init_weights_layout_independent  # noqa: E402

GPUS_PER_NODE, SEQ, BATCH_PER_RANK, TOPK = 2, 6, 2, 4


def gather(tensor):
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def build_layer(ep, nodes, group_topk, dispatcher, adversarial):
    parallel_state.initialize_model_parallel(expert_model_parallel_size=ep)
    model_parallel_cuda_manual_seed(0)
    if dispatcher is HierarchicalTokenDispatcher:
        initialize_ep_topology()
    model = get_preset("tiny").replace(
        num_experts=16, moe_router_topk=TOPK, moe_router_num_groups=nodes, moe_router_group_topk=group_topk,
        moe_aux_loss_coeff=0.0,
    )
    config = build_transformer_config(model, expert_model_parallel_size=ep)
    layer = build_module(moe_spec(dispatcher), config=config, layer_number=1)
    init_weights_layout_independent([layer], std=0.2, seed=1)
    if adversarial:  # every node holds one expert that every token likes: unlimited routing would use all nodes
        with torch.no_grad():
            per_node = 16 // nodes
            layer.router.weight[::per_node] = layer.router.weight[0] * 3 + 0.05 * layer.router.weight[::per_node]
    return layer, config


def global_expert_weights(layer, ep):
    local = [(e.linear_fc1.weight, e.linear_fc2.weight) for e in layer.experts.local_experts]
    fc1 = torch.stack([w for w, _ in local])
    fc2 = torch.stack([w for _, w in local])
    group = parallel_state.get_expert_model_parallel_group()
    parts1 = [torch.empty_like(fc1) for _ in range(ep)]
    parts2 = [torch.empty_like(fc2) for _ in range(ep)]
    dist.all_gather(parts1, fc1.detach(), group=group)
    dist.all_gather(parts2, fc2.detach(), group=group)
    return torch.cat(parts1), torch.cat(parts2)


def run_case(ep, group_topk, dispatcher, adversarial):
    nodes = max(1, ep // GPUS_PER_NODE)
    layer, config = build_layer(ep, nodes, group_topk, dispatcher, adversarial)
    torch.manual_seed(123)
    hidden = config.hidden_size
    x_all = torch.randn(SEQ, BATCH_PER_RANK * dist.get_world_size(), hidden)
    w_all = torch.randn_like(x_all)
    rank = dist.get_rank()
    cols = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
    x = x_all[:, cols].clone().requires_grad_()
    out, _ = layer(x)
    (out * w_all[:, cols]).sum().backward()

    # reference: the whole batch in one process, all experts, plain PyTorch
    fc1, fc2 = global_expert_weights(layer, ep)
    ref_params = [p.detach().clone().requires_grad_() for p in (
        layer.router.weight, fc1, fc2, layer.shared_experts.linear_fc1.weight, layer.shared_experts.linear_fc2.weight)]
    x_ref = x_all.reshape(-1, hidden).clone().requires_grad_()
    ref_out, gates = reference_moe(
        x_ref, ref_params[0], layer.router.expert_bias, *ref_params[1:], topk=TOPK, num_groups=nodes,
        group_topk=group_topk, scaling=config.moe_router_topk_scaling_factor)
    (ref_out * w_all.reshape(-1, hidden)).sum().backward()

    def max_err(actual, expected):
        return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-12))

    errors = {
        "output": max_err(torch.stack(gather(out.detach()), 1).reshape(SEQ, -1, hidden),
                          ref_out.detach().view(SEQ, -1, hidden)),
        "input_grad": max_err(torch.stack(gather(x.grad), 1).reshape(SEQ, -1, hidden), x_ref.grad.view(SEQ, -1, hidden)),
    }
    summed = {"router": layer.router.weight.grad.clone(), "shared_fc1": layer.shared_experts.linear_fc1.weight.grad.clone()}
    for tensor in summed.values():
        dist.all_reduce(tensor)
    errors["router_grad"] = max_err(summed["router"], ref_params[0].grad)
    errors["shared_grad"] = max_err(summed["shared_fc1"], ref_params[3].grad)
    # each expert's grad: summed over the ranks of its EP-replica group (the DP dimension of experts)
    expert_fc1_grad = torch.stack([e.linear_fc1.weight.grad for e in layer.experts.local_experts])
    dist.all_reduce(expert_fc1_grad, group=parallel_state.get_expert_data_parallel_group())
    parts = [torch.empty_like(expert_fc1_grad) for _ in range(ep)]
    dist.all_gather(parts, expert_fc1_grad, group=parallel_state.get_expert_model_parallel_group())
    errors["expert_grad"] = max_err(torch.cat(parts), ref_params[1].grad)

    nodes_per_token = (gates.view(gates.shape[0], nodes, -1) > 0).any(-1).sum(-1)
    traffic = layer.token_dispatcher.traffic
    counts = torch.tensor([traffic.inter_node_bytes, traffic.intra_node_bytes, traffic.max_nodes_per_token],
                          dtype=torch.float64)
    dist.all_reduce(counts[:2])
    dist.all_reduce(counts[2:], op=dist.ReduceOp.MAX)
    result = {
        "ep": ep, "M": group_topk, "nodes": nodes, "dispatcher": dispatcher.__name__, "adversarial": adversarial,
        "errors": errors, "max_nodes_per_token_reference": int(nodes_per_token.max()),
        "max_nodes_per_token_dispatched": int(counts[2]), "inter_node_bytes": float(counts[0]),
        "intra_node_bytes": float(counts[1]), "tokens": x_all.shape[0] * x_all.shape[1],
        "row_bytes": hidden * 4,
    }
    destroy_ep_topology()
    parallel_state.destroy_model_parallel()
    return result


def main():
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    enable_cpu_execution()
    dist.init_process_group("gloo")
    set_gpus_per_node(GPUS_PER_NODE)
    results = []
    for ep in (2, 4, 8):
        for group_topk in (1, 2, 4):
            if group_topk > max(1, ep // GPUS_PER_NODE):
                continue
            results.append(run_case(ep, group_topk, HierarchicalTokenDispatcher, adversarial=False))
    results.append(run_case(8, 2, HierarchicalTokenDispatcher, adversarial=True))
    results.append(run_case(8, 4, AllToAllTokenDispatcher, adversarial=False))
    results.append(run_case(8, 4, HierarchicalTokenDispatcher, adversarial=False))
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
