"""Selective recompute (--recompute-granularity selective --recompute-modules ...) on CPU ranks: the same loss
and bit-equal gradients (fp32) as without it, and fewer bytes held for backward.

megatron-core's recompute rebuilds in the backward exactly what the forward computed (same inputs, same RNG
state), and the spec's RMSNorm is one autograd node (models/rms_norm.py), so the recomputed norm's input gradient
meets the residual's as one term: loss and gradients are bit-equal. Launches (module-scoped, shared by the tests): 1 rank
with and without recompute; 2 ranks PP=2 DualPipeV with --fp8-emulation with and without it.
"""

import glob
from types import SimpleNamespace

import pytest
import torch

from conftest import torchrun
from megatron_dsv3.training import recompute
from megatron_dsv3.training.arguments import build_parser

SCRIPT = "tests/scripts/dump_loss_and_grads.py"
SMALL = ["--seq-length", "32", "--micro-batch-size", "1", "--global-batch-size", "2"]
RECOMPUTE = ["--recompute-granularity", "selective", "--recompute-modules", "layernorm", "mla_up_proj", "core_attn"]
DUALPIPEV_FP8 = ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "dualpipev",
                 "--fp8-format", "e4m3", "--fp8-recipe", "blockwise", "--fp8-emulation"]
LAYOUTS = {"pp1": (1, []), "dualpipev_fp8": (2, DUALPIPEV_FP8 + ["--global-batch-size", "4"])}  # DualPipeV: >= 2 PP micro-batches


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """layout -> (without recompute, with recompute): the rank files' contents, rank order."""
    out = {}
    for name, (nproc, flags) in LAYOUTS.items():
        pair = []
        for extra in ([], RECOMPUTE):
            path = tmp_path_factory.mktemp(f"{name}_{'recompute' if extra else 'plain'}")
            torchrun(nproc, SCRIPT, path, *SMALL, *flags, *extra)
            pair.append([torch.load(f) for f in sorted(glob.glob(f"{path}/rank*.pt"))])
        out[name] = tuple(pair)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_recompute_matches_without(runs, layout):
    plain, recomputed = runs[layout]
    for rank, (a, b) in enumerate(zip(plain, recomputed)):
        assert (a["loss"] is None) == (b["loss"] is None)
        if a["loss"] is not None:
            assert torch.equal(a["loss"], b["loss"]), f"rank {rank}: loss {a['loss']} != {b['loss']}"
        assert a["grads"].keys() == b["grads"].keys()
        for name, grad in a["grads"].items():
            assert torch.equal(b["grads"][name], grad), \
                f"rank {rank}: {name} differs by {(b['grads'][name] - grad).abs().max().item():.3g}"


def test_recompute_holds_fewer_bytes_for_backward(runs):
    (plain,), (recomputed,) = runs["pp1"]
    saved, saved_recomputed = plain["saved_bytes"], recomputed["saved_bytes"]
    print(f"saved for backward at the first backward: {saved} B without recompute, {saved_recomputed} B with")
    assert saved_recomputed < 0.9 * saved


@pytest.mark.parametrize("argv,cuda,message", [
    (["--recompute-modules", "layernorm"], False,
     "--recompute-modules layernorm needs --recompute-granularity selective"),
    (RECOMPUTE, True, "--recompute-modules layernorm needs Transformer Engine on a GPU host"),
])
def test_unrunnable_recompute_fails_in_one_line(monkeypatch, argv, cuda, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(recompute, "probe_machine", lambda: SimpleNamespace(te=None))
    with pytest.raises(ValueError) as error:
        recompute.validate_recompute_args(build_parser().parse_args(argv))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
