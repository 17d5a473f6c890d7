"""Plain-PyTorch DeepSeekMoE written from the paper's equations, token by token: the reference the
parallel dispatchers and the router are checked against."""

import torch
import torch.nn.functional as F


def reference_route(scores, bias, topk, num_groups, group_topk, scaling, normalize):
    """Gating weights [tokens, experts] (0 where unselected), following DeepSeek's released code."""
    tokens, experts = scores.shape
    per_group = experts // num_groups
    weights = torch.zeros_like(scores)
    for t in range(tokens):
        biased = (scores[t] + bias).detach()
        group_scores = [sum(sorted(biased[g * per_group:(g + 1) * per_group].tolist())[-2:]) for g in range(num_groups)]
        keep = sorted(range(num_groups), key=lambda g: -group_scores[g])[:group_topk]
        candidates = [e for e in range(experts) if e // per_group in keep]
        chosen = sorted(candidates, key=lambda e: -biased[e].item())[:topk]
        gate = scores[t, chosen]
        if normalize:
            gate = gate / gate.sum()
        weights[t, chosen] = gate * scaling
    return weights


def swiglu(x, fc1, fc2):
    gate, up = fc1.chunk(2, dim=0)
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), fc2)


def reference_moe(x, router_weight, bias, experts_fc1, experts_fc2, shared_fc1, shared_fc2, *, topk,
                  num_groups, group_topk, scaling):
    """y_t = shared(x_t) + Σ_e g_t,e · expert_e(x_t) for x of shape [tokens, hidden]."""
    scores = torch.sigmoid(F.linear(x, router_weight))
    gates = reference_route(scores, bias, topk, num_groups, group_topk, scaling, normalize=True)
    out = swiglu(x, shared_fc1, shared_fc2)
    for e in range(router_weight.shape[0]):
        rows = gates[:, e].nonzero().flatten()
        if len(rows):
            out = out.index_add(0, rows, gates[rows, e, None] * swiglu(x[rows], experts_fc1[e], experts_fc2[e]))
    return out, gates
