"""Parameter counts and training FLOPs of a DSv3ModelConfig, from the config alone (nothing is allocated).

Conventions (DeepSeek-V3 §4.2; DeepSeek-V2 §3.1.1):
  total            the main model: embedding, untied output head, every layer, final norm. MTP excluded.
  total_with_mtp   plus each MTP module with its own copies of the embedding and output head, as the
                   released checkpoint stores them (671B -> 685B for DeepSeek-V3).
  activated        what one token's forward multiplies with: all attention, norms, dense FFNs, shared
                   experts, routers (+ expert bias), top-k routed experts, final norm and the output head.
                   The input embedding is a row lookup (no FLOPs) and is left out. This gives 36.6B for V3
                   (published 37B), 20.9B for V2 (21B) and 2.45B for V2-Lite (2.4B); counting the embedding
                   too gives 37.6B / 21.4B / 2.66B, further from all three.
"""

from dataclasses import dataclass, field
from typing import Dict

from megatron_dsv3.models.presets import DSv3ModelConfig


def mla_params(c: DSv3ModelConfig) -> Dict[str, int]:
    """One MLA block (DeepSeek-V2 §2.1.2): low-rank q (or a direct q_proj), joint low-rank kv whose down
    projection also yields the shared rotary key, output projection."""
    h, n = c.hidden_size, c.num_attention_heads
    qk = c.qk_head_dim + c.qk_pos_emb_head_dim
    p = {}
    if c.q_lora_rank is None:
        p["q_proj"] = h * n * qk
    else:
        p["q_down"] = h * c.q_lora_rank
        p["q_norm"] = c.q_lora_rank
        p["q_up"] = c.q_lora_rank * n * qk
    p["kv_down"] = h * (c.kv_lora_rank + c.qk_pos_emb_head_dim)
    p["kv_norm"] = c.kv_lora_rank
    p["kv_up"] = c.kv_lora_rank * n * (c.qk_head_dim + c.v_head_dim)
    p["o_proj"] = n * c.v_head_dim * h
    return p


def swiglu_params(hidden: int, ffn: int) -> int:
    """gate, up (hidden -> ffn) and down (ffn -> hidden)."""
    return 3 * hidden * ffn


def moe_params(c: DSv3ModelConfig) -> Dict[str, int]:
    """One DeepSeekMoE block: routed experts, the shared expert(s) as one wide SwiGLU, router (+ bias)."""
    h, e = c.hidden_size, c.num_experts
    return {
        "routed_experts": e * swiglu_params(h, c.moe_ffn_hidden_size),
        "shared_expert": swiglu_params(h, c.moe_shared_expert_intermediate_size or 0),
        "router": h * e + (e if c.moe_router_enable_expert_bias else 0),
    }


def layer_params(c: DSv3ModelConfig, is_moe: bool) -> Dict[str, int]:
    """One transformer layer: input norm + MLA, pre-MLP norm + dense SwiGLU or MoE."""
    p = {"attention": sum(mla_params(c).values()), "norms": 2 * c.hidden_size}
    if is_moe:
        p.update(moe_params(c))
    else:
        p["dense_mlp"] = swiglu_params(c.hidden_size, c.ffn_hidden_size)
    return p


def mtp_module_params(c: DSv3ModelConfig) -> Dict[str, int]:
    """One MTP depth (DeepSeek-V3 §2.2): enorm, hnorm, eh_proj (2h -> h), a full MoE layer, final norm;
    the release also stores its own embedding and output head (`*_copies`)."""
    h = c.hidden_size
    return {
        "eh_proj": 2 * h * h,
        "norms": 3 * h,
        "layer": sum(layer_params(c, is_moe=c.num_experts is not None).values()),
        "embedding_and_head_copies": c.vocab_size * h * (2 if c.untie_embeddings_and_output_weights else 1),
    }


@dataclass
class ParamCount:
    components: Dict[str, int]  # main model, by component
    mtp: Dict[str, int] = field(default_factory=dict)  # all MTP depths together
    activated: int = 0

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def total_with_mtp(self) -> int:
        return self.total + sum(self.mtp.values())


def _add(acc: Dict[str, int], part: Dict[str, int], times: int = 1) -> None:
    for k, v in part.items():
        acc[k] = acc.get(k, 0) + times * v


def count_parameters(c: DSv3ModelConfig) -> ParamCount:
    h, V = c.hidden_size, c.vocab_size
    comp = {"embedding": V * h, "output_layer": V * h if c.untie_embeddings_and_output_weights else 0}
    pattern = c.moe_layer_pattern
    for is_moe in pattern:
        _add(comp, layer_params(c, bool(is_moe)))
    comp["final_norm"] = h
    mtp: Dict[str, int] = {}
    if c.mtp_num_layers:
        _add(mtp, mtp_module_params(c), c.mtp_num_layers)
    return ParamCount(components=comp, mtp=mtp, activated=activated_parameters(c))


def routed_expert_params(c: DSv3ModelConfig) -> int:
    """One routed expert."""
    return swiglu_params(c.hidden_size, c.moe_ffn_hidden_size) if c.num_experts else 0


def norm_params(c: DSv3ModelConfig) -> int:
    """RMSNorm gains of one layer: input, pre-MLP, q (with q_lora_rank) and kv latent norms."""
    return 2 * c.hidden_size + (c.q_lora_rank or 0) + c.kv_lora_rank


def activated_layer_params(c: DSv3ModelConfig, is_moe: bool) -> int:
    """Parameters of one layer a token uses: the layer minus its unselected routed experts."""
    full = sum(layer_params(c, is_moe).values())
    if not is_moe:
        return full
    return full - (c.num_experts - c.moe_router_topk) * routed_expert_params(c)


def activated_parameters(c: DSv3ModelConfig) -> int:
    """Per-token activated parameters of the main model (module docstring: embedding excluded)."""
    layers = sum(activated_layer_params(c, bool(m)) for m in c.moe_layer_pattern)
    head = c.vocab_size * c.hidden_size
    return layers + c.hidden_size + head


def _matmul_params_per_token(c: DSv3ModelConfig, include_mtp: bool) -> int:
    """Weights one token multiplies with: activated layers without norm gains and expert bias, the head, and
    per MTP depth its eh_proj, layer and (shared) head."""
    bias = c.num_experts if c.num_experts and c.moe_router_enable_expert_bias else 0

    def layer(is_moe):
        return activated_layer_params(c, is_moe) - norm_params(c) - (bias if is_moe else 0)

    head = c.vocab_size * c.hidden_size
    total = sum(layer(bool(m)) for m in c.moe_layer_pattern) + head
    if include_mtp and c.mtp_num_layers:
        total += c.mtp_num_layers * (2 * c.hidden_size**2 + layer(c.num_experts is not None) + head)
    return total


def flops_per_token(c: DSv3ModelConfig, seq_length: int, include_mtp: bool = True) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward; one multiply-add = 2 FLOPs):

      6 * N_matmul  +  3 * 2 * L_attn * heads * (qk_head_dim + qk_pos_emb_head_dim + v_head_dim) * (s + 1) / 2

    N_matmul: the weights the token multiplies with (activated parameters without norms, expert bias and the
    embedding lookup; with each MTP depth's eh_proj, layer and output head when include_mtp). The second term is
    MLA's score (q.k) and context (p.v) products in the non-absorbed training form; with causal masking a token
    at position i attends to i + 1 keys, (s + 1) / 2 on average. L_attn counts the MTP layers too.
    """
    layers = c.num_layers + ((c.mtp_num_layers or 0) if include_mtp else 0)
    attn_dims = c.num_attention_heads * (c.qk_head_dim + c.qk_pos_emb_head_dim + c.v_head_dim)
    attention = 3 * 2 * layers * attn_dims * (seq_length + 1) / 2
    return 6 * _matmul_params_per_token(c, include_mtp) + attention
