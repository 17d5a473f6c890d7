"""Where each Megatron tensor lives in a torch_dist checkpoint, and the shape the config gives it.

megatron-core 0.16.1 (our local spec) stores every decoder/MTP layer under its own global key
(`decoder.layers.N.`), so layers need no pipeline offsets. Routed experts share one key per layer,
`...mlp.experts.experts.linear_fcX.weight`, with a leading expert axis of size num_experts; each expert
is the chunk at offset (e, 0, 0). Every linear module also stores a `_extra_state` object (None for
the local spec), per expert for the routed ones; loading requires them.
"""

import re
from typing import Dict, NamedTuple, Optional, Tuple

from megatron_dsv3.models.presets import DSv3ModelConfig

_LOCAL_EXPERT = re.compile(r"^(.*\.mlp\.experts\.)local_experts\.(\d+)\.(.*)$")
_LINEAR_MODULE = re.compile(r"(^|\.)(linear_\w+|eh_proj)$")


class Placement(NamedTuple):
    """A Megatron tensor's chunk in the checkpoint: key, global shape, offset of the chunk."""

    key: str
    global_shape: Tuple[int, ...]
    offset: Tuple[int, ...]


def _shapes(cfg: DSv3ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Shape of each tensor of a layer by its name inside the TransformerLayer (MTP: inside mtp.layers.j)."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    q_head = cfg.qk_head_dim + cfg.qk_pos_emb_head_dim
    shapes = {
        "input_layernorm.weight": (h,),
        "pre_mlp_layernorm.weight": (h,),
        "self_attention.linear_q_proj.weight": (heads * q_head, h),
        "self_attention.linear_kv_down_proj.weight": (cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim, h),
        "self_attention.kv_layernorm.weight": (cfg.kv_lora_rank,),
        "self_attention.linear_kv_up_proj.weight": (heads * (cfg.qk_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        "self_attention.linear_proj.weight": (h, heads * cfg.v_head_dim),
        "mlp.linear_fc1.weight": (2 * cfg.ffn_hidden_size, h),
        "mlp.linear_fc2.weight": (h, cfg.ffn_hidden_size),
        "enorm.weight": (h,),
        "hnorm.weight": (h,),
        "eh_proj.weight": (h, 2 * h),
        "final_layernorm.weight": (h,),
    }
    if cfg.q_lora_rank is not None:
        shapes.update({
            "self_attention.linear_q_down_proj.weight": (cfg.q_lora_rank, h),
            "self_attention.q_layernorm.weight": (cfg.q_lora_rank,),
            "self_attention.linear_q_up_proj.weight": (heads * q_head, cfg.q_lora_rank),
        })
    if cfg.num_experts:
        shapes.update({
            "mlp.router.weight": (cfg.num_experts, h),
            "mlp.router.expert_bias": (cfg.num_experts,),
            "mlp.experts.linear_fc1.weight": (2 * cfg.moe_ffn_hidden_size, h),
            "mlp.experts.linear_fc2.weight": (h, cfg.moe_ffn_hidden_size),
        })
        shared = cfg.moe_shared_expert_intermediate_size
        if shared:
            shapes["mlp.shared_experts.linear_fc1.weight"] = (2 * shared, h)
            shapes["mlp.shared_experts.linear_fc2.weight"] = (h, shared)
    return shapes


_GLOBAL_SHAPES = {
    "embedding.word_embeddings.weight": lambda c: (c.vocab_size, c.hidden_size),
    "output_layer.weight": lambda c: (c.vocab_size, c.hidden_size),
    "decoder.final_layernorm.weight": lambda c: (c.hidden_size,),
}
_IN_LAYER = re.compile(r"^(?:decoder\.layers\.\d+\.|mtp\.layers\.\d+\.(?:transformer_layer\.)?)(.*)$")


def expected_shape(name: str, cfg: DSv3ModelConfig) -> Optional[Tuple[int, ...]]:
    """The shape `cfg` gives the Megatron tensor `name` (per expert for routed experts); None if unknown."""
    if name in _GLOBAL_SHAPES:
        return _GLOBAL_SHAPES[name](cfg)
    match = _IN_LAYER.match(name)
    if not match:
        return None
    local = re.sub(r"local_experts\.\d+\.", "", match.group(1))
    return _shapes(cfg).get(local)


def placement(name: str, shape: Tuple[int, ...], cfg: DSv3ModelConfig) -> Placement:
    """Where the Megatron tensor `name` of `shape` goes in the torch_dist checkpoint."""
    match = _LOCAL_EXPERT.match(name)
    if not match:
        return Placement(name, tuple(shape), (0,) * len(shape))
    key = f"{match.group(1)}experts.{match.group(3)}"
    return Placement(key, (cfg.num_experts, *shape), (int(match.group(2)),) + (0,) * len(shape))


def extra_state_key(name: str, cfg: DSv3ModelConfig) -> Optional[str]:
    """The checkpoint key of the `_extra_state` object that goes with weight `name`, if its module has one."""
    module, _, param = name.rpartition(".")
    if param != "weight" or not _LINEAR_MODULE.search(module):
        return None
    match = _LOCAL_EXPERT.match(module + ".")
    if match:
        expert_module = f"{match.group(1)}experts.{match.group(3)[:-1]}"
        return f"{expert_module}._extra_state/shard_{match.group(2)}_{cfg.num_experts}"
    return f"{module}._extra_state/shard_0_1"
