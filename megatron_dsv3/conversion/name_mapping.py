"""Tensor names Hugging Face DeepSeek-V3 <-> megatron-core 0.16.1 GPTModel (our local spec, EP=1).

One decoder layer (or the MTP layer, HF index num_layers + j) at a time, so conversion streams.
Layouts agree except the SwiGLU input projection: Megatron's fc1 = cat([gate_proj, up_proj], dim 0).
MLA needs no permutation: kv_a_proj_with_mqa rows are [compressed kv; rope k] in both, kv_b_proj
rows are per head [k_nope; v] in both, and q_b_proj rows are per head [q_nope; q_rope] in both.
MTP: eh_proj input is cat[enorm(emb), hnorm(h)] in both; HF stores copies of the embedding and
output head in the MTP layer, which must equal the main ones.
"""

import re
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from megatron_dsv3.models.presets import DSv3ModelConfig

HF_EMBEDDING, HF_FINAL_NORM, HF_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
MEGATRON_EMBEDDING, MEGATRON_FINAL_NORM, MEGATRON_HEAD = (
    "embedding.word_embeddings.weight",
    "decoder.final_layernorm.weight",
    "output_layer.weight",
)
SCALE_INV_SUFFIX = "_scale_inv"
EXTRA_STATE_SUFFIX = "._extra_state"  # megatron's per-module FP8 metadata: not a weight

_ATTENTION = {  # HF name in a layer -> Megatron name in a TransformerLayer
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "self_attention.linear_kv_down_proj.weight",
    "self_attn.kv_a_layernorm.weight": "self_attention.kv_layernorm.weight",
    "self_attn.kv_b_proj.weight": "self_attention.linear_kv_up_proj.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
}
_Q_LORA = {
    "self_attn.q_a_proj.weight": "self_attention.linear_q_down_proj.weight",
    "self_attn.q_a_layernorm.weight": "self_attention.q_layernorm.weight",
    "self_attn.q_b_proj.weight": "self_attention.linear_q_up_proj.weight",
}
_Q_DIRECT = {"self_attn.q_proj.weight": "self_attention.linear_q_proj.weight"}
_ROUTER = {"mlp.gate.weight": "mlp.router.weight"}
_EXPERT_BIAS = {"mlp.gate.e_score_correction_bias": "mlp.router.expert_bias"}
_MTP = {  # HF name in the MTP layer -> Megatron name in mtp.layers.j
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "shared_head.norm.weight": "final_layernorm.weight",
}

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_MEGATRON_LAYER = re.compile(r"^(decoder|mtp)\.layers\.(\d+)\.")


def _swiglu(hf_prefix: str, megatron_prefix: str) -> Tuple[Dict[str, str], Dict[str, Tuple[str, str]]]:
    renames = {f"{hf_prefix}down_proj.weight": f"{megatron_prefix}linear_fc2.weight"}
    fused = {f"{megatron_prefix}linear_fc1.weight": (f"{hf_prefix}gate_proj.weight", f"{hf_prefix}up_proj.weight")}
    return renames, fused


def is_mtp_layer(layer_idx: int, cfg: DSv3ModelConfig) -> bool:
    last = cfg.num_layers + (cfg.mtp_num_layers or 0)
    if not 0 <= layer_idx < last:
        raise ValueError(f"HF layer index {layer_idx} is outside the model's {last} layers (incl. MTP)")
    return layer_idx >= cfg.num_layers


def megatron_layer_prefix(layer_idx: int, cfg: DSv3ModelConfig) -> str:
    """Megatron prefix of HF layer `layer_idx`'s transformer layer."""
    if is_mtp_layer(layer_idx, cfg):
        return f"mtp.layers.{layer_idx - cfg.num_layers}.transformer_layer."
    return f"decoder.layers.{layer_idx}."


def _layer_plan(layer_idx: int, cfg: DSv3ModelConfig):
    """(renames HF -> Megatron, fused Megatron fc1 -> (HF gate, HF up)) with full names."""
    mtp = is_mtp_layer(layer_idx, cfg)
    is_moe = cfg.num_experts is not None if mtp else bool(cfg.moe_layer_pattern[layer_idx])
    local = {**_ATTENTION, **(_Q_DIRECT if cfg.q_lora_rank is None else _Q_LORA)}
    fused = {}
    if is_moe:
        local.update(_ROUTER)
        if cfg.moe_router_enable_expert_bias:
            local.update(_EXPERT_BIAS)
        mlps = [(f"mlp.experts.{e}.", f"mlp.experts.local_experts.{e}.") for e in range(cfg.num_experts)]
        if cfg.moe_shared_expert_intermediate_size:
            mlps.append(("mlp.shared_experts.", "mlp.shared_experts."))
    else:
        mlps = [("mlp.", "mlp.")]
    for hf_mlp, megatron_mlp in mlps:
        renames, fc1 = _swiglu(hf_mlp, megatron_mlp)
        local.update(renames)
        fused.update(fc1)
    hf, megatron = f"model.layers.{layer_idx}.", megatron_layer_prefix(layer_idx, cfg)
    renames = {hf + h: megatron + m for h, m in local.items()}
    fused = {megatron + m: (hf + g, hf + u) for m, (g, u) in fused.items()}
    if mtp:
        mtp_prefix = f"mtp.layers.{layer_idx - cfg.num_layers}."
        renames.update({hf + h: mtp_prefix + m for h, m in _MTP.items()})
    return renames, fused


def mtp_copies(layer_idx: int, cfg: DSv3ModelConfig) -> Dict[str, str]:
    """HF MTP copy name -> the main HF tensor it duplicates (a tied head is the embedding)."""
    if not is_mtp_layer(layer_idx, cfg):
        return {}
    head = HF_HEAD if cfg.untie_embeddings_and_output_weights else HF_EMBEDDING
    prefix = f"model.layers.{layer_idx}."
    return {prefix + "embed_tokens.weight": HF_EMBEDDING, prefix + "shared_head.head.weight": head}


def _optional_zero_bias(layer_idx: int, cfg: DSv3ModelConfig) -> List[str]:
    """transformers' DeepseekV3 always stores the router bias; without expert bias it must be zero."""
    if cfg.moe_router_enable_expert_bias or cfg.num_experts is None:
        return []
    if not is_mtp_layer(layer_idx, cfg) and not cfg.moe_layer_pattern[layer_idx]:
        return []
    return [f"model.layers.{layer_idx}.mlp.gate.e_score_correction_bias"]


def _check_keys(given, expected, what: str, optional=()) -> None:
    unknown = sorted(set(given) - set(expected) - set(optional))
    missing = sorted(set(expected) - set(given))
    if unknown:
        raise KeyError(f"{what}: unknown tensor {unknown[0]!r} ({len(unknown)} unknown in all)")
    if missing:
        raise KeyError(f"{what}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")


def hf_to_megatron_layer_tensors(
    layer_idx: int, hf_tensors: Mapping[str, torch.Tensor], cfg: DSv3ModelConfig,
    main: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    """HF layer `layer_idx` (full HF names) -> Megatron tensors. For the MTP layer, `main` holds the
    HF embedding and head (HF names) that its copies must equal."""
    renames, fused = _layer_plan(layer_idx, cfg)
    copies = mtp_copies(layer_idx, cfg)
    optional = _optional_zero_bias(layer_idx, cfg)
    expected = [*renames, *(n for pair in fused.values() for n in pair), *copies]
    _check_keys(hf_tensors, expected, f"HF layer {layer_idx}", optional)
    for name in optional:
        if name in hf_tensors and torch.count_nonzero(hf_tensors[name]):
            raise ValueError(f"{name} is non-zero but the config has no expert bias (topk_method not noaux_tc)")
    for copy, original in copies.items():
        main_tensor = (main or {}).get(original)
        if main_tensor is None:
            raise KeyError(f"{copy}: pass the main {original!r} as `main` to verify the MTP copy")
        if not torch.equal(hf_tensors[copy], main_tensor):
            raise ValueError(f"{copy} differs from {original}: the MTP copy must equal the main tensor")
    out = {megatron: hf_tensors[hf] for hf, megatron in renames.items()}
    out.update({m: torch.cat([hf_tensors[g], hf_tensors[u]], dim=0) for m, (g, u) in fused.items()})
    return out


def megatron_to_hf_layer_tensors(
    layer_idx: int, megatron_tensors: Mapping[str, torch.Tensor], cfg: DSv3ModelConfig,
    main: Optional[Mapping[str, torch.Tensor]] = None,
) -> Dict[str, torch.Tensor]:
    """Megatron tensors of HF layer `layer_idx` -> HF tensors. For the MTP layer, `main` holds the
    Megatron embedding and output layer (Megatron names) that HF stores copies of."""
    renames, fused = _layer_plan(layer_idx, cfg)
    megatron_tensors = {k: v for k, v in megatron_tensors.items() if not k.endswith(EXTRA_STATE_SUFFIX)}
    _check_keys(megatron_tensors, [*renames.values(), *fused], f"Megatron layer for HF layer {layer_idx}")
    out = {hf: megatron_tensors[megatron] for hf, megatron in renames.items()}
    for megatron, (gate, up) in fused.items():
        out[gate], out[up] = torch.chunk(megatron_tensors[megatron], 2, dim=0)
    for name in _optional_zero_bias(layer_idx, cfg):
        out[name] = torch.zeros(cfg.num_experts, dtype=torch.float32)
    if is_mtp_layer(layer_idx, cfg):
        sources = {HF_EMBEDDING: MEGATRON_EMBEDDING, HF_HEAD: MEGATRON_HEAD}
        for copy, original in mtp_copies(layer_idx, cfg).items():
            if main is None or sources[original] not in main:
                raise KeyError(f"{copy}: pass the main {sources[original]!r} as `main` to write the MTP copy")
            out[copy] = main[sources[original]]
    return out


def hf_to_megatron_global_tensors(
    hf_tensors: Mapping[str, torch.Tensor], cfg: DSv3ModelConfig
) -> Dict[str, torch.Tensor]:
    """Embedding, final norm and output head (a tied head becomes a copy of the embedding)."""
    _check_keys(hf_tensors, global_hf_keys(cfg), "HF non-layer tensors")
    out = {MEGATRON_EMBEDDING: hf_tensors[HF_EMBEDDING], MEGATRON_FINAL_NORM: hf_tensors[HF_FINAL_NORM]}
    out[MEGATRON_HEAD] = hf_tensors[HF_HEAD if cfg.untie_embeddings_and_output_weights else HF_EMBEDDING]
    return out


def megatron_to_hf_global_tensors(
    megatron_tensors: Mapping[str, torch.Tensor], cfg: DSv3ModelConfig
) -> Dict[str, torch.Tensor]:
    names = [MEGATRON_EMBEDDING, MEGATRON_FINAL_NORM, MEGATRON_HEAD]
    _check_keys(megatron_tensors, names, "Megatron non-layer tensors")
    out = {HF_EMBEDDING: megatron_tensors[MEGATRON_EMBEDDING], HF_FINAL_NORM: megatron_tensors[MEGATRON_FINAL_NORM]}
    if cfg.untie_embeddings_and_output_weights:
        out[HF_HEAD] = megatron_tensors[MEGATRON_HEAD]
    elif not torch.equal(megatron_tensors[MEGATRON_HEAD], megatron_tensors[MEGATRON_EMBEDDING]):
        raise ValueError(f"tie_word_embeddings is set but {MEGATRON_HEAD} differs from {MEGATRON_EMBEDDING}")
    return out


def megatron_sources(layer_idx: Optional[int], cfg: DSv3ModelConfig) -> Dict[str, Tuple[str, ...]]:
    """Megatron name -> the HF tensors it is made of (gate and up for a fused fc1), for HF layer
    `layer_idx`, or for the non-layer tensors when it is None."""
    if layer_idx is None:
        head = HF_HEAD if cfg.untie_embeddings_and_output_weights else HF_EMBEDDING
        return {MEGATRON_EMBEDDING: (HF_EMBEDDING,), MEGATRON_FINAL_NORM: (HF_FINAL_NORM,), MEGATRON_HEAD: (head,)}
    renames, fused = _layer_plan(layer_idx, cfg)
    return {**{megatron: (hf,) for hf, megatron in renames.items()}, **fused}


def global_hf_keys(cfg: DSv3ModelConfig) -> List[str]:
    return [HF_EMBEDDING, HF_FINAL_NORM] + ([HF_HEAD] if cfg.untie_embeddings_and_output_weights else [])


def hf_layer_index(hf_name: str) -> Optional[int]:
    """HF layer index of a tensor name; None for the embedding, final norm and head."""
    match = _HF_LAYER.match(hf_name)
    return int(match.group(1)) if match else None


def megatron_layer_index(megatron_name: str, cfg: DSv3ModelConfig) -> Optional[int]:
    """The HF layer index a Megatron tensor belongs to; None for the non-layer tensors."""
    match = _MEGATRON_LAYER.match(megatron_name)
    if not match:
        return None
    index = int(match.group(2))
    return index + cfg.num_layers if match.group(1) == "mtp" else index


def is_fp8_weight(hf_name: str) -> bool:
    """The release stores every `*_proj*` linear weight inside a layer (incl. kv_a_proj_with_mqa) as block FP8."""
    module, _, param = hf_name.rpartition(".")
    return hf_layer_index(hf_name) is not None and param == "weight" and "_proj" in module.rpartition(".")[2]


def hf_layer_keys(layer_idx: int, cfg: DSv3ModelConfig, fp8: bool = False) -> List[str]:
    renames, fused = _layer_plan(layer_idx, cfg)
    keys = [*renames, *(n for pair in fused.values() for n in pair), *mtp_copies(layer_idx, cfg)]
    keys += [k + SCALE_INV_SUFFIX for k in keys if fp8 and is_fp8_weight(k)]
    return sorted(keys)


def expected_hf_keys(cfg: DSv3ModelConfig, fp8: bool = False) -> List[str]:
    """Every tensor name a HF checkpoint of `cfg` holds (optional zero router biases excluded)."""
    layers = range(cfg.num_layers + (cfg.mtp_num_layers or 0))
    return global_hf_keys(cfg) + [k for i in layers for k in hf_layer_keys(i, cfg, fp8)]


def optional_hf_keys(cfg: DSv3ModelConfig) -> List[str]:
    """Names a checkpoint may hold beyond expected_hf_keys: all-zero router biases without expert bias."""
    return [k for i in range(cfg.num_layers + (cfg.mtp_num_layers or 0)) for k in _optional_zero_bias(i, cfg)]
