"""Device-agnostic core attention for Multi-head Latent Attention (DeepSeek-V3 §2.1.1).

megatron-core's local `DotProductAttention` rejects MLA's unequal key/value head dims, and its TE
version needs a GPU, so the local spec uses this module:

    o_t,i = Σ_j softmax_j(q_t,i · k_j,i × softmax_scale) v_j,i        (causal: j ≤ t)

with softmax_scale = mscale² / sqrt(d_nope + d_rope) (YaRN, computed by megatron's MLA).

It runs as one fused kernel (torch's scaled_dot_product_attention): it stores the softmax statistics, not the
[s, s] probabilities. On GPUs SDPA's kernels take MLA's unequal head dims (d_nope + d_rope for q and k, d_v for v).
torch's CPU flash kernel needs one head dim for all three, else SDPA runs its math kernel (probabilities stored,
a full-row -inf check per call): on the CPU, v is zero-padded to the query's head dim and the output's padding
dropped, which changes nothing (zero columns of v give zero columns of o) but the kernel.
"""

import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class MLACoreAttention(MegatronModule):
    def __init__(
        self,
        config,
        layer_number,
        attn_mask_type,
        attention_type,
        softmax_scale=None,
        k_channels=None,
        v_channels=None,
        cp_comm_type=None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"MLACoreAttention supports causal masks only, got {attn_mask_type}")
        if config.context_parallel_size > 1:
            raise ValueError("--context-parallel-size > 1 needs Transformer Engine attention")
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, **_unused):
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        v_dim = v.shape[-1]
        if v.device.type == "cpu" and v_dim < q.shape[-1]:
            v = F.pad(v, (0, q.shape[-1] - v_dim))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            scale=self.softmax_scale,
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        s, b = query.shape[0], query.shape[1]
        return out[..., :v_dim].permute(2, 0, 1, 3).reshape(s, b, -1)
