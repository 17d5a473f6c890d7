"""Fill-in-Middle (data/fim.py) against the DeepSeek-V3 report's §4.1 layout, written out by hand; the
rate against its binomial sampling error; the packed stream against the corpus's own documents."""

import itertools
import json
import math
from collections import Counter

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from conftest import byte_level_bpe, read_metrics, torchrun
from megatron_dsv3.data.datasets import build_data_iterator, build_pretraining_datasets
from megatron_dsv3.data.fim import FIMSentinels, FIMSettings, fim_document, fim_settings
from megatron_dsv3.data.tokenizer import build_tokenizer
from megatron_dsv3.training.arguments import parse_args
from test_data import load_tool

EOD, BEGIN, HOLE, END, SEP = "<|endoftext|>", "<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>", "<|file_sep|>"
WORDS = "def add return self import class lambda yield print for while if else".split()
SEQ = 16
DOCS = 10_000


class ScriptedRng:
    """fim_document's draws, scripted: the uniforms (FIM?, then SPM?) and the two cut points."""

    def __init__(self, uniforms, cuts):
        self.uniforms, self.cuts, self.calls = list(uniforms), cuts, []

    def random(self):
        return self.uniforms.pop(0)

    def integers(self, low, high, size):
        self.calls.append((low, high, size))
        return numpy.array(self.cuts)


S = FIMSentinels(begin=100, hole=101, end=102)


def settings(**kw):
    return FIMSettings(**{"rate": 0.1, "spm_rate": 0.0, "sentinels": S, "eod": 99, **kw})


def test_psm_spm_layout_by_hand():
    f = [1, 2, 3, 4, 5, 6, 99]  # a document of six tokens and its EOD; cuts at 4 and 1
    rng = ScriptedRng([0.05, 0.5], [4, 1])
    psm = fim_document(f, rng, settings(spm_rate=0.3))
    assert psm.tolist() == [100, 1, 101, 5, 6, 102, 2, 3, 4, 99]  # <begin> pre <hole> suf <end> middle <eos>
    assert rng.calls == [(0, 7, 2)]  # cuts drawn from the boundaries 0..6 of the six tokens before EOD
    spm = fim_document(f, ScriptedRng([0.05, 0.2], [4, 1]), settings(spm_rate=0.3))
    assert spm.tolist() == [100, 101, 5, 6, 102, 1, 2, 3, 4, 99]  # <begin><hole> suf <end> pre middle <eos>
    kept = fim_document(f, ScriptedRng([0.1], []), settings())  # a draw ≥ --fim-rate: unchanged
    assert kept.tolist() == f
    bos = fim_document([7] + f, ScriptedRng([0.05, 0.5], [0, 6]), settings(bos=7))  # empty prefix and suffix
    assert bos.tolist() == [7, 100, 101, 102, 1, 2, 3, 4, 5, 6, 99]


def test_multiset_kept_and_split_sample():
    rng = numpy.random.default_rng(0)
    split = settings(rate=1.0, spm_rate=0.5, split_id=50, fragment_rate=0.5)
    changed = 0
    for case in range(2000):
        body = rng.integers(0, 60, size=rng.integers(0, 40)).tolist()
        doc = body + [99]
        for s in (settings(rate=0.5, spm_rate=0.5), split):
            out = fim_document(doc, numpy.random.default_rng(case), s).tolist()
            plain = [t for t in out if t not in (100, 101, 102)]
            assert Counter(plain) == Counter(doc) and out[-1] == 99
            fragments = body.count(50) + 1 if s.split_id else 1
            assert len(out) - len(doc) in range(0, 3 * fragments + 1, 3)
            assert out.count(100) == out.count(101) == out.count(102)
            if s.split_id:  # the split tokens stay where they were, between the fragments
                positions = [i for i, t in enumerate(out) if t == 50]
                assert len(positions) == body.count(50)
            changed += out != doc
    assert changed > 1000


def test_no_prefix():
    f = [1, 2, 3, 99]
    s = settings(rate=1.0, no_prefix="1 2")
    text = lambda ids: " ".join(map(str, ids))  # noqa: E731
    assert fim_document(f, numpy.random.default_rng(0), s, text).tolist() == f
    assert fim_document(f, numpy.random.default_rng(0), settings(rate=1.0, no_prefix="2"), text).tolist() != f


@pytest.fixture(scope="module")
def fim_corpus(tmp_path_factory):
    """A BPE tokenizer.json with the FIM sentinels, 10k short documents tokenized by tools/preprocess_data.py."""
    root = tmp_path_factory.mktemp("fim")
    byte_level_bpe([" ".join(WORDS)] * 4, 300, [EOD, BEGIN, HOLE, END, SEP]).save(str(root / "tokenizer.json"))
    rng = numpy.random.default_rng(1)
    with open(root / "code.jsonl", "w") as f:
        for _ in range(DOCS):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS + [SEP], size=rng.integers(2, 8)))}) + "\n")
    load_tool("preprocess_data").main([
        "--input", str(root / "code.jsonl"), "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", str(root / "tokenizer.json"), "--output-prefix", str(root / "code"), "--append-eod",
    ])
    return root, str(root / "code_text_document")


def flags(root, prefix, *extra):
    return ["--data-path", prefix, "--split", "100,0,0", "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", str(root / "tokenizer.json"), "--seq-length", str(SEQ), "--fim-data", *extra]


def build(root, prefix, cache, samples, *extra):
    args = parse_args(flags(root, prefix, *extra), world_size=1)
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(root / "tokenizer.json"))
    train, _, _ = build_pretraining_datasets(
        data_path=args.data_path, split=args.split, mock_data=False, seq_length=SEQ, seed=args.seed,
        tokenizer=tokenizer, train_samples=samples, valid_samples=0, test_samples=0, data_cache_path=cache,
        fim=fim_settings(args, tokenizer),
    )
    return train, tokenizer


def test_sentinels_and_report_format_in_text(fim_corpus):
    root, _ = fim_corpus
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(root / "tokenizer.json"))
    s = fim_settings(parse_args(flags(root, "x"), world_size=1), tokenizer)
    assert [s.sentinels.begin, s.sentinels.hole, s.sentinels.end] == [tokenizer.token_to_id(t) for t in (BEGIN, HOLE, END)]
    f = tokenizer.tokenize("def add self return lambda yield print") + [tokenizer.eod]
    out = fim_document(f, ScriptedRng([0.0, 0.9], [5, 2]), s)
    text = lambda ids: tokenizer.detokenize(ids)  # noqa: E731
    pre, middle, suf = text(f[:2]), text(f[2:5]), text(f[5:-1])
    assert text(out) == f"{BEGIN}{pre}{HOLE}{suf}{END}{middle}{EOD}"  # PSM: draw 0.9 ≥ --fim-spm-rate 0.5


def test_dataset_rate_and_documents(fim_corpus, tmp_path):
    """The packed stream of all samples, cut at EOD, is the document index's documents in order, each the same
    multiset of tokens once the sentinels are removed; a tenth of them carry the sentinels (± 3 sigma)."""
    root, prefix = fim_corpus
    train, tokenizer = build(root, prefix, str(tmp_path / "cache"), 64, "--fim-rate", "0.1", "--fim-spm-rate", "0.5")
    begin, hole, end = sentinels = [tokenizer.token_to_id(t) for t in (BEGIN, HOLE, END)]
    order = numpy.argsort(train.shuffle_index)  # sample at stream position k is train[order[k]]
    stream = torch.cat([train[int(i)]["tokens"] for i in order]).tolist()
    ends = [j for j, t in enumerate(stream) if t == tokenizer.eod]
    documents = [stream[a + 1:b + 1] for a, b in zip([-1] + ends, ends)]
    assert len(documents) > 0.99 * DOCS  # all but the partial last sample's
    corpus = IndexedDataset(prefix)
    rearranged, layouts = 0, Counter()
    for position, got in enumerate(documents):
        original = corpus[int(train.document_index[position])].tolist()
        assert Counter(t for t in got if t not in sentinels) == Counter(original)
        if got != original:
            rearranged += 1
            assert got[0] == begin and [t for t in got if t in sentinels] == sentinels and got[-1] == tokenizer.eod
            layouts["<begin><hole> (SPM, or PSM of an empty prefix)" if got[1] == hole else "PSM"] += 1
    n = len(documents)
    assert abs(rearranged - 0.1 * n) <= 3 * math.sqrt(n * 0.1 * 0.9), rearranged
    assert len(layouts) == 2, layouts


def test_same_samples_at_dp1_and_dp2(fim_corpus, tmp_path):
    """Rank 0 builds the indices into the cache, rank 1 reads them back: their DP 2 micro-batches make up
    the DP 1 global batches of a third build; a fourth, read back to front, gives the same samples."""
    root, prefix = fim_corpus
    extra = ("--fim-rate", "0.5", "--fim-split-sample", SEP, "--fim-fragment-rate", "0.5")
    rank0, _ = build(root, prefix, str(tmp_path / "shared"), 48, *extra)
    rank1, _ = build(root, prefix, str(tmp_path / "shared"), 48, *extra)
    alone, tokenizer = build(root, prefix, str(tmp_path / "other"), 48, *extra)
    mbs, steps = 3, 40  # the first 240 samples
    single = list(itertools.islice(build_data_iterator(alone, 2 * mbs, 0, 1, 0), steps))
    dp = [list(itertools.islice(build_data_iterator(r, mbs, rank, 2, 0), steps)) for rank, r in enumerate((rank0, rank1))]
    assert len(single) == len(dp[0]) == len(dp[1]) == steps
    for step, batch in enumerate(single):
        assert torch.equal(torch.cat([dp[0][step]["tokens"], dp[1][step]["tokens"]]), batch["tokens"])
        assert torch.equal(torch.cat([dp[0][step]["labels"], dp[1][step]["labels"]]), batch["labels"])
    read = torch.cat([b["tokens"] for b in single])
    assert (read == tokenizer.token_to_id(BEGIN)).any() and (read == tokenizer.token_to_id(SEP)).any()
    first = range(len(read))
    again, _ = build(root, prefix, str(tmp_path / "again"), 48, *extra)
    backwards = {i: again[i]["tokens"] for i in reversed(first)}
    assert all(torch.equal(backwards[i], read[i]) for i in first)
    other_seed, _ = build(root, prefix, str(tmp_path / "other"), 48, *extra, "--seed", "7")
    assert any(not torch.equal(other_seed[i]["tokens"], backwards[i]) for i in first)


def test_train_with_fim(fim_corpus, tmp_path):
    root, prefix = fim_corpus
    metrics = tmp_path / "metrics.jsonl"
    torchrun(1, "pretrain_dsv3.py", *flags(root, prefix, "--fim-rate", "0.1", "--fim-spm-rate", "0"),
             "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
             "--data-cache-path", tmp_path / "cache", "--metrics-jsonl", metrics)
    rows = read_metrics(metrics)
    assert [r["iteration"] for r in rows] == [1, 2] and all(math.isfinite(r["lm_loss"]) for r in rows)
    assert len(list((tmp_path / "cache").glob("*-FIMGPTDataset-train-fim_lengths.npy"))) == 1  # packed after FIM
