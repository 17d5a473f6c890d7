"""The DeepSeek-V3 router against a per-token reference written from the paper's equations."""

import types

import torch

from megatron_dsv3.moe.router import DSv3Router, group_limited_topk
from reference_moe import reference_route


def make_router(num_experts=16, topk=3, groups=4, group_topk=2, coeff=0.0, score="sigmoid", hidden=8):
    config = types.SimpleNamespace(
        moe_router_topk=topk, num_moe_experts=num_experts, moe_router_num_groups=groups,
        moe_router_group_topk=group_topk, moe_router_score_function=score,
        moe_router_topk_scaling_factor=2.5, moe_router_norm_topk_prob=True, moe_aux_loss_coeff=coeff,
        hidden_size=hidden, init_method=lambda w: torch.nn.init.normal_(w, 0, 1.0),
        moe_router_enable_expert_bias=True,
    )
    return DSv3Router(config)


def test_routing_matches_reference_with_bias_and_groups():
    torch.manual_seed(0)
    router = make_router()
    router.expert_bias.normal_(0, 0.3)
    hidden = torch.randn(5, 2, 8)  # [s, b, h]
    probs, routing_map = router(hidden)
    scores = torch.sigmoid(hidden.reshape(-1, 8) @ router.weight.t())
    expected = reference_route(scores, router.expert_bias, 3, 4, 2, 2.5, True)
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(routing_map, expected > 0)


def test_group_score_is_top2_sum_not_topk_over_groups():
    # one group has a single very high expert, another two moderately high ones; top-2 sum picks the latter,
    # Megatron-Core's top-(k/groups) = top-1 rule would pick the former
    scores = torch.tensor([[0.9, 0.0, 0.0, 0.0, 0.6, 0.6, 0.0, 0.0]])
    chosen = group_limited_topk(scores, topk=2, num_groups=2, group_topk=1)
    assert sorted(chosen[0].tolist()) == [4, 5]


def test_bias_steers_selection_but_not_gating_weights():
    torch.manual_seed(1)
    router = make_router(groups=None, group_topk=None)
    hidden = torch.randn(4, 1, 8)
    probs_before, map_before = router(hidden)
    router.expert_bias[map_before.sum(0).argmax()] = -10.0  # push the busiest expert out
    probs_after, map_after = router(hidden)
    assert map_after[:, map_before.sum(0).argmax()].sum() == 0
    scores = torch.sigmoid(hidden.reshape(-1, 8) @ router.weight.t())
    chosen = probs_after > 0
    # gating weights come from the unbiased scores of the chosen experts
    expected = scores * chosen / (scores * chosen).sum(-1, keepdim=True) * 2.5
    torch.testing.assert_close(probs_after, expected)


def test_sequence_balance_loss_formula():
    torch.manual_seed(2)
    router = make_router(coeff=0.01, groups=None, group_topk=None)
    router.train()
    seq, batch, experts, topk = 6, 3, 16, 3
    hidden = torch.randn(seq, batch, 8, requires_grad=True)
    probs, routing_map = router(hidden)
    scores = torch.sigmoid(hidden.reshape(-1, 8) @ router.weight.t()).view(seq, batch, experts)
    chosen = routing_map.view(seq, batch, experts).float()
    expected = 0.0
    for b in range(batch):
        f = experts / (topk * seq) * chosen[:, b].sum(0)
        p = (scores[:, b] / scores[:, b].sum(-1, keepdim=True)).mean(0)
        expected += 0.01 * (f * p).sum() / batch
    torch.testing.assert_close(router.last_aux_loss, expected.detach())
    # the loss reaches the router weights through backward
    probs.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_counts_tokens_per_expert_in_training_only():
    router = make_router()
    hidden = torch.randn(4, 2, 8)
    router.eval()
    router(hidden)
    assert router.local_tokens_per_expert.sum() == 0
    router.train()
    router(hidden)
    assert router.local_tokens_per_expert.sum() == 4 * 2 * 3
