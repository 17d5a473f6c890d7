"""MLA's core attention (models/mla_core_attention.py) against the attention formula in float64: causal softmax
attention with MLA's unequal query/key and value head dims. On the CPU it must run torch's fused flash kernel (v
zero-padded to the query's head dim), which stores the softmax statistics instead of the [s, s] probabilities."""

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType

from conftest import autograd_node_names
from megatron_dsv3.models.mla_core_attention import MLACoreAttention
from megatron_dsv3.models.presets import get_preset
from megatron_dsv3.models.transformer_config import build_transformer_config
from megatron_dsv3.training.initialize import initialize_single_process

SEQ, BATCH, HEADS, QK_DIM, V_DIM, SCALE = 32, 2, 4, 24, 16, 0.3


@pytest.fixture(scope="module")
def attention():
    initialize_single_process()
    config = build_transformer_config(get_preset("tiny"))
    return MLACoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self",
                            softmax_scale=SCALE)


def reference(q, k, v):
    """o_t = Σ_{j ≤ t} softmax_j(q_t · k_j × scale) v_j per head, [s, b, h, d] in, [s, b, h·d_v] out."""
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) * SCALE
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    return torch.einsum("bhst,tbhd->sbhd", probs, v).reshape(SEQ, BATCH, -1)


def test_cpu_attention_is_the_formula_through_the_flash_kernel(attention):
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(SEQ, BATCH, HEADS, d, generator=generator) for d in (QK_DIM, QK_DIM, V_DIM)]
    grad_out = torch.randn(SEQ, BATCH, HEADS * V_DIM, generator=generator)
    ours = [t.clone().requires_grad_() for t in inputs]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = attention(*ours)
    assert "ScaledDotProductFlashAttentionForCpuBackward0" in autograd_node_names(out.grad_fn)
    assert max(t.numel() for t in saved) < BATCH * HEADS * SEQ * SEQ  # no [b, h, s, s] probabilities kept
    out.backward(grad_out)

    exact = [t.double().requires_grad_() for t in inputs]
    expected = reference(*exact)
    expected.backward(grad_out.double())
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)
    for name, a, b in zip("qkv", ours, exact):
        torch.testing.assert_close(a.grad, b.grad.float(), rtol=1e-5, atol=1e-5, msg=f"d{name}")
