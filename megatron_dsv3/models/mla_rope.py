"""MLA's decoupled RoPE (DeepSeek-V2 §2.1.3, V3 §2.1.1) as two autograd nodes, for hosts without Triton.

megatron-core's MLA applies RoPE either op by op (per call: cos/sin of the angles, de-interleave, rotate-half,
three concatenations, contiguous copies of q, k and v; twice per layer) or, with `apply_rope_fusion`, through
`fused_apply_mla_rope_for_q/kv` (Triton kernels on cached cos/sin). These are the same two functions in torch,
for a CPU or a GPU without Triton. With x the rope part of a head, c/s the cached cos/sin (YaRN's mscale folded
in) and the pairs (x₂ᵢ, x₂ᵢ₊₁) of DeepSeek's checkpoints:

    left_i  = x₂ᵢ · cᵢ − x₂ᵢ₊₁ · sᵢ          right_i = x₂ᵢ₊₁ · c_{i+e/2} + x₂ᵢ · s_{i+e/2}
    query   = [q_nope | left | right]          key = [k_nope | left(k_pe) | right(k_pe)] per head, value = v

the layout and the arithmetic of the op-by-op path (its outputs and gradients are bit-identical), without its
intermediates: each node saves cos and sin only (the Triton kernels' footprint).
"""

import torch


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[..., e] interleaved pairs -> [left | right]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos[..., :half] - x2 * sin[..., :half], x2 * cos[..., half:] + x1 * sin[..., half:]), -1)


def _rotate_backward(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Gradient of `_rotate` w.r.t. its interleaved input."""
    half = g.shape[-1] // 2
    g1, g2 = g[..., :half], g[..., half:]
    dx1 = g1 * cos[..., :half] + g2 * sin[..., half:]
    dx2 = g2 * cos[..., half:] - g1 * sin[..., :half]
    return torch.stack((dx1, dx2), -1).flatten(-2)


def _check_layout(cu_seqlens, cp_size: int, rotary_interleaved: bool) -> None:
    if cu_seqlens is not None or cp_size != 1 or rotary_interleaved:
        raise NotImplementedError("MLA RoPE without Triton: [s, b, heads, dim] inputs only (no packed sequences, "
                                  "no context parallelism, no interleaved rotary)")


class _MlaRopeQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, cos, sin, qk_head_dim):
        cos, sin = cos[:q.shape[0]], sin[:q.shape[0]]
        ctx.save_for_backward(cos, sin)
        ctx.qk_head_dim = qk_head_dim
        return torch.cat((q[..., :qk_head_dim], _rotate(q[..., qk_head_dim:], cos, sin)), -1)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        d = ctx.qk_head_dim
        return torch.cat((grad[..., :d], _rotate_backward(grad[..., d:], cos, sin)), -1), None, None, None


class _MlaRopeKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kv, k_pos_emb, cos, sin, k_dim):
        cos, sin = cos[:kv.shape[0]], sin[:kv.shape[0]]
        ctx.save_for_backward(cos, sin)
        ctx.k_dim = k_dim
        k_pe = _rotate(k_pos_emb, cos, sin).expand(*kv.shape[:-1], -1)  # one rope key shared by the heads
        return torch.cat((kv[..., :k_dim], k_pe), -1), kv[..., k_dim:].contiguous()

    @staticmethod
    def backward(ctx, dkey, dvalue):
        cos, sin = ctx.saved_tensors
        k = ctx.k_dim
        dkv = torch.cat((dkey[..., :k], dvalue), -1)
        dk_pe = _rotate_backward(dkey[..., k:].sum(-2, keepdim=True), cos, sin)
        return dkv, dk_pe, None, None, None


def apply_mla_rope_for_q(q, cos, sin, qk_head_dim, emb_dim, cu_seqlens_q=None, cp_rank=0, cp_size=1,
                         rotary_interleaved=False):
    """q [s, b, heads, qk_head_dim + emb_dim], cos/sin [≥s, 1, 1, emb_dim] -> the query, same shape."""
    _check_layout(cu_seqlens_q, cp_size, rotary_interleaved)
    return _MlaRopeQ.apply(q, cos, sin, qk_head_dim)


def apply_mla_rope_for_kv(kv, k_pos_emb, cos, sin, emb_dim, k_dim, v_dim, cu_seqlens_kv=None, cp_rank=0,
                          cp_size=1, rotary_interleaved=False):
    """kv [s, b, heads, k_dim + v_dim], k_pos_emb [s, b, 1, emb_dim] -> key [s, b, heads, k_dim + emb_dim],
    value [s, b, heads, v_dim]."""
    _check_layout(cu_seqlens_kv, cp_size, rotary_interleaved)
    return _MlaRopeKV.apply(kv, k_pos_emb, cos, sin, k_dim)
