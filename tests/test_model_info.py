"""Parameter counts against the published sizes, the release's tensor shapes and a real transformers model."""

import importlib.util
import os

import pytest
import torch

from megatron_dsv3.models.param_count import count_parameters, flops_per_token
from megatron_dsv3.models.presets import get_preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_deepseek_v3_published_sizes():
    p = count_parameters(get_preset("deepseek-v3"))
    assert p.total == pytest.approx(671e9, rel=0.01)
    assert p.total_with_mtp == pytest.approx(685e9, rel=0.01)
    # published "37B" has two significant digits: the count must round to it
    assert round(p.activated / 1e9) == 37


def test_deepseek_v2_lite_published_sizes():
    p = count_parameters(get_preset("deepseek-v2-lite"))
    assert p.total == pytest.approx(15.7e9, rel=0.01)
    assert p.total_with_mtp == p.total
    # published 2.4B; no consistent convention reaches it closer than 2.45B (param_count's docstring)
    assert p.activated == pytest.approx(2.4e9, rel=0.025)


def test_deepseek_v3_total_from_release_shapes():
    """Sum of the tensor shapes of the released checkpoint (its model.safetensors.index.json), float64."""
    h, V, E, I, F = 7168, 129280, 256, 2048, 18432
    attn = 1536 * 7168 + 1536 + 24576 * 1536 + 576 * 7168 + 512 + 32768 * 512 + 7168 * 16384
    norms = 2 * h
    dense = 3 * F * h
    moe = E * 3 * I * h + 3 * I * h + E * h + E  # experts, shared expert, gate.weight, e_score_correction_bias
    main = 2.0 * V * h + 61 * (attn + norms) + 3 * dense + 58 * moe + h
    mtp = 2.0 * h * h + 3 * h + attn + norms + moe + 2 * V * h  # eh_proj, enorm/hnorm/final, layer, copies
    p = count_parameters(get_preset("deepseek-v3"))
    assert p.total == main
    assert p.total_with_mtp == main + mtp
    # activated: the main model minus 248 unselected experts per MoE layer and the input embedding
    assert p.activated == main - 58 * (E - 8) * 3 * I * h - V * h


def _hf_model(cfg, q_lora_rank):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    first_dense = cfg.moe_layer_pattern.index(1)
    hf = DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        moe_intermediate_size=cfg.moe_ffn_hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
        n_shared_experts=cfg.moe_shared_expert_intermediate_size // cfg.moe_ffn_hidden_size,
        n_routed_experts=cfg.num_experts, kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=q_lora_rank,
        qk_rope_head_dim=cfg.qk_pos_emb_head_dim, v_head_dim=cfg.v_head_dim, qk_nope_head_dim=cfg.qk_head_dim,
        n_group=cfg.moe_router_num_groups, topk_group=cfg.moe_router_group_topk,
        num_experts_per_tok=cfg.moe_router_topk, first_k_dense_replace=first_dense,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return DeepseekV3ForCausalLM(hf).eval()


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_count_equals_transformers_numel(q_lora_rank):
    cfg = get_preset("tiny").replace(q_lora_rank=q_lora_rank, moe_shared_expert_intermediate_size=64)
    model = _hf_model(cfg, q_lora_rank)
    numel = sum(p.numel() for p in model.parameters())
    numel += sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    assert count_parameters(cfg).total == numel  # transformers drops the MTP layer


def test_flops_per_token_matches_counted_forward():
    """torch's FLOP counter on the transformers forward (eager attention: full s x s scores, no causal
    saving) gives 2*N_matmul + 2*L*heads*(qk+v)*s per token; flops_per_token is 3x that with (s+1)/2 keys."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = get_preset("tiny").replace(mtp_num_layers=None)
    model = _hf_model(cfg, cfg.q_lora_rank)
    model.config._attn_implementation = "eager"
    model.set_experts_implementation("eager")  # the default grouped_mm has no FLOP formula
    s = 16
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, cfg.vocab_size, (1, s)))
    hd = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.qk_pos_emb_head_dim + cfg.v_head_dim)
    matmul_fwd = counter.get_total_flops() / s - 2 * cfg.num_layers * hd * s
    expected = 3 * matmul_fwd + 3 * 2 * cfg.num_layers * hd * (s + 1) / 2
    assert flops_per_token(cfg, s) == pytest.approx(expected, rel=1e-9)


def test_model_info_prints_headline_numbers():
    text = _tool("model_info").report("deepseek-v3", 4096)
    for needle in ("671.026B", "684.490B", "36.626B", "routed_experts", "mtp.eh_proj"):
        assert needle in text
