"""FP8 flags: parsing, validation messages, the Transformer Engine recipe they select, BF16 first/last layers."""

import argparse
import builtins
import enum
import os
import subprocess
import sys
import types

import pytest
import torch

from conftest import REPO
from megatron_dsv3.fp8 import recipes
from megatron_dsv3.fp8.recipes import (
    Fp8Machine,
    add_fp8_args,
    build_te_fp8_recipe,
    layer_uses_fp8,
    validate_fp8_args,
)


def parse(*argv):
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_fp8_args(parser)
    return parser.parse_args(list(argv))


def machine(sm=None, cuda=None, te=None):
    return Fp8Machine(sm=sm, gpu_name="NVIDIA H100" if sm else "", cuda=cuda, te=te,
                      te_problem="" if te else "import failed with RuntimeError")


def test_flags_and_help():
    parser = argparse.ArgumentParser(allow_abbrev=False)
    add_fp8_args(parser)
    help_text = " ".join(parser.format_help().split())
    assert "numerics emulation" in help_text and "not a speed path" in help_text
    args = parser.parse_args([])
    assert (args.fp8_format, args.fp8_recipe, args.fp8_emulation) == (None, None, False)
    assert not args.first_last_layers_bf16
    assert (args.num_layers_at_start_in_bf16, args.num_layers_at_end_in_bf16) == (1, 1)
    with pytest.raises(SystemExit):  # FP8 is switched on by --fp8-format; there is no bare --fp8
        parser.parse_args(["--fp8"])
    validate_fp8_args(args)  # FP8 off: nothing to check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_blockwise_without_emulation_on_this_cpu_machine():
    with pytest.raises(ValueError) as error:
        validate_fp8_args(parse("--fp8-format", "e4m3", "--fp8-recipe", "blockwise"))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        "--fp8-recipe blockwise needs Transformer Engine ≥ 2.3 and an SM ≥ 9.0 GPU with CUDA ≥ 12.9; this machine has ")
    assert "this machine has no CUDA GPU" in message and "no usable Transformer Engine" in message
    assert message.endswith("add --fp8-emulation to emulate the numerics on CPU")


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--fp8-recipe", "blockwise"], "--fp8-recipe needs --fp8-format"),
        (["--fp8-emulation"], "--fp8-emulation needs --fp8-format"),
        (["--first-last-layers-bf16"], "--first-last-layers-bf16 needs --fp8-format"),
        (["--fp8-format", "e4m3", "--fp8-emulation", "--fp8-recipe", "delayed"],
         "--fp8-emulation only emulates --fp8-recipe blockwise"),
        (["--fp8-format", "hybrid", "--fp8-emulation"], "use --fp8-format e4m3"),
        (["--fp8-format", "e4m3", "--fp8-emulation", "--first-last-layers-bf16", "--num-layers-at-end-in-bf16", "-1"],
         "must be ≥ 0"),
        (["--fp8-format", "e4m3", "--fp8-emulation", "--first-last-layers-bf16", "--num-layers-at-start-in-bf16", "3"],
         "leave none of the 4 layers in FP8"),
    ],
)
def test_inconsistent_flags(argv, needle):
    with pytest.raises(ValueError, match=needle) as error:
        validate_fp8_args(parse(*argv), num_layers=4)
    assert "\n" not in str(error.value)


def test_emulation_resolves_to_blockwise():
    args = parse("--fp8-format", "e4m3", "--fp8-emulation", "--first-last-layers-bf16")
    validate_fp8_args(args, num_layers=4)
    assert args.fp8_recipe == "blockwise"


@pytest.mark.parametrize(
    "recipe,found,needles",
    [
        ("blockwise", machine((9, 0), (12, 4), (2, 3)), ["CUDA ≥ 12.9", "an SM 9.0 GPU (NVIDIA H100), CUDA 12.4 and "
                                                         "Transformer Engine 2.3", "add --fp8-emulation"]),
        ("tensorwise", machine((9, 0), (12, 9), (2, 1)), ["Transformer Engine ≥ 2.2", "Transformer Engine 2.1"]),
        ("mxfp8", machine((9, 0), (12, 9), (2, 3)), ["SM ≥ 10.0", "--fp8-recipe blockwise --fp8-emulation"]),
        ("delayed", machine(), ["SM ≥ 8.9", "no CUDA GPU", "(import failed with RuntimeError)"]),
    ],
)
def test_recipe_requirements(monkeypatch, recipe, found, needles):
    monkeypatch.setattr(recipes, "probe_machine", lambda: found)
    with pytest.raises(ValueError) as error:
        validate_fp8_args(parse("--fp8-format", "hybrid", "--fp8-recipe", recipe))
    for needle in needles:
        assert needle in str(error.value)


@pytest.mark.parametrize(
    "recipe,found",
    [
        ("blockwise", machine((9, 0), (12, 9), (2, 3))),
        ("tensorwise", machine((8, 9), (12, 1), (2, 2))),
        ("mxfp8", machine((10, 0), (12, 8), (2, 1))),
        (None, machine((9, 0), (12, 4), (1, 14))),
    ],
)
def test_supported_machines_pass(monkeypatch, recipe, found):
    monkeypatch.setattr(recipes, "probe_machine", lambda: found)
    args = parse("--fp8-format", "e4m3", *(["--fp8-recipe", recipe] if recipe else []))
    validate_fp8_args(args)
    assert args.fp8_recipe == (recipe or "delayed")


def test_transformer_engine_import_error_of_any_kind_means_unavailable(monkeypatch):
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name.startswith("transformer_engine"):
            raise RuntimeError("no CUDA driver")  # what TE raises on CPU machines
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    found = recipes.probe_machine()
    assert found.te is None and found.te_problem == "import failed with RuntimeError"


def test_build_te_fp8_recipe(monkeypatch):
    Format = enum.Enum("Format", ["E4M3", "E5M2", "HYBRID"])  # stands in for transformer_engine.common.recipe

    def recipe_class(class_name):
        return type(class_name, (), {"__init__": lambda self, fp8_format: setattr(self, "fp8_format", fp8_format)})

    te_recipe = types.ModuleType("transformer_engine.common.recipe")
    te_recipe.Format = Format
    for class_name in recipes.TE_RECIPE_CLASSES.values():
        setattr(te_recipe, class_name, recipe_class(class_name))
    common = types.ModuleType("transformer_engine.common")
    common.recipe = te_recipe
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setitem(sys.modules, "transformer_engine.common", common)
    monkeypatch.setitem(sys.modules, "transformer_engine.common.recipe", te_recipe)

    expected = {"delayed": "DelayedScaling", "tensorwise": "Float8CurrentScaling",
                "blockwise": "Float8BlockScaling", "mxfp8": "MXFP8BlockScaling"}
    for recipe, class_name in expected.items():
        for fmt, te_format in (("e4m3", Format.E4M3), ("hybrid", Format.HYBRID)):
            built = build_te_fp8_recipe(parse("--fp8-format", fmt, "--fp8-recipe", recipe))
            assert type(built).__name__ == class_name and built.fp8_format is te_format
    with pytest.raises(ValueError, match="not a Transformer Engine recipe"):
        build_te_fp8_recipe(parse("--fp8-format", "e4m3", "--fp8-emulation"))


def fp8_config(*argv, num_layers=6):
    """The FP8 fields pretrain_dsv3.py puts in its TransformerConfig, on megatron-core's defaults."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    defaults = {f: TransformerConfig.__dataclass_fields__[f].default for f in
                ("fp8", "fp8_recipe", "first_last_layers_bf16", "num_layers_at_start_in_bf16",
                 "num_layers_at_end_in_bf16")}
    args = parse(*argv)
    validate_fp8_args(args, num_layers)
    return types.SimpleNamespace(**{**defaults, "num_layers": num_layers, "fp8_emulation": False,
                                    **recipes.fp8_config_fields(args)})


def test_fp8_config_fields():
    assert recipes.fp8_config_fields(parse()) == {}
    emulated = recipes.fp8_config_fields(parse("--fp8-format", "e4m3", "--fp8-emulation"))
    assert emulated["fp8_emulation"] and "fp8" not in emulated  # megatron's fp8 would enter TE's autocast
    gpu = parse("--fp8-format", "hybrid", "--fp8-recipe", "blockwise", "--first-last-layers-bf16")
    assert recipes.fp8_config_fields(gpu) == dict(fp8="hybrid", fp8_recipe="blockwise", first_last_layers_bf16=True,
                                                  num_layers_at_start_in_bf16=1, num_layers_at_end_in_bf16=1)


def test_layer_uses_fp8():
    from megatron.core.fp8_utils import is_first_last_bf16_layer

    on = fp8_config("--fp8-format", "e4m3", "--fp8-emulation")
    assert [layer_uses_fp8(n, on) for n in range(1, 7)] == [True] * 6
    bf16_ends = fp8_config("--fp8-format", "e4m3", "--fp8-emulation", "--first-last-layers-bf16",
                           "--num-layers-at-end-in-bf16", "2")
    assert [layer_uses_fp8(n, bf16_ends) for n in range(1, 7)] == [False, True, True, True, False, False]
    # the same layers megatron-core keeps out of TE's fp8_autocast (0-based layer numbers there)
    assert [not is_first_last_bf16_layer(bf16_ends, n - 1) for n in range(1, 7)] == [
        layer_uses_fp8(n, bf16_ends) for n in range(1, 7)]
    assert [layer_uses_fp8(n, fp8_config()) for n in range(1, 7)] == [False] * 6
    with pytest.raises(ValueError, match="outside 1..6"):
        layer_uses_fp8(0, on)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_te_step_time_benchmark_refuses_without_gpu_and_te():
    """benchmarks/fp8_te_step_time.py needs a GPU and Transformer Engine: exit status 2, one line naming both."""
    script = [sys.executable, os.path.join(REPO, "benchmarks", "fp8_te_step_time.py")]
    refused = subprocess.run(script, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and refused.stdout == ""
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith("error: benchmarks/fp8_te_step_time.py needs a CUDA GPU and Transformer Engine")
    assert "this machine has no CUDA GPU" in refused.stderr and "no usable Transformer Engine" in refused.stderr
    helped = subprocess.run(script + ["--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert helped.returncode == 0 and "--recipes" in helped.stdout and "blockwise" in helped.stdout
