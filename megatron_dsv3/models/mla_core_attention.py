"""Device-agnostic core attention for Multi-head Latent Attention (DeepSeek-V3 §2.1.1).

megatron-core's local `DotProductAttention` rejects MLA's unequal key/value head dims, and its TE
version needs a GPU, so the local spec uses this module:

    o_t,i = Σ_j softmax_j(q_t,i · k_j,i × softmax_scale) v_j,i        (causal: j ≤ t)

with softmax_scale = mscale² / sqrt(d_nope + d_rope) (YaRN, computed by megatron's MLA).
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
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            scale=self.softmax_scale,
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
