"""Model presets: the architecture hyper-parameters of DeepSeek-V3-class models.

Field names are Megatron's argument names with `_` for `-`: every field is also a command-line flag
(`--num-layers`, `--moe-router-topk`, ...) that overrides the preset chosen with `--model NAME`.
"""

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Union


@dataclass
class DSv3ModelConfig:
    # Transformer trunk
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int  # dense (first-k) layers' SwiGLU width
    vocab_size: int
    max_position_embeddings: int = 4096
    norm_epsilon: float = 1e-6
    init_method_std: float = 0.006
    untie_embeddings_and_output_weights: bool = True

    # Multi-head latent attention (MLA)
    q_lora_rank: Optional[int] = None  # None: q projected directly (V2-Lite)
    kv_lora_rank: int = 512
    qk_head_dim: int = 128  # the non-rotary ("nope") part
    qk_pos_emb_head_dim: int = 64  # the decoupled rotary part
    v_head_dim: int = 128

    # YaRN rotary embedding
    rotary_base: float = 10000.0
    rotary_scaling_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0

    # DeepSeekMoE
    moe_layer_freq: Union[int, List[int]] = 1  # Megatron syntax: 1, or a 0/1 list like ([0]*3+[1]*58)
    num_experts: Optional[int] = None  # routed experts; None: every layer dense
    moe_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None  # n_shared_experts x moe_ffn_hidden_size
    moe_router_topk: int = 8
    moe_router_score_function: str = "sigmoid"  # sigmoid (V3) or softmax (V2)
    moe_router_num_groups: Optional[int] = None  # expert groups (V3: 8; = nodes for node-limited routing)
    moe_router_group_topk: Optional[int] = None  # groups a token may use (V3: 4)
    moe_router_topk_scaling_factor: Optional[float] = None  # routed_scaling_factor (V3: 2.5)
    moe_router_norm_topk_prob: bool = True  # normalize the selected sigmoid scores to sum to 1
    moe_router_enable_expert_bias: bool = True  # aux-loss-free balancing bias (selection only)
    moe_router_bias_update_rate: float = 1e-3
    moe_aux_loss_coeff: float = 0.0  # sequence-wise balance loss coefficient (V3: 1e-4)

    # Multi-token prediction
    mtp_num_layers: Optional[int] = None
    mtp_loss_scaling_factor: float = 0.1

    def replace(self, **overrides) -> "DSv3ModelConfig":
        return dataclasses.replace(self, **overrides)

    @property
    def moe_layer_pattern(self) -> List[int]:
        """1 for each MoE layer, 0 for each dense layer (Megatron's --moe-layer-freq)."""
        if self.num_experts is None:
            return [0] * self.num_layers
        freq = self.moe_layer_freq
        if isinstance(freq, int):
            return [1 if i % freq == 0 else 0 for i in range(self.num_layers)]
        if len(freq) != self.num_layers:
            raise ValueError(
                f"--moe-layer-freq lists {len(freq)} layers but --num-layers {self.num_layers}: give one 0/1 entry per layer"
            )
        return list(freq)


def _first_k_dense(k: int, num_layers: int) -> List[int]:
    return [0] * k + [1] * (num_layers - k)


PRESETS = {
    # DeepSeek-V3 671B (arXiv:2412.19437, config.json of the release).
    "deepseek-v3": DSv3ModelConfig(
        num_layers=61,
        hidden_size=7168,
        num_attention_heads=128,
        ffn_hidden_size=18432,
        vocab_size=129280,
        max_position_embeddings=163840,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_head_dim=128,
        qk_pos_emb_head_dim=64,
        v_head_dim=128,
        rotary_scaling_factor=40.0,
        original_max_position_embeddings=4096,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
        moe_layer_freq=_first_k_dense(3, 61),
        num_experts=256,
        moe_ffn_hidden_size=2048,
        moe_shared_expert_intermediate_size=2048,
        moe_router_topk=8,
        moe_router_score_function="sigmoid",
        moe_router_num_groups=8,
        moe_router_group_topk=4,
        moe_router_topk_scaling_factor=2.5,
        moe_router_norm_topk_prob=True,
        moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=1e-3,
        moe_aux_loss_coeff=1e-4,
        mtp_num_layers=1,
        mtp_loss_scaling_factor=0.1,
    ),
    # DeepSeek-V2-Lite 15.7B (2.4B activated): no q low-rank, softmax router, 2 shared experts.
    "deepseek-v2-lite": DSv3ModelConfig(
        num_layers=27,
        hidden_size=2048,
        num_attention_heads=16,
        ffn_hidden_size=10944,
        vocab_size=102400,
        max_position_embeddings=163840,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_head_dim=128,
        qk_pos_emb_head_dim=64,
        v_head_dim=128,
        rotary_scaling_factor=40.0,
        original_max_position_embeddings=4096,
        mscale=0.707,
        mscale_all_dim=0.707,
        moe_layer_freq=_first_k_dense(1, 27),
        num_experts=64,
        moe_ffn_hidden_size=1408,
        moe_shared_expert_intermediate_size=2 * 1408,
        moe_router_topk=6,
        moe_router_score_function="softmax",
        moe_router_num_groups=None,
        moe_router_group_topk=None,
        moe_router_topk_scaling_factor=1.0,
        moe_router_norm_topk_prob=False,
        moe_router_enable_expert_bias=False,
        moe_aux_loss_coeff=1e-3,
        mtp_num_layers=None,
    ),
    # CPU-sized DeepSeek-V3 proxy: every architectural feature of V3 at toy width.
    "tiny": DSv3ModelConfig(
        num_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        vocab_size=256,
        max_position_embeddings=256,
        init_method_std=0.02,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_head_dim=16,
        qk_pos_emb_head_dim=8,
        v_head_dim=16,
        rotary_scaling_factor=4.0,
        original_max_position_embeddings=64,
        moe_layer_freq=_first_k_dense(1, 4),
        num_experts=8,
        moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=32,
        moe_router_topk=4,
        moe_router_score_function="sigmoid",
        moe_router_num_groups=4,
        moe_router_group_topk=2,
        moe_router_topk_scaling_factor=2.5,
        moe_router_bias_update_rate=1e-3,
        moe_aux_loss_coeff=1e-4,
        mtp_num_layers=1,
        mtp_loss_scaling_factor=0.1,
    ),
    # CPU-sized DeepSeek-V2-Lite proxy: no q low-rank, softmax router, 2 shared experts.
    "tiny-v2-lite": DSv3ModelConfig(
        num_layers=3,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=128,
        vocab_size=256,
        max_position_embeddings=256,
        init_method_std=0.02,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_head_dim=16,
        qk_pos_emb_head_dim=8,
        v_head_dim=16,
        rotary_scaling_factor=4.0,
        original_max_position_embeddings=64,
        mscale=0.707,
        mscale_all_dim=0.707,
        moe_layer_freq=_first_k_dense(1, 3),
        num_experts=8,
        moe_ffn_hidden_size=32,
        moe_shared_expert_intermediate_size=64,
        moe_router_topk=2,
        moe_router_score_function="softmax",
        moe_router_topk_scaling_factor=1.0,
        moe_router_norm_topk_prob=False,
        moe_router_enable_expert_bias=False,
        moe_aux_loss_coeff=1e-3,
    ),
}


def get_preset(name: str) -> DSv3ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"--model {name!r} is not a preset; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


MODEL_FIELDS = [f.name for f in dataclasses.fields(DSv3ModelConfig)]
