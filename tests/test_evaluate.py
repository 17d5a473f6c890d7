"""Evaluation at PP2 x EP2 (1F1B and DualPipeV) on a real preprocessed corpus with an offline BPE tokenizer,
against a single-process forward of the same validation and test samples (scripts/reference_eval_loss.py)."""

import json

import pytest

from conftest import read_metrics, torchrun
from test_data import corpus, prefixes  # noqa: F401  (module fixtures: the corpus, tokenizer and .bin/.idx)

LAYOUT = ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2"]


def run_flags(root, prefix, save):
    return ["--data-path", prefix, "--split", "80,15,5", "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", root / "tokenizer.json", "--seq-length", "32", "--micro-batch-size", "1",
            "--global-batch-size", "8", "--train-iters", "2", "--eval-interval", "1", "--eval-iters", "1",
            "--save", save]


@pytest.fixture(scope="module", params=["1f1b", "dualpipev"])
def evaluated(request, corpus, prefixes, tmp_path_factory):  # noqa: F811
    root, _ = corpus
    out = tmp_path_factory.mktemp(request.param)
    flags = run_flags(root, prefixes["a"], out / "ckpt")
    metrics = out / "metrics.jsonl"
    torchrun(4, "pretrain_dsv3.py", *flags, *LAYOUT, "--pipeline-schedule", request.param, "--metrics-jsonl", metrics)
    # the weights after iteration 2 evaluated: validation window 1 (the evaluation at iteration 2)
    torchrun(1, "tests/scripts/reference_eval_loss.py", out / "ref.json", 1, *flags, "--load", out / "ckpt")
    with open(out / "ref.json") as f:
        return read_metrics(metrics), json.load(f)


def test_eval_rows_at_interval_and_end(evaluated):
    rows = [r for r in evaluated[0] if "split" in r]
    assert [(r["iteration"], r["split"]) for r in rows] == [(1, "validation"), (2, "validation"), (2, "test")]
    for r in rows:
        assert r["lm_loss_ppl"] == pytest.approx(2.718281828 ** r["lm_loss"], rel=1e-6)


def test_losses_equal_single_process_forward(evaluated):
    rows, reference = evaluated
    logged = {r["split"]: r for r in rows if "split" in r and r["iteration"] == 2}
    for split in ("validation", "test"):
        for key in ("lm_loss", "mtp_loss"):
            assert logged[split][key] == pytest.approx(reference[split][key], rel=1e-5), (split, key)
