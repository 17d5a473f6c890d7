"""MLA's fused RoPE without Triton (models/mla_rope.py, through megatron-core's apply_rope_fusion path) against
megatron-core's op-by-op RoPE on the same weights and tokens: bit-identical loss and gradients, with and without
the up-projection recompute, while its autograd nodes keep only cos and sin. One process."""

import pytest
import torch

from conftest import autograd_node_names
from megatron_dsv3.models import mla_rope
from megatron_dsv3.models.gpt_builder import build_model
from megatron_dsv3.models.presets import get_preset
from megatron_dsv3.models.transformer_config import build_transformer_config
from megatron_dsv3.training.arguments import parse_args
from megatron_dsv3.training.init_weights import init_weights_layout_independent
from megatron_dsv3.training.initialize import initialize_single_process

SEQ, BATCH = 16, 3


@pytest.fixture(scope="module", autouse=True)
def single_process():
    initialize_single_process()


def loss_and_grads(rope_fusion: bool, **recompute):
    cfg = get_preset("tiny")
    config = build_transformer_config(cfg, rope_fusion=rope_fusion, **recompute)
    assert config.apply_rope_fusion is rope_fusion
    model = build_model(config, cfg.vocab_size, SEQ, pre_process=True, post_process=True, pp_rank=0)
    init_weights_layout_independent([model], std=cfg.init_method_std, seed=7)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    loss = model(tokens[:, :-1], positions, None, labels=tokens[:, 1:]).mean()
    nodes = autograd_node_names(loss.grad_fn)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, nodes


@pytest.mark.parametrize("recompute", [{}, {"recompute_granularity": "selective",
                                            "recompute_modules": ["mla_up_proj"]}], ids=["plain", "up-proj-recompute"])
def test_fused_rope_is_the_op_by_op_rope_bit_for_bit(recompute):
    fused_loss, fused_grads, fused_nodes = loss_and_grads(True, **recompute)
    loss, grads, nodes = loss_and_grads(False, **recompute)
    if not recompute:  # (the recompute's checkpoint hides the up-projection's nodes from the graph)
        assert {"_MlaRopeQBackward", "_MlaRopeKVBackward"} <= fused_nodes and "CatBackward0" in nodes
        assert not {"_MlaRopeQBackward", "_MlaRopeKVBackward"} & nodes
    assert torch.equal(fused_loss, loss), (fused_loss, loss)
    assert fused_grads.keys() == grads.keys()
    for name in grads:
        assert torch.equal(fused_grads[name], grads[name]), name


def test_rope_nodes_keep_only_cos_and_sin():
    cfg = get_preset("tiny")
    heads, nope, rope, v = cfg.num_attention_heads, cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim
    cos, sin = torch.randn(SEQ + 4, 1, 1, rope), torch.randn(SEQ + 4, 1, 1, rope)
    q = torch.randn(SEQ, BATCH, heads, nope + rope, requires_grad=True)
    kv = torch.randn(SEQ, BATCH, heads, nope + v, requires_grad=True)
    k_pe = torch.randn(SEQ, BATCH, 1, rope, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        query = mla_rope.apply_mla_rope_for_q(q, cos, sin, nope, rope)
        key, value = mla_rope.apply_mla_rope_for_kv(kv, k_pe, cos, sin, rope, nope, v)
    assert query.shape == q.shape and key.shape == (SEQ, BATCH, heads, nope + rope) and value.shape == (SEQ, BATCH,
                                                                                                          heads, v)
    assert [t.shape for t in saved] == [(SEQ, 1, 1, rope)] * 4
    # the parts without RoPE pass through unchanged, the RoPE parts are a rotation (norm kept) of each pair
    assert torch.equal(query[..., :nope], q[..., :nope]) and torch.equal(value, kv[..., nope:])
    assert torch.equal(key[..., :nope], kv[..., :nope]) and torch.equal(key[..., nope:], key[:, :, :1, nope:].expand_as(
        key[..., nope:]))


def test_packed_sequences_are_refused():
    q = torch.zeros(4, 2, 8 + 4)
    with pytest.raises(NotImplementedError, match="packed sequences"):
        mla_rope.apply_mla_rope_for_q(q, torch.zeros(4, 1, 1, 4), torch.zeros(4, 1, 1, 4), 8, 4,
                                      cu_seqlens_q=torch.tensor([0, 4]))


def test_no_rope_fusion_flag():
    from megatron_dsv3.models.transformer_config import transformer_config_from_args

    for argv, fused in (([], True), (["--no-rope-fusion"], False)):
        args = parse_args(["--model", "tiny", *argv], world_size=1)
        assert transformer_config_from_args(args).apply_rope_fusion is fused
