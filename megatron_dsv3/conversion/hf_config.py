"""Hugging Face DeepSeek-V3/V2 config.json <-> DSv3ModelConfig.

Reads both the official release keys (`rope_scaling`, `rope_theta`, `num_nextn_predict_layers`) and
the spellings transformers 5.x writes (`rope_parameters`, `qk_head_dim`, `num_mtp_layers`).
Writes the official keys, which `transformers.DeepseekV3Config` loads.
"""

from typing import Optional, Tuple

from megatron_dsv3.models.presets import DSv3ModelConfig

_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
_TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")  # noaux_tc: aux-loss-free expert bias (V3)
_REQUIRED = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
             "max_position_embeddings", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim")
_DEFAULTS = {  # what transformers assumes when config.json omits the key
    "deepseek_v3": {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True},
    "deepseek_v2": {"scoring_func": "softmax", "topk_method": "greedy", "norm_topk_prob": False},
}


def _rope(hf: dict) -> Tuple[dict, float]:
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = float(hf.get("rope_theta", rope.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise ValueError(f"config.json rope type {kind!r} is not supported: DeepSeek models use 'yarn' (or none)")
    return (rope if kind == "yarn" else {}), theta


def _moe_layer_freq(hf: dict, num_layers: int):
    first_k = hf.get("first_k_dense_replace") or 0
    if hf.get("moe_layer_freq", 1) != 1:
        raise ValueError(
            f"config.json moe_layer_freq={hf['moe_layer_freq']}: only first_k_dense_replace dense layers "
            "followed by all-MoE layers (moe_layer_freq 1) are supported"
        )
    return [0] * first_k + [1] * (num_layers - first_k)


def hf_config_to_model_config(hf: dict) -> DSv3ModelConfig:
    model_type = hf.get("model_type", "deepseek_v3")
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"config.json model_type {model_type!r} is not one of {_MODEL_TYPES}")
    missing = [k for k in (*_REQUIRED, "qk_nope_head_dim") if hf.get(k) is None]
    if hf.get("qk_head_dim") is not None and missing[-1:] == ["qk_nope_head_dim"]:
        missing.pop()  # transformers' spelling: qk_head_dim = nope + rope
    if missing:
        raise ValueError(f"config.json lacks {missing}: not a DeepSeek-V2/V3 config")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias", False):
        raise ValueError("config.json: only hidden_act 'silu' without attention_bias is supported")
    defaults = _DEFAULTS[model_type]
    scoring = hf.get("scoring_func") or defaults["scoring_func"]
    if scoring not in ("sigmoid", "softmax"):
        raise ValueError(f"config.json scoring_func {scoring!r} is not supported: use 'sigmoid' or 'softmax'")
    topk_method = hf.get("topk_method") or defaults["topk_method"]
    if topk_method not in _TOPK_METHODS:
        raise ValueError(f"config.json topk_method {topk_method!r} is not one of {_TOPK_METHODS}")
    num_groups = hf.get("n_group") if (hf.get("n_group") or 1) > 1 else None
    if num_groups and topk_method != "noaux_tc":
        raise ValueError(
            f"config.json n_group={num_groups} with topk_method {topk_method!r} is not supported: the router ranks "
            "groups by the sum of their top-2 expert scores, as topk_method 'noaux_tc' does"
        )

    rope, theta = _rope(hf)
    num_layers = hf["num_hidden_layers"]
    rope_nope = hf.get("qk_nope_head_dim") or hf["qk_head_dim"] - hf["qk_rope_head_dim"]
    num_experts = hf.get("n_routed_experts")
    moe_ffn = hf.get("moe_intermediate_size") if num_experts else None
    shared = hf.get("n_shared_experts") or 0
    mtp = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or None
    return DSv3ModelConfig(
        num_layers=num_layers,
        hidden_size=hf["hidden_size"],
        num_attention_heads=hf["num_attention_heads"],
        ffn_hidden_size=hf["intermediate_size"],
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        init_method_std=float(hf.get("initializer_range", 0.006)),
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"],
        qk_head_dim=rope_nope,
        qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        rotary_base=theta,
        rotary_scaling_factor=float(rope.get("factor", 1.0)),
        original_max_position_embeddings=int(
            rope.get("original_max_position_embeddings", hf["max_position_embeddings"])
        ),
        beta_fast=float(rope.get("beta_fast", 32.0)),
        beta_slow=float(rope.get("beta_slow", 1.0)),
        mscale=float(rope.get("mscale", 1.0)),
        mscale_all_dim=float(rope.get("mscale_all_dim", 0.0 if rope else 1.0)),
        moe_layer_freq=_moe_layer_freq(hf, num_layers),
        num_experts=num_experts,
        moe_ffn_hidden_size=moe_ffn,
        moe_shared_expert_intermediate_size=shared * moe_ffn if (shared and moe_ffn) else None,
        moe_router_topk=hf.get("num_experts_per_tok", 8),
        moe_router_score_function=scoring,
        moe_router_num_groups=num_groups,
        moe_router_group_topk=hf.get("topk_group") if num_groups else None,
        moe_router_topk_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        moe_router_norm_topk_prob=bool(hf.get("norm_topk_prob", defaults["norm_topk_prob"])),
        moe_router_enable_expert_bias=topk_method == "noaux_tc",
        mtp_num_layers=mtp,
    )


def _first_k_dense_replace(cfg: DSv3ModelConfig) -> int:
    pattern = cfg.moe_layer_pattern
    first_k = pattern.index(1) if 1 in pattern else len(pattern)
    if pattern != [0] * first_k + [1] * (len(pattern) - first_k):
        raise ValueError(
            f"--moe-layer-freq {pattern} cannot be written as a Hugging Face config: only k dense layers "
            "followed by MoE layers (first_k_dense_replace) are expressible"
        )
    return first_k


def model_config_to_hf_config(cfg: DSv3ModelConfig, torch_dtype: str = "bfloat16") -> dict:
    if cfg.num_experts is None:
        raise ValueError("--num-experts is None: the DeepseekV3 Hugging Face format needs MoE layers")
    if cfg.moe_router_num_groups and not cfg.moe_router_enable_expert_bias:
        raise ValueError("expert groups without the expert bias have no Hugging Face DeepseekV3 equivalent")
    shared = cfg.moe_shared_expert_intermediate_size or 0
    if shared % cfg.moe_ffn_hidden_size:
        raise ValueError(
            f"--moe-shared-expert-intermediate-size {shared} is not a multiple of --moe-ffn-hidden-size "
            f"{cfg.moe_ffn_hidden_size}: HF counts shared experts (n_shared_experts)"
        )
    if cfg.rotary_scaling_factor == 1.0:
        rope_scaling = None
    else:
        rope_scaling = {
            "type": "yarn",
            "factor": cfg.rotary_scaling_factor,
            "original_max_position_embeddings": cfg.original_max_position_embeddings,
            "beta_fast": cfg.beta_fast,
            "beta_slow": cfg.beta_slow,
            "mscale": cfg.mscale,
            "mscale_all_dim": cfg.mscale_all_dim,
        }
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "moe_intermediate_size": cfg.moe_ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_nextn_predict_layers": cfg.mtp_num_layers or 0,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_attention_heads,
        "n_shared_experts": shared // cfg.moe_ffn_hidden_size,
        "n_routed_experts": cfg.num_experts,
        "routed_scaling_factor": cfg.moe_router_topk_scaling_factor or 1.0,
        "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank,
        "qk_rope_head_dim": cfg.qk_pos_emb_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "qk_nope_head_dim": cfg.qk_head_dim,
        "topk_method": "noaux_tc" if cfg.moe_router_enable_expert_bias else "greedy",
        "n_group": cfg.moe_router_num_groups or 1,
        "topk_group": cfg.moe_router_group_topk or 1,
        "num_experts_per_tok": cfg.moe_router_topk,
        "moe_layer_freq": 1,
        "first_k_dense_replace": _first_k_dense_replace(cfg),
        "norm_topk_prob": cfg.moe_router_norm_topk_prob,
        "scoring_func": cfg.moe_router_score_function,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.init_method_std,
        "rms_norm_eps": cfg.norm_epsilon,
        "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
        "rope_theta": cfg.rotary_base,
        "rope_scaling": rope_scaling,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": torch_dtype,
    }


def hf_fp8_block_size(hf: dict) -> Optional[Tuple[int, int]]:
    """(b0, b1) of a block-FP8 checkpoint's `quantization_config`; None for an unquantized one."""
    quant = hf.get("quantization_config")
    if not quant:
        return None
    if quant.get("quant_method") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"config.json quantization_config {quant} is not supported: only block fp8 e4m3")
    block = quant.get("weight_block_size")
    if not block or len(block) != 2:
        raise ValueError(f"config.json quantization_config needs weight_block_size [rows, cols], got {block}")
    return tuple(block)
