"""tools/convert_checkpoint.py: HF DeepSeek-V3 <-> Megatron torch_dist, checked against transformers.

References: tiny random transformers.DeepseekV3ForCausalLM checkpoints (several shards, dims that are
not multiples of 128, first-k dense layers, group-limited routing with topk != 2 x topk_group) whose
logits the converted Megatron model must reproduce in one process and at PP=2 x EP=2; a checkpoint
written by pretrain_dsv3.py that must survive Megatron -> HF -> Megatron bit for bit (MTP included);
FP8 weights expanded with repeat_interleave of their block scales.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import REPO, hf_tensors_as_stored, torchrun
from test_conversion_core import (
    FP8_BLOCK,
    V2_LITE_STYLE,
    V3_STYLE,
    _add_mtp_layer,
    _all_hf_tensors,
    _expand_scale,
    _make_fp8_checkpoint,
    _save_hf,
)

from megatron_dsv3.conversion.convert import hf_to_mcore, mcore_to_hf, resolve_checkpoint
from megatron_dsv3.conversion.dist_ckpt_io import DistCheckpointReader
from megatron_dsv3.conversion.verify import hf_logits

TOOL = os.path.join(REPO, "tools", "convert_checkpoint.py")
# transformers' DeepseekV3 always routes with sigmoid scores + the correction bias: V2-Lite's shape
# (no q low-rank, 2 shared experts, no groups, no top-k normalization) with V3's router.
V2_LITE_SIGMOID = dict(V2_LITE_STYLE, scoring_func="sigmoid", topk_method="noaux_tc")
MODEL_KEYS = ("embedding.", "decoder.", "mtp.", "output_layer.")


def _tool(*args, expect_exit=0):
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, TOOL, *map(str, args), "--no-progress"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == expect_exit, output[-4000:]
    return output


def _verified_diff(output):
    match = re.search(r"max abs logit diff (\S+), max rel diff (\S+)", output)
    assert match, output[-2000:]
    return float(match.group(1))


def _megatron_tensors(root):
    reader = DistCheckpointReader(resolve_checkpoint(root))
    return reader.read([k for k in reader.tensors if k.startswith(MODEL_KEYS)])


def _no_partial_output(parent, name):
    return not (parent / name).exists() and not list(parent.glob(f".{name}.partial-*"))


@pytest.fixture(scope="module")
def v3_hf(tmp_path_factory):
    path = _save_hf(V3_STYLE, tmp_path_factory.mktemp("v3") / "hf")
    _add_mtp_layer(path)  # transformers drops MTP: the release's layer num_layers, added by hand
    return path


@pytest.fixture(scope="module")
def v3_mcore(v3_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("v3mc") / "ckpt"
    output = _tool("hf-to-mcore", "--hf-dir", v3_hf, "--output", out, "--verify", "--verify-tolerance", "1e-4")
    return out, output


def test_v3_style_logits_match_transformers(v3_hf, v3_mcore):
    out, output = v3_mcore
    assert len(list(v3_hf.glob("model-*.safetensors"))) > 3
    assert _verified_diff(output) <= 1e-4
    assert "peak RSS" in output and "--moe-router-group-topk 2" in output
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "0"
    tensors = _megatron_tensors(out)
    hf = _all_hf_tensors(v3_hf)
    assert torch.equal(tensors["decoder.layers.1.mlp.router.expert_bias"],
                       hf["model.layers.1.mlp.gate.e_score_correction_bias"])
    assert torch.equal(tensors["mtp.layers.0.eh_proj.weight"], hf["model.layers.3.eh_proj.weight"])
    experts = tensors["decoder.layers.2.mlp.experts.experts.linear_fc1.weight"]
    gate, up = hf["model.layers.2.mlp.experts.5.gate_proj.weight"], hf["model.layers.2.mlp.experts.5.up_proj.weight"]
    assert torch.equal(experts[5], torch.cat([gate, up]))


def test_v2_lite_style_logits_match_transformers(tmp_path):
    hf = _save_hf(V2_LITE_SIGMOID, tmp_path / "hf")
    output = _tool("hf-to-mcore", "--hf-dir", hf, "--output", tmp_path / "ckpt", "--verify",
                   "--verify-tolerance", "1e-4")
    assert _verified_diff(output) <= 1e-4


def test_converted_checkpoint_loads_at_pp2_ep2(v3_hf, v3_mcore, tmp_path):
    out, output = v3_mcore
    flags = output.split("--no-load-optim", 1)[1].splitlines()[0].split()
    tokens = torch.randint(0, V3_STYLE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))
    torch.save(tokens, tmp_path / "tokens.pt")
    torchrun(4, "tests/scripts/converted_logits.py", tmp_path / "tokens.pt", tmp_path / "logits.pt", *flags,
             "--load", out, "--pipeline-model-parallel-size", 2, "--expert-model-parallel-size", 2,
             "--decoder-first-pipeline-num-layers", 1, "--decoder-last-pipeline-num-layers", 2,
             "--global-batch-size", 4)
    diff = (torch.load(tmp_path / "logits.pt") - hf_logits(v3_hf, tokens)).abs().max().item()
    assert diff <= 1e-4


def test_trained_checkpoint_round_trips_bit_identically(tmp_path):
    """pretrain_dsv3.py's own checkpoint (tiny preset: MTP, groups, expert bias after a step) -> HF -> Megatron."""
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, os.path.join(REPO, "pretrain_dsv3.py"), "--train-iters", "1",
                    "--global-batch-size", "2", "--micro-batch-size", "2", "--seq-length", "16",
                    "--save", tmp_path / "trained"], cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    tokenizer = _word_tokenizer(tmp_path / "tokenizer.json", 200)  # a bare tokenizer.json: no eos_token declared
    output = _tool("mcore-to-hf", "--load", tmp_path / "trained", "--output", tmp_path / "hf", "--tokenizer",
                   tokenizer, "--max-shard-size", "60KB", "--verify", "--verify-tolerance", "1e-4")
    assert _verified_diff(output) <= 1e-4
    hf = tmp_path / "hf"
    from transformers import AutoTokenizer

    eod = json.loads(tokenizer.read_text())["model"]["vocab"][EOD]
    assert AutoTokenizer.from_pretrained(hf).eos_token_id == eod
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == eod
    assert len(list(hf.glob("model-*.safetensors"))) > 3
    config = json.loads((hf / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["eos_token_id"] == eod
    mtp = f"model.layers.{config['num_hidden_layers']}."
    index = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
    assert {mtp + n for n in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                              "embed_tokens.weight", "shared_head.head.weight")} <= set(index)
    hf_to_mcore(hf, tmp_path / "back", progress=False)
    original, back = _megatron_tensors(tmp_path / "trained"), _megatron_tensors(tmp_path / "back")
    assert set(original) == set(back) and any(k.startswith("mtp.") for k in back)
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    assert original["decoder.layers.1.mlp.router.expert_bias"].abs().sum() > 0  # the step moved the bias
    mcore_to_hf(tmp_path / "back", tmp_path / "hf2", max_shard_bytes=60 * 2**10, progress=False)
    first, second = _all_hf_tensors(hf), _all_hf_tensors(tmp_path / "hf2")
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


EOD = "<|endoftext|>"


def _word_tokenizer(path, size):
    """A word-level tokenizer.json of `size` ids, the last the end-of-text token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(size - 1)} | {EOD: size - 1}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return path


def test_fp8_release_checkpoint_converts_to_dequantized_bf16(v3_hf, tmp_path):
    stored = _make_fp8_checkpoint(v3_hf, tmp_path / "fp8")
    output = _tool("hf-to-mcore", "--hf-dir", tmp_path / "fp8", "--output", tmp_path / "ckpt", "--verify",
                   "--verify-tolerance", "1e-4")  # transformers gets our dequantization: its own is wrong here
    assert _verified_diff(output) <= 1e-4
    tensors = _megatron_tensors(tmp_path / "ckpt")

    def dequantized(name):
        return (stored[name].float() * _expand_scale(stored[name + "_scale_inv"], stored[name].shape, FP8_BLOCK)).bfloat16()

    kv_a = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"  # 48 rows: a partial edge block
    assert torch.equal(tensors["decoder.layers.0.self_attention.linear_kv_down_proj.weight"], dequantized(kv_a))
    fc1 = tensors["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"][3]
    prefix = "model.layers.1.mlp.experts.3."
    assert torch.equal(fc1, torch.cat([dequantized(prefix + "gate_proj.weight"), dequantized(prefix + "up_proj.weight")]))
    assert torch.equal(tensors["mtp.layers.0.eh_proj.weight"], dequantized("model.layers.3.eh_proj.weight"))
    assert tensors["decoder.layers.1.mlp.router.weight"].dtype == stored["model.layers.1.mlp.gate.weight"].dtype

    mcore_to_hf(tmp_path / "ckpt", tmp_path / "fp8_again", fp8=True, progress=False)
    config = json.loads((tmp_path / "fp8_again" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    fp8_again = hf_tensors_as_stored(tmp_path / "fp8_again")
    assert fp8_again[kv_a].dtype == torch.float8_e4m3fn and fp8_again[kv_a + "_scale_inv"].shape == (1, 1)
    assert set(fp8_again) == set(stored)


# ---------------------------------------------------------------- errors leave nothing behind


def _broken_copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_hf_errors_name_file_and_key(v3_hf, tmp_path):
    shards = sorted(p.name for p in v3_hf.glob("model-*.safetensors"))
    cases = []

    missing = _broken_copy(v3_hf, tmp_path / "missing")
    (missing / shards[1]).unlink()
    cases.append((missing, FileNotFoundError, shards[1]))

    truncated = _broken_copy(v3_hf, tmp_path / "truncated")
    with open(truncated / shards[2], "r+b") as f:
        f.truncate((truncated / shards[2]).stat().st_size - 5)
    cases.append((truncated, ValueError, f"{shards[2]} is truncated"))

    unknown = _broken_copy(v3_hf, tmp_path / "unknown")
    save_file({"model.layers.0.mlp.extra.weight": torch.zeros(2)}, unknown / "extra.safetensors")
    index = json.loads((unknown / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = "extra.safetensors"
    (unknown / "model.safetensors.index.json").write_text(json.dumps(index))
    cases.append((unknown, KeyError, "extra.safetensors: tensor 'model.layers.0.mlp.extra.weight'"))

    mismatch = _broken_copy(v3_hf, tmp_path / "mismatch")
    config = json.loads((mismatch / "config.json").read_text())
    config["moe_intermediate_size"] += 8
    (mismatch / "config.json").write_text(json.dumps(config))
    cases.append((mismatch, ValueError, r"model.layers.1.mlp.experts.0.gate_proj.weight \+ .* config"))

    no_mtp = _broken_copy(v3_hf, tmp_path / "no_mtp")
    index = json.loads((no_mtp / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("model.layers.3.")}
    (no_mtp / "model.safetensors.index.json").write_text(json.dumps(index))
    cases.append((no_mtp, KeyError, "model.layers.3.* is missing.*--no-mtp"))

    for source, error, message in cases:
        with pytest.raises(error, match=message):
            hf_to_mcore(source, tmp_path / "out", progress=False)
        assert _no_partial_output(tmp_path, "out"), source
    hf_to_mcore(no_mtp, tmp_path / "out", no_mtp=True, progress=False)
    assert not any(k.startswith("mtp.") for k in DistCheckpointReader(resolve_checkpoint(tmp_path / "out")).tensors)


def test_failure_while_writing_leaves_no_output(v3_hf, tmp_path):
    """The MTP layer's embedding copy is checked only when that (last) layer is converted."""
    bad = _broken_copy(v3_hf, tmp_path / "bad_copy")
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    name = "model.layers.3.embed_tokens.weight"
    with safe_open(bad / index["weight_map"][name], "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = tensors[name] + 1
    save_file(tensors, bad / index["weight_map"][name])
    with pytest.raises(ValueError, match="differs from model.embed_tokens.weight"):
        hf_to_mcore(bad, tmp_path / "out", progress=False)
    assert _no_partial_output(tmp_path, "out")
    output = _tool("hf-to-mcore", "--hf-dir", bad, "--output", tmp_path / "out", expect_exit=1)
    assert "error: " in output and "differs" in output and _no_partial_output(tmp_path, "out")


def test_megatron_errors_name_file_and_key(v3_mcore, tmp_path):
    out, _ = v3_mcore
    broken = _broken_copy(out, tmp_path / "broken")
    data = sorted((broken / "iter_0000000").glob("*.distcp"))[0]
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    with pytest.raises(ValueError, match=f"{data.name} is truncated"):
        mcore_to_hf(broken, tmp_path / "hf", progress=False)
    assert _no_partial_output(tmp_path, "hf")
    common = torch.load(out / "iter_0000000" / "common.pt", weights_only=False)
    wrong = _broken_copy(out, tmp_path / "wrong")
    common["model_config"]["kv_lora_rank"] += 1
    torch.save(common, wrong / "iter_0000000" / "common.pt")
    with pytest.raises(ValueError, match=r"tensor 'decoder.layers.0.self_attention.\w+.weight' has shape .* model_config"):
        mcore_to_hf(wrong, tmp_path / "hf", progress=False)
    assert _no_partial_output(tmp_path, "hf")
    too_big = _word_tokenizer(tmp_path / "big.json", 1000)
    with pytest.raises(ValueError, match="big.json has 1000 tokens but the checkpoint's vocabulary is"):
        mcore_to_hf(out, tmp_path / "hf", tokenizer=too_big, progress=False)
    assert _no_partial_output(tmp_path, "hf")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        mcore_to_hf(out, tmp_path / "full", progress=False)
