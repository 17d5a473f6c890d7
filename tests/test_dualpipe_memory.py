"""DualPipe/DualPipeV memory savings (issue 13 items 4, 5): a stage's output is freed once sent (megatron's
deallocate_output_tensor; config.deallocate_pipeline_outputs), the mirrored-copy gradients are exchanged in their
own dtype, and stage 0 and MTP share one word embedding on a rank holding both (as megatron's GPTModel does at
PP=1).

Launches (module-scoped): tests/scripts/dualpipe_parity.py at PP=2 on 2 ranks running DualPipe and DualPipeV with
and without free-after-send ("+keep"), each also under the activation meter ("+meter"), the same script at PP=1 on one rank, and tests/scripts/mirrored_exchange.py
on 2 ranks.
"""

import glob

import pytest
import torch

from conftest import torchrun

SCRIPT = "tests/scripts/dualpipe_parity.py"
SEQ, HIDDEN = 32, 64  # the tiny preset's hidden size; one micro-batch of one sequence
FLAGS = ["--num-layers", "4", "--moe-layer-freq", "([0]*1+[1]*3)", "--micro-batch-size", "1",
         "--global-batch-size", "4", "--seq-length", str(SEQ), "--moe-router-bias-update-rate", "0"]
SCHEDULES = ("dualpipe", "dualpipev")


def load(out_dir):
    return [torch.load(path) for path in sorted(glob.glob(f"{out_dir}/rank*.pt"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    dual, single = tmp_path_factory.mktemp("pp2"), tmp_path_factory.mktemp("pp1")
    names = ",".join(f"{s}{keep}{meter}" for s in SCHEDULES for keep in ("", "+keep") for meter in ("", "+meter"))
    torchrun(2, SCRIPT, dual, names, *FLAGS, "--pipeline-model-parallel-size", "2")
    torchrun(1, SCRIPT, single, "megatron", *FLAGS)
    return {"pp2": load(dual), "pp1": load(single)}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_free_after_send_keeps_losses_and_gradients_bit_equal(runs, schedule):
    """Freed or kept stage outputs: the same loss, gradient norm and gradients, bit for bit (fp32), and the
    gradient norm of the single-process step."""
    (single,) = runs["pp1"]
    for rank in runs["pp2"]:
        assert rank[schedule]["grad_norm"] == pytest.approx(single["megatron"]["grad_norm"], rel=1e-5)
        freed, kept = rank[schedule], rank[f"{schedule}+keep"]
        assert (freed["loss"] is None) == (kept["loss"] is None)
        if freed["loss"] is not None:
            assert torch.equal(freed["loss"], kept["loss"])
        assert freed["grad_norm"] == kept["grad_norm"]
        for mine, theirs in zip(freed["grads"], kept["grads"]):
            assert mine.keys() == theirs.keys()
            assert all(torch.equal(mine[n], theirs[n]) for n in mine)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_free_after_send_lowers_the_peak(runs, schedule):
    """Peak bytes of what the step keeps for the backward (autograd's saved tensors plus the schedule's stash and
    in-flight sends): every rank sends stage outputs, so every rank's peak drops by at least one of them, less
    the 4-byte placeholders the freed outputs keep (at most one per micro-batch and chunk)."""
    output_bytes, placeholders = SEQ * HIDDEN * 4, 4 * 4 * 2
    drops = [r[f"{schedule}+keep+meter"]["activation_peak"] - r[f"{schedule}+meter"]["activation_peak"]
             for r in runs["pp2"]]
    assert min(drops) >= output_bytes - placeholders, drops


def test_one_embedding_per_rank_for_stage_0_and_mtp(runs):
    """DualPipe (both ranks hold stage 0 and the MTP stage) and DualPipeV's rank 0: two uses, one parameter,
    one optimizer state; every trainable parameter has exactly one optimizer state entry. At PP=1 megatron's
    GPTModel already shares: MTP has no embedding parameter of its own."""
    for schedule in SCHEDULES:
        holders = [r[schedule]["embedding"] for r in runs["pp2"] if r[schedule]["embedding"]["uses"] == 2]
        assert len(holders) == (2 if schedule == "dualpipe" else 1)
        for rank in runs["pp2"]:
            e = rank[schedule]["embedding"]
            assert e["parameters"] == e["optimizer_states"] == min(e["uses"], 1)
            assert e["all_optimizer_states"] == e["distinct_parameters"]
            assert e["mtp_embedding_parameters"] == []
    (single,) = runs["pp1"]
    e = single["megatron"]["embedding"]
    assert e["uses"] == e["parameters"] == e["optimizer_states"] == 1 and e["mtp_embedding_parameters"] == []


@pytest.fixture(scope="module")
def exchanged(tmp_path_factory):
    out = tmp_path_factory.mktemp("mirrored")
    torchrun(2, "tests/scripts/mirrored_exchange.py", out)
    return load(out)


def test_mirrored_copies_are_summed_in_their_own_dtype(exchanged):
    """Rank r's chunk 0 and rank 1-r's chunk 1 are copies of one stage: both end with g_r + g_{1-r}, bit-equal to
    each other and to the sum in the gradient's own dtype (fp64 included: no round trip through fp32)."""
    for rank, peer in ((0, 1), (1, 0)):
        mine, theirs = exchanged[rank], exchanged[peer]
        for name, grad in mine["after"][0].items():
            assert grad.dtype == mine["before"][0][name].dtype
            assert torch.equal(grad, theirs["after"][1][name]), name
            assert torch.equal(grad, mine["before"][0][name] + theirs["before"][1][name]), name
    fp64 = exchanged[0]["after"][0]["a"]
    assert fp64.dtype == torch.float64 and not torch.equal(fp64, fp64.float().double())  # fp32 would round it


def test_dualpipe_checkpoint_converts_to_hf_with_one_embedding(tmp_path):
    """The shared embedding is stored once, under stage 0's key (as at PP=1; the MTP copy's replica entry is
    gone, the key set is unchanged): mcore-to-hf writes it as the main and the MTP layer's embed_tokens."""
    import json

    from test_conversion_core import _all_hf_tensors

    from megatron_dsv3.conversion.convert import mcore_to_hf

    torchrun(2, "pretrain_dsv3.py", "--pipeline-model-parallel-size", "2", "--pipeline-schedule", "dualpipe",
             "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "1",
             "--save", tmp_path / "ckpt")
    mcore_to_hf(tmp_path / "ckpt", tmp_path / "hf", progress=False)
    tensors = _all_hf_tensors(tmp_path / "hf")
    layers = json.loads((tmp_path / "hf" / "config.json").read_text())["num_hidden_layers"]
    assert torch.equal(tensors[f"model.layers.{layers}.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
