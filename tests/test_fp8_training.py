"""FP8 in pretrain_dsv3.py: the flags, which modules run the emulated blockwise FP8 GEMMs, their numerics
against independent references, the FP8 MoE dispatch, and a short training run against high precision."""

import json
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import read_metrics, torchrun

import pretrain_dsv3
from megatron_dsv3.models.transformer_config import transformer_config_from_args
from megatron_dsv3.training import train
from megatron_dsv3.training.arguments import parse_args

FP8_FLAGS = ["--fp8-format", "e4m3", "--fp8-recipe", "blockwise", "--fp8-emulation"]


def test_blockwise_without_emulation_exits_with_one_line_before_process_groups(monkeypatch):
    # earlier tests in this process may have left a one-rank group: what is checked is that main never gets to its own
    def initialize_distributed(args):
        raise AssertionError("process groups were initialized before the FP8 flags were checked")

    monkeypatch.setattr(train, "initialize_distributed", initialize_distributed)
    with pytest.raises(SystemExit) as exit_info:
        pretrain_dsv3.main(["--fp8-format", "e4m3", "--fp8-recipe", "blockwise"])
    message = str(exit_info.value.code)
    assert "\n" not in message and message.startswith("error: --fp8-recipe blockwise needs Transformer Engine")
    assert "add --fp8-emulation" in message


@pytest.mark.parametrize("argv, fragment", [
    (["--fp8-emulation"], "--fp8-emulation needs --fp8-format"),
    (["--fp8-format", "e4m3", "--fp8-emulation", "--fp8-recipe", "delayed"], "only emulates --fp8-recipe blockwise"),
    (["--fp8-format", "hybrid", "--fp8-emulation"], "use --fp8-format e4m3"),
    (["--fp8-format", "e4m3", "--fp8-emulation", "--first-last-layers-bf16", "--num-layers-at-end-in-bf16", "3"],
     "leave none of the 4 layers in FP8"),
])
def test_fp8_flag_errors(argv, fragment):
    with pytest.raises(SystemExit, match=fragment):
        parse_args(argv, world_size=1)


def test_emulation_flags_reach_the_transformer_config():
    args = parse_args(["--fp8-format", "e4m3", "--fp8-emulation", "--first-last-layers-bf16"], world_size=1)
    assert args.fp8_recipe == "blockwise"  # the default with --fp8-emulation
    config = transformer_config_from_args(args)
    assert config.fp8_emulation and config.fp8 is None  # megatron's own fp8 would call into TE
    assert config.first_last_layers_bf16 and config.num_layers_at_start_in_bf16 == 1
    off = transformer_config_from_args(parse_args([], world_size=1))
    assert not off.fp8_emulation and off.fp8 is None


@pytest.fixture(scope="module")
def check(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "check.json"
    torchrun(2, "tests/scripts/fp8_model_check.py", out)
    with open(out) as f:
        return json.load(f)


def is_fp8(class_name):
    return class_name.startswith("Fp8") and class_name.endswith("ParallelLinear")


def test_which_modules_are_fp8(check):
    classes = check[0]["classes"]
    fp8, ends, hp = classes["fp8"], classes["ends"], classes["hp"]
    linears = [n for n, c in hp.items() if c.endswith(("ColumnParallelLinear", "RowParallelLinear"))]
    decoder = [n for n in linears if n.startswith("decoder.layers.")]
    mtp_layer = [n for n in linears if n.startswith("mtp.layers.0.transformer_layer.")]
    assert not any(is_fp8(c) for c in hp.values())
    # MLA: q/kv down and up projections + output projection; dense SwiGLU MLP; MoE: 4 local experts + shared
    assert len(decoder) == (5 + 2) + 3 * (5 + 4 * 2 + 2) and len(mtp_layer) == 5 + 4 * 2 + 2
    # every decoder- and MTP-layer linear is FP8 ...
    assert all(is_fp8(fp8[n]) for n in decoder + mtp_layer)
    # ... and nothing else: embedding, output head, eh_proj, router, norms, attention core
    others = {n: c for n, c in fp8.items() if n not in decoder + mtp_layer}
    assert not any(c.startswith("Fp8") for c in others.values())
    for name in ("embedding.word_embeddings", "output_layer", "mtp.layers.0.eh_proj", "decoder.layers.1.mlp.router",
                 "decoder.layers.1.input_layernorm", "decoder.layers.1.self_attention.core_attention",
                 "decoder.final_layernorm"):
        assert name in fp8 and fp8[name] == hp[name]
    # --first-last-layers-bf16: layers 1 and 4 of 4 keep megatron's high-precision classes
    for n in decoder:
        layer = int(n.split(".")[2])
        assert is_fp8(ends[n]) == (layer in (1, 2)), n
    assert check[0]["dispatch_fp8"] == {"fp8": [None, True, True, True], "ends": [None, True, True, False]}


@pytest.mark.parametrize("linear", ["kv_down_proj", "linear_proj", "expert_fc1"])
def test_fp8_linear_matches_the_dequantized_reference(check, linear):
    result = check[0]["linears"][linear]
    assert is_fp8(result["class"])
    assert result["weight_shape"][1] < 128  # partial edge tiles
    for gemm in ("fprop", "dgrad", "wgrad"):
        assert result[f"{gemm}_vs_ref"] < 1e-6, gemm
    assert 5e-3 < result["fprop_vs_exact"] < 0.1  # it really is FP8: E4M3's 3 mantissa bits


def test_model_output_and_gradients_close_to_high_precision_but_not_equal(check):
    result = check[0]
    assert 0 < abs(result["fp8_loss"] - result["hp_loss"]) / result["hp_loss"] < 2e-3
    assert result["grad_differs"] and result["grad_cosine"] > 0.98


def test_fp8_dispatch(check):
    width = 64  # tiny hidden size: one partial 1×128 tile, one FP32 scale per row
    for rank in check:
        dispatch = rank["dispatch"]
        assert dispatch["fp8_flag"] == [True, False]
        assert dispatch["equals_quantized_hp"] and dispatch["differs_from_hp"] and dispatch["dx_equal"]
        fp8_bytes, hp_bytes = dispatch["bytes"]
        assert hp_bytes > 0 and fp8_bytes * 4 * width == hp_bytes * (width + 4)


def test_short_training_run_tracks_high_precision(tmp_path):
    flags = ["--train-iters", "20", "--lr-warmup-iters", "2"]
    runs = {"hp": [], "fp8": FP8_FLAGS}
    with ThreadPoolExecutor(2) as pool:  # same seed and mock data, both at once
        list(pool.map(lambda name: torchrun(1, "pretrain_dsv3.py", *flags, *runs[name], "--metrics-jsonl",
                                            tmp_path / f"{name}.jsonl"), runs))
    metrics = {name: read_metrics(tmp_path / f"{name}.jsonl") for name in runs}
    hp, fp8 = ([row["lm_loss"] for row in metrics[name]] for name in runs)
    rel = [abs(a - b) / a for a, b in zip(hp, fp8)]
    print("relative LM loss difference per iteration:", [f"{r:.2e}" for r in rel])
    assert len(rel) == 20 and hp[-1] < hp[0] - 0.5  # it learns
    assert max(rel) < 0.01 and rel[-1] < 0.005
    assert max(rel) > 1e-5  # not the same run twice
    # Iteration 1 has the same weights and batch in both runs, so only the FP8 GEMMs differ (no trajectory drift
    # yet). The loss alone barely sees the decoder's FP8 linears on this data (the embedding and output head learn
    # it): E5M2 passes the bounds above, and unscaled tiles, whose gradients underflow to 0, fail them narrowly
    # (1.3% maximum). At iteration 1 the right recipe is 0.19% (gradient norm) and 4.7e-5 (loss) from high
    # precision, E5M2 1.0% and 2.9e-4, unscaled tiles 25% (gradient norm).
    grad_norm_hp, grad_norm_fp8 = (metrics[name][0]["grad_norm"] for name in runs)
    assert abs(grad_norm_fp8 / grad_norm_hp - 1) < 0.005 and rel[0] < 1.5e-4


def test_gpu_fp8_uses_transformer_engine_linears_imported_only_then(monkeypatch):
    """Megatron's FP8 (config.fp8, GPUs) builds TE's linear modules in every decoder layer (megatron-core
    enters fp8_autocast only around the FP8 ones); the import happens only on that branch."""
    from megatron_dsv3.models import spec

    te = types.ModuleType("megatron.core.extensions.transformer_engine")
    te.TEColumnParallelLinear, te.TERowParallelLinear = type("TEColumn", (), {}), type("TERow", (), {})
    monkeypatch.setitem(sys.modules, te.__name__, te)
    gpu = types.SimpleNamespace(fp8="e4m3", fp8_emulation=False)
    for fp8_layer in (True, False):
        assert spec.linear_classes(gpu, fp8_layer) == (te.TEColumnParallelLinear, te.TERowParallelLinear)
    monkeypatch.delitem(sys.modules, te.__name__)  # the other branches never import it
    cpu = types.SimpleNamespace(fp8=None, fp8_emulation=True, split_weight_grad=False)
    assert spec.linear_classes(cpu, True) == spec.EMULATED_FP8
    assert spec.linear_classes(cpu, False) == spec.HIGH_PRECISION
    dual = types.SimpleNamespace(fp8=None, fp8_emulation=True, split_weight_grad=True)  # DualPipe chunks
    assert spec.linear_classes(dual, True) == spec.EMULATED_FP8  # whose wgrad a B op defers as well
    assert spec.linear_classes(dual, False) == spec.SPLIT_BACKWARD
    mlp = spec.layer_spec(True, linear=spec.EMULATED_FP8).submodules.mlp
    assert mlp.params["fp8_dispatch"] and mlp.submodules.experts.submodules.linear_fc1 is spec.EMULATED_FP8.column


def test_power_of_two_requantization_is_exact():
    """Why FP8-dispatched tokens may be quantized again (hierarchical relay, the expert's fc1) at no cost:
    with power-of-two scales a dequantized FP8 tile quantizes back to the same values."""
    from megatron_dsv3.fp8.blockwise import fake_quantize_1x128

    torch.manual_seed(0)
    x = torch.randn(64, 200) * torch.logspace(-30, 30, 64)[:, None]  # incl. tiles in E4M3's subnormal range
    once = fake_quantize_1x128(x, power_of_two_scales=True)
    assert torch.equal(fake_quantize_1x128(once, power_of_two_scales=True), once)
    assert not torch.equal(once, x)
