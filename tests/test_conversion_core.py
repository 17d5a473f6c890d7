"""Checkpoint conversion core: HF config <-> preset, HF <-> Megatron names, block FP8, safetensors I/O.

References: tiny random transformers.DeepseekV3ForCausalLM checkpoints (save_pretrained, sharded), the
official DeepSeek-V3 config.json values, a Megatron GPTModel built from the converted config, and
FP8 scales expanded with repeat_interleave.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from megatron_dsv3.conversion.fp8_blocks import dequantize_fp8_block, quantize_fp8_block
from megatron_dsv3.conversion.hf_config import hf_config_to_model_config, model_config_to_hf_config
from megatron_dsv3.conversion.name_mapping import (
    expected_hf_keys,
    hf_to_megatron_global_tensors,
    hf_to_megatron_layer_tensors,
    megatron_layer_index,
    megatron_to_hf_global_tensors,
    megatron_to_hf_layer_tensors,
    optional_hf_keys,
)
from megatron_dsv3.conversion.safetensors_io import HFCheckpointReader, ShardedCheckpointWriter
from megatron_dsv3.models.presets import get_preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0}
COMMON = dict(vocab_size=128, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
              n_routed_experts=8, kv_lora_rank=40, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16,
              num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=256)
V3_STYLE = dict(COMMON, hidden_size=96, moe_intermediate_size=48, n_shared_experts=1, q_lora_rank=56, n_group=4,
                topk_group=2, num_nextn_predict_layers=1,
                rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=1.0))
V2_LITE_STYLE = dict(COMMON, hidden_size=64, moe_intermediate_size=32, n_shared_experts=2, q_lora_rank=None,
                     n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0,
                     num_nextn_predict_layers=0, scoring_func="softmax", topk_method="greedy",
                     rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707))
NOT_IN_HF = ("moe_router_bias_update_rate", "moe_aux_loss_coeff", "mtp_loss_scaling_factor")
FP8_BLOCK = (32, 32)


def _save_hf(kwargs, path):
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**kwargs))
    with torch.no_grad():  # the router bias is zero-initialized: make the round trip see real values
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias") and kwargs.get("topk_method", "noaux_tc") == "noaux_tc":
                buffer.normal_()
    model.save_pretrained(path, max_shard_size="40KB")
    return path


def _add_mtp_layer(path):
    """A fake MTP layer (index num_hidden_layers) in its own shard, shaped like the last MoE layer."""
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    config = json.loads((path / "config.json").read_text())
    last, mtp = config["num_hidden_layers"] - 1, config["num_hidden_layers"]
    hidden = config["hidden_size"]
    source = HFCheckpointReader(path)
    layer = source.read([k for k in source.keys() if k.startswith(f"model.layers.{last}.")])
    tensors = {k.replace(f".{last}.", f".{mtp}.", 1): torch.randn_like(v) for k, v in layer.items()}
    main = source.read(["model.embed_tokens.weight", "lm_head.weight"])
    prefix = f"model.layers.{mtp}."
    tensors.update({
        prefix + "enorm.weight": torch.randn(hidden), prefix + "hnorm.weight": torch.randn(hidden),
        prefix + "eh_proj.weight": torch.randn(hidden, 2 * hidden),
        prefix + "shared_head.norm.weight": torch.randn(hidden),
        prefix + "embed_tokens.weight": main["model.embed_tokens.weight"].clone(),
        prefix + "shared_head.head.weight": main["lm_head.weight"].clone(),
    })
    save_file(tensors, path / "model-mtp.safetensors")
    index["weight_map"].update({k: "model-mtp.safetensors" for k in tensors})
    index_file.write_text(json.dumps(index))


@pytest.fixture(scope="module")
def v3_ckpt(tmp_path_factory):
    path = _save_hf(V3_STYLE, tmp_path_factory.mktemp("v3"))
    _add_mtp_layer(path)
    return path


@pytest.fixture(scope="module")
def v2_ckpt(tmp_path_factory):
    return _save_hf(V2_LITE_STYLE, tmp_path_factory.mktemp("v2lite"))


def _config(path):
    return json.loads((path / "config.json").read_text())


def _hf_to_megatron(reader, cfg):
    """Whole checkpoint HF -> Megatron, streamed layer by layer as a converter does."""
    megatron, main = {}, None
    for layer, tensors in reader.layer_groups():
        if layer is None:
            main = tensors
            megatron.update(hf_to_megatron_global_tensors(tensors, cfg))
        else:
            megatron.update(hf_to_megatron_layer_tensors(layer, tensors, cfg, main=main))
    return megatron


def _megatron_to_hf(megatron, cfg):
    by_layer = {}
    for name, tensor in megatron.items():
        by_layer.setdefault(megatron_layer_index(name, cfg), {})[name] = tensor
    hf = megatron_to_hf_global_tensors(by_layer.pop(None), cfg)
    for layer, tensors in sorted(by_layer.items()):
        hf.update(megatron_to_hf_layer_tensors(layer, tensors, cfg, main=megatron))
    return hf


def _all_hf_tensors(path):
    reader = HFCheckpointReader(path)
    return reader.read(reader.keys())


# ---------------------------------------------------------------- config


_OFFICIAL_V3 = {  # config.json of the DeepSeek-V3 release (official spellings)
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu",
    "max_position_embeddings": 163840, "initializer_range": 0.02, "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


_OFFICIAL_V2_LITE = {  # config.json of DeepSeek-V2-Lite
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
    "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    "num_experts_per_tok": 6, "moe_layer_freq": 1, "first_k_dense_replace": 1, "norm_topk_prob": False,
    "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True, "hidden_act": "silu",
    "max_position_embeddings": 163840, "initializer_range": 0.02, "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False, "rope_theta": 10000, "attention_bias": False,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
}


def _strip_non_hf(cfg):
    return cfg.replace(**{f: None for f in NOT_IN_HF})


@pytest.mark.parametrize("official, preset", [(_OFFICIAL_V3, "deepseek-v3"), (_OFFICIAL_V2_LITE, "deepseek-v2-lite")])
def test_official_config_reads_as_the_preset(official, preset):
    ours = hf_config_to_model_config(official)
    assert _strip_non_hf(ours) == _strip_non_hf(get_preset(preset).replace(init_method_std=0.02))
    transformers_spelling = {k: v for k, v in official.items() if k != "qk_nope_head_dim"}
    assert hf_config_to_model_config({**transformers_spelling, "qk_head_dim": 192}).qk_head_dim == 128


@pytest.mark.parametrize("preset", ["deepseek-v3", "deepseek-v2-lite", "tiny", "tiny-v2-lite"])
def test_preset_round_trips_through_hf_config(preset):
    cfg = get_preset(preset)
    hf = model_config_to_hf_config(cfg)
    assert _strip_non_hf(hf_config_to_model_config(hf)) == _strip_non_hf(cfg)
    loaded = DeepseekV3Config(**hf)  # transformers accepts what we write
    assert loaded.first_k_dense_replace == cfg.moe_layer_pattern.index(1)
    assert loaded.rope_parameters["rope_type"] == "yarn"
    assert loaded.rope_parameters["factor"] == cfg.rotary_scaling_factor
    assert loaded.qk_head_dim == cfg.qk_head_dim + cfg.qk_pos_emb_head_dim


@pytest.mark.parametrize("style", [V3_STYLE, V2_LITE_STYLE], ids=["v3", "v2-lite"])
def test_transformers_config_round_trip(style, tmp_path):
    DeepseekV3Config(**style).save_pretrained(tmp_path)  # transformers-5 spellings (rope_parameters, ...)
    written = _config(tmp_path)
    ours = hf_config_to_model_config(written)
    assert ours.moe_layer_pattern == [0, 1, 1]
    assert ours.moe_shared_expert_intermediate_size == style["n_shared_experts"] * style["moe_intermediate_size"]
    assert ours.q_lora_rank == style["q_lora_rank"]
    assert ours.moe_router_enable_expert_bias == (style.get("topk_method", "noaux_tc") == "noaux_tc")
    assert ours.moe_router_num_groups == (style["n_group"] if style["n_group"] > 1 else None)
    back = DeepseekV3Config(**model_config_to_hf_config(ours))
    original = DeepseekV3Config(**style)
    for key in ["vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
                "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group",
                "topk_group", "num_experts_per_tok", "first_k_dense_replace", "norm_topk_prob", "hidden_act",
                "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "num_nextn_predict_layers",
                "qk_head_dim", "head_dim"]:
        assert getattr(back, key) == getattr(original, key), key
    for key in ["rope_type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                "mscale", "mscale_all_dim"]:
        assert back.rope_parameters[key] == original.rope_parameters[key], key
    for key in ["scoring_func", "topk_method"]:
        if key in style:
            assert getattr(back, key) == style[key]


@pytest.mark.parametrize("change, flag", [
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"moe_layer_freq": 2}, "moe_layer_freq"),
    ({"topk_method": "group_limited_greedy"}, "group_limited_greedy"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope type"),
    ({"qk_nope_head_dim": None, "hidden_size": None}, "lacks"),
])
def test_unsupported_hf_configs_are_rejected(change, flag):
    with pytest.raises(ValueError, match=flag):
        hf_config_to_model_config({**_OFFICIAL_V3, **change})


def test_unexpressible_moe_pattern_is_rejected():
    cfg = get_preset("tiny").replace(moe_layer_freq=[0, 1, 0, 1])
    with pytest.raises(ValueError, match="first_k_dense_replace"):
        model_config_to_hf_config(cfg)


# ---------------------------------------------------------------- names and tensors


@pytest.mark.parametrize("ckpt", ["v3_ckpt", "v2_ckpt"])
def test_hf_megatron_hf_is_bit_identical(ckpt, request):
    path = request.getfixturevalue(ckpt)
    cfg = hf_config_to_model_config(_config(path))
    original = _all_hf_tensors(path)
    assert set(original) == set(expected_hf_keys(cfg)) | (set(optional_hf_keys(cfg)) & set(original))
    megatron = _hf_to_megatron(HFCheckpointReader(path), cfg)
    back = _megatron_to_hf(megatron, cfg)
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_megatron_tensors_are_the_swiglu_fusions_and_mtp(v3_ckpt):
    cfg = hf_config_to_model_config(_config(v3_ckpt))
    hf = _all_hf_tensors(v3_ckpt)
    megatron = _hf_to_megatron(HFCheckpointReader(v3_ckpt), cfg)
    fc1 = megatron["decoder.layers.2.mlp.experts.local_experts.5.linear_fc1.weight"]
    assert torch.equal(fc1[:48], hf["model.layers.2.mlp.experts.5.gate_proj.weight"])
    assert torch.equal(fc1[48:], hf["model.layers.2.mlp.experts.5.up_proj.weight"])
    dense_fc1 = megatron["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(dense_fc1[160:], hf["model.layers.0.mlp.up_proj.weight"])
    bias = hf["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.count_nonzero() and torch.equal(megatron["decoder.layers.1.mlp.router.expert_bias"], bias)
    assert torch.equal(megatron["mtp.layers.0.eh_proj.weight"], hf["model.layers.3.eh_proj.weight"])
    assert torch.equal(megatron["mtp.layers.0.final_layernorm.weight"], hf["model.layers.3.shared_head.norm.weight"])
    assert torch.equal(megatron["mtp.layers.0.transformer_layer.self_attention.linear_kv_down_proj.weight"],
                       hf["model.layers.3.self_attn.kv_a_proj_with_mqa.weight"])
    shared_fc1 = megatron["mtp.layers.0.transformer_layer.mlp.shared_experts.linear_fc1.weight"]
    assert torch.equal(shared_fc1[:48], hf["model.layers.3.mlp.shared_experts.gate_proj.weight"])
    assert not any(".layers.3." in name for name in megatron)


_MEGATRON_NAMES_SCRIPT = """
import dataclasses, json, os, sys, tempfile
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron_dsv3.platform import enable_cpu_execution
from megatron_dsv3.models.presets import DSv3ModelConfig
from megatron_dsv3.models.transformer_config import build_transformer_config
from megatron_dsv3.models.gpt_builder import build_model
enable_cpu_execution()
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
parallel_state.initialize_model_parallel()
model_parallel_cuda_manual_seed(0)
cfg = DSv3ModelConfig(**json.loads(sys.argv[1]))
model = build_model(build_transformer_config(cfg), cfg.vocab_size, 64)
print("NAMES=" + json.dumps({k: list(v.shape) for k, v in model.state_dict().items() if "_extra_state" not in k}))
"""


@pytest.mark.parametrize("ckpt", ["v3_ckpt", "v2_ckpt"])
def test_megatron_names_and_shapes_match_the_built_model(ckpt, request):
    path = request.getfixturevalue(ckpt)
    cfg = hf_config_to_model_config(_config(path))
    megatron = _hf_to_megatron(HFCheckpointReader(path), cfg)
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    result = subprocess.run([sys.executable, "-c", _MEGATRON_NAMES_SCRIPT, json.dumps(dataclasses.asdict(cfg))],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    built = json.loads(result.stdout.split("NAMES=", 1)[1])
    assert {k: list(v.shape) for k, v in megatron.items()} == built


def test_mtp_copy_must_equal_main_tensor(v3_ckpt):
    cfg = hf_config_to_model_config(_config(v3_ckpt))
    reader = HFCheckpointReader(v3_ckpt)
    main = reader.read(["model.embed_tokens.weight", "lm_head.weight"])
    mtp = reader.read([k for k in reader.keys() if k.startswith("model.layers.3.")])
    mtp["model.layers.3.shared_head.head.weight"] = mtp["model.layers.3.shared_head.head.weight"] + 1
    with pytest.raises(ValueError, match="model.layers.3.shared_head.head.weight"):
        hf_to_megatron_layer_tensors(3, mtp, cfg, main=main)


def test_unknown_and_missing_keys_are_named(v3_ckpt):
    cfg = hf_config_to_model_config(_config(v3_ckpt))
    reader = HFCheckpointReader(v3_ckpt)
    layer = reader.read([k for k in reader.keys() if k.startswith("model.layers.1.")])
    with pytest.raises(KeyError, match="model.layers.1.mlp.foo.weight"):
        hf_to_megatron_layer_tensors(1, {**layer, "model.layers.1.mlp.foo.weight": torch.zeros(1)}, cfg)
    del layer["model.layers.1.mlp.experts.7.up_proj.weight"]
    with pytest.raises(KeyError, match="model.layers.1.mlp.experts.7.up_proj.weight"):
        hf_to_megatron_layer_tensors(1, layer, cfg)
    main = reader.read(["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"])
    with pytest.raises(KeyError, match="model.extra.weight"):
        hf_to_megatron_global_tensors({**main, "model.extra.weight": torch.zeros(1)}, cfg)


def test_nonzero_router_bias_without_expert_bias_is_rejected(v2_ckpt):
    cfg = hf_config_to_model_config(_config(v2_ckpt))
    reader = HFCheckpointReader(v2_ckpt)
    layer = reader.read([k for k in reader.keys() if k.startswith("model.layers.1.")])
    layer["model.layers.1.mlp.gate.e_score_correction_bias"] = torch.ones(8)
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        hf_to_megatron_layer_tensors(1, layer, cfg)


# ---------------------------------------------------------------- FP8


def _expand_scale(scale_inv, shape, block):
    return scale_inv.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[: shape[0], : shape[1]]


def test_fp8_blocks_with_partial_edge_blocks():
    torch.manual_seed(0)
    weight = torch.randn(576, 200) * torch.logspace(-3, 1, 576)[:, None]  # rows 512..575 and cols 128..199: partial
    weight[:128, 128:] = 0  # an all-zero block
    fp8, scale_inv = quantize_fp8_block(weight)
    assert fp8.dtype == torch.float8_e4m3fn and scale_inv.shape == (5, 2) and scale_inv.dtype == torch.float32
    for i in range(5):
        for j in range(2):
            block = weight[128 * i: 128 * (i + 1), 128 * j: 128 * (j + 1)]
            expected = block.abs().max() / 448 if block.abs().max() > 0 else torch.tensor(1.0)
            assert torch.allclose(scale_inv[i, j], expected, rtol=1e-6), (i, j)
    dequantized = dequantize_fp8_block(fp8, scale_inv)
    assert torch.equal(dequantized, fp8.float() * _expand_scale(scale_inv, weight.shape, (128, 128)))
    assert not dequantized.isnan().any() and torch.equal(dequantized[:128, 128:], torch.zeros(128, 72))
    scale = _expand_scale(scale_inv, weight.shape, (128, 128))
    assert ((dequantized - weight).abs() <= weight.abs() / 16 + scale * 2**-9 + 1e-30).all()  # E4M3: 3 mantissa bits
    with pytest.raises(ValueError, match="scale_inv has shape"):
        dequantize_fp8_block(fp8, scale_inv[:4])


def _make_fp8_checkpoint(src, dst):
    """The release's format: each layer `*_proj` weight as E4M3 + `weight_scale_inv`, one file, no index."""
    tensors = _all_hf_tensors(src)
    out = {}
    for name, tensor in tensors.items():
        if name.startswith("model.layers.") and name.endswith(".weight") and "_proj" in name.split(".")[-2]:
            out[name], out[name + "_scale_inv"] = quantize_fp8_block(tensor, FP8_BLOCK)
        else:
            out[name] = tensor
    dst.mkdir()
    save_file(out, dst / "model.safetensors")
    config = _config(src)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(FP8_BLOCK)}
    (dst / "config.json").write_text(json.dumps(config))
    return out


def test_fp8_checkpoint_is_dequantized_while_streaming(v3_ckpt, tmp_path):
    stored = _make_fp8_checkpoint(v3_ckpt, tmp_path / "fp8")
    cfg = hf_config_to_model_config(_config(tmp_path / "fp8"))
    assert set(stored) == set(expected_hf_keys(cfg, fp8=True))
    reader = HFCheckpointReader(tmp_path / "fp8")
    seen = 0
    for _, tensors in reader.layer_groups():
        for name, tensor in tensors.items():
            if name + "_scale_inv" in stored:
                fp8, scale = stored[name], stored[name + "_scale_inv"]
                assert torch.equal(tensor, fp8.float() * _expand_scale(scale, fp8.shape, FP8_BLOCK)), name
                seen += 1
            else:
                assert torch.equal(tensor, stored[name]), name
    assert seen == sum(k.endswith("_scale_inv") for k in stored)
    kv_a = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"  # 48 rows: a partial 16-row edge block
    assert stored[kv_a + "_scale_inv"].shape == (2, 3)
    raw = HFCheckpointReader(tmp_path / "fp8", keep_fp8=True).read([kv_a, kv_a + "_scale_inv"])
    assert raw[kv_a].dtype == torch.float8_e4m3fn and torch.equal(raw[kv_a + "_scale_inv"], stored[kv_a + "_scale_inv"])


# ---------------------------------------------------------------- safetensors I/O


def test_missing_and_truncated_shards_are_named(v2_ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(v2_ckpt, broken)
    shards = sorted(p.name for p in v2_ckpt.glob("model-*.safetensors"))
    victim = shards[len(shards) // 2]
    (broken / victim).unlink()
    with pytest.raises(FileNotFoundError, match=victim):
        HFCheckpointReader(broken)
    shutil.copy(v2_ckpt / victim, broken / victim)
    with open(broken / victim, "r+b") as f:
        f.truncate((broken / victim).stat().st_size - 7)
    with pytest.raises(ValueError, match=f"{victim} is truncated"):
        HFCheckpointReader(broken)


def test_writer_shards_and_reloads_in_transformers(v2_ckpt, tmp_path):
    cfg = hf_config_to_model_config(_config(v2_ckpt))
    hf = _megatron_to_hf(_hf_to_megatron(HFCheckpointReader(v2_ckpt), cfg), cfg)
    out = tmp_path / "out"
    with ShardedCheckpointWriter(out, max_shard_bytes=64 * 1024) as writer:
        for name, tensor in hf.items():
            writer.add(name, tensor)
        writer.add_file("config.json", json.dumps(model_config_to_hf_config(cfg, "float32")))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    for shard in shards:
        tensors = load_file(out / shard)
        assert len(tensors) == 1 or sum(t.numel() * t.element_size() for t in tensors.values()) <= 64 * 1024
    assert not list(tmp_path.glob(".out.partial-*"))
    reloaded = DeepseekV3ForCausalLM.from_pretrained(out).state_dict()
    original = DeepseekV3ForCausalLM.from_pretrained(v2_ckpt).state_dict()
    assert set(reloaded) == set(original)
    for name in original:
        assert torch.equal(reloaded[name], original[name]), name


def test_writer_failure_leaves_no_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedCheckpointWriter(out, max_shard_bytes=16) as writer:
            writer.add("a", torch.zeros(8))
            writer.add("b", torch.zeros(8))  # a second shard is already on disk
            raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(KeyError, match="'a' written twice"):
        with ShardedCheckpointWriter(out) as writer:
            writer.add("a", torch.zeros(8))
            writer.add("a", torch.zeros(8))
    assert list(tmp_path.iterdir()) == []


def test_tied_head_is_the_embedding():
    cfg = get_preset("tiny").replace(untie_embeddings_and_output_weights=False)
    embedding, norm = torch.randn(256, 64), torch.randn(64)
    megatron = hf_to_megatron_global_tensors({"model.embed_tokens.weight": embedding, "model.norm.weight": norm}, cfg)
    assert megatron["output_layer.weight"] is embedding
    assert set(megatron_to_hf_global_tensors(megatron, cfg)) == {"model.embed_tokens.weight", "model.norm.weight"}
    with pytest.raises(ValueError, match="output_layer.weight differs"):
        megatron_to_hf_global_tensors({**megatron, "output_layer.weight": embedding + 1}, cfg)
