"""DeepSeek-V3 router: sigmoid affinities, aux-loss-free bias, group-limited top-k (arXiv:2412.19437 §2.1.2).

    s_i,t   = sigmoid(u_t · e_i)                                   affinity (softmax for V2)
    select  = TopK_K(s_i,t + b_i)  within the top-M groups          b_i: expert bias, selection only
    group score = sum of the 2 highest (s + b) in the group          (DeepSeek's code and HF)
    g_i,t   = s_i,t / Σ_{j∈select} s_j,t × routed_scaling_factor     gating weight (norm_topk_prob)
    b_i    += γ · sign(mean_load − load_i)                           after each step, outside autograd
    L_bal   = α Σ_i f_i P_i per sequence, f_i = N_r/(K T) Σ_t 1[i∈select_t], P_i = 1/T Σ_t s'_i,t
"""

import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

GROUP_SCORE_TOPK = 2


def group_limited_topk(scores: torch.Tensor, topk: int, num_groups: int, group_topk: int):
    """Indices of the top-k experts of each token, taken from its `group_topk` best groups."""
    tokens, experts = scores.shape
    grouped = scores.view(tokens, num_groups, experts // num_groups)
    group_scores = grouped.topk(min(GROUP_SCORE_TOPK, grouped.shape[-1]), dim=-1).values.sum(-1)
    best_groups = group_scores.topk(group_topk, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    outside = ~group_mask.unsqueeze(-1)  # [tokens, groups, 1]: broadcast over each group's experts
    return grouped.masked_fill(outside, float("-inf")).view(tokens, experts).topk(topk, dim=-1).indices


class DSv3Router(MegatronModule):
    """Returns dense `probs` [tokens, experts] (gating weights, zero if unselected) and the bool
    `routing_map` [tokens, experts], the contract of megatron-core's MoELayer."""

    def __init__(self, config, pg_collection=None):
        super().__init__(config)
        self.topk = config.moe_router_topk
        self.num_experts = config.num_moe_experts
        self.num_groups = config.moe_router_num_groups
        self.group_topk = config.moe_router_group_topk
        self.score_function = config.moe_router_score_function
        self.scaling_factor = config.moe_router_topk_scaling_factor or 1.0
        self.norm_topk_prob = getattr(config, "moe_router_norm_topk_prob", True)
        self.seq_aux_loss_coeff = config.moe_aux_loss_coeff
        self.layer_number = None
        self.weight = torch.nn.Parameter(
            torch.empty(self.num_experts, config.hidden_size, dtype=torch.float32)
        )
        config.init_method(self.weight)
        self.register_buffer(
            "expert_bias",
            torch.zeros(self.num_experts, dtype=torch.float32),
            persistent=config.moe_router_enable_expert_bias,
        )
        self.enable_expert_bias = config.moe_router_enable_expert_bias
        self.register_buffer(
            "local_tokens_per_expert", torch.zeros(self.num_experts), persistent=False
        )
        self.register_buffer(  # summed over steps until training/expert_load.py reads and resets it
            "interval_tokens_per_expert", torch.zeros(self.num_experts), persistent=False
        )
        self.step_tokens_per_expert = None
        self.last_aux_loss = None

    def set_layer_number(self, layer_number: int):
        self.layer_number = layer_number

    def affinities(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.nn.functional.linear(hidden.float(), self.weight.float())
        if self.score_function == "sigmoid":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        biased = scores.detach() + self.expert_bias if self.enable_expert_bias else scores.detach()
        if self.num_groups and self.num_groups > 1:
            return group_limited_topk(biased, self.topk, self.num_groups, self.group_topk)
        return biased.topk(self.topk, dim=-1).indices

    def forward(self, hidden: torch.Tensor, padding_mask=None):
        seq_len, batch = hidden.shape[0], hidden.shape[1]
        scores = self.affinities(hidden.reshape(-1, hidden.shape[-1]))
        top_idx = self.select(scores)
        weights = scores.gather(1, top_idx)
        if self.norm_topk_prob and self.topk > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        weights = weights * self.scaling_factor
        probs = torch.zeros_like(scores).scatter(1, top_idx, weights)
        routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top_idx, True)

        if self.training and torch.is_grad_enabled():
            self.local_tokens_per_expert += routing_map.sum(0)
            if self.seq_aux_loss_coeff > 0:
                aux_loss = self.sequence_balance_loss(scores, routing_map, seq_len, batch)
                self.last_aux_loss = aux_loss.detach()
                probs = MoEAuxLossAutoScaler.apply(probs, aux_loss)
        return probs.type_as(hidden), routing_map

    def sequence_balance_loss(self, scores, routing_map, seq_len, batch):
        """L_bal = α Σ_i f_i P_i averaged over the batch's sequences (tokens are [s, b]-ordered)."""
        normalized = scores / scores.sum(-1, keepdim=True)
        p = normalized.view(seq_len, batch, -1).mean(0)  # [b, E]
        f = routing_map.view(seq_len, batch, -1).float().mean(0) * (self.num_experts / self.topk)
        return self.seq_aux_loss_coeff * (f * p).sum(-1).mean()


def finalize_model_grads_keeping_expert_load(model_chunks, *args, **kwargs):
    """megatron-core's finalize_model_grads (which applies b_i += γ·sign(mean − load_i), finding our
    routers by their `expert_bias` / `local_tokens_per_expert` buffers), keeping each router's step load
    for logging first and adding it to the interval's (on device, no sync); the step's counts start from
    zero also without the bias (megatron-core zeroes them only with it)."""
    routers = _routers(model_chunks)
    for router in routers:
        router.step_tokens_per_expert = router.local_tokens_per_expert.clone()
        router.interval_tokens_per_expert += router.step_tokens_per_expert
    result = finalize_model_grads(model_chunks, *args, **kwargs)
    for router in routers:
        router.local_tokens_per_expert.zero_()
    return result


def _routers(model_chunks):
    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, DSv3Router)]


@torch.no_grad()
def expert_load_imbalance(model_chunks, group=None):
    """max/mean tokens per expert of each router over the last step, summed over `group`."""
    loads = [r.step_tokens_per_expert for r in _routers(model_chunks) if r.step_tokens_per_expert is not None]
    if not loads:
        return []
    loads = torch.stack(loads)
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(loads, group=group)
    return (loads.max(-1).values / loads.mean(-1).clamp(min=1e-9)).tolist()
