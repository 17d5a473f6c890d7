"""Data layer: tokenizers, tools/preprocess_data.py, blended GPT datasets and the pretraining iterator.
References: the `tokenizers` library's own encoding, the corpus documents, and the sampler's formula."""

import importlib.util
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from conftest import byte_level_bpe
from megatron_dsv3.data.datasets import build_data_iterator, build_pretraining_datasets, parse_data_path
from megatron_dsv3.data.tokenizer import build_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


preprocess_data = load_tool("preprocess_data")
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "pack my box with five dozen liquor jugs",
    "how vexingly quick daft zebras jump",
    "sphinx of black quartz, judge my vow",
]
EOD = "<|endoftext|>"
SEQ = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained offline, two JSONL corpora, their documents."""
    root = tmp_path_factory.mktemp("data")
    byte_level_bpe(SENTENCES, 300, [EOD]).save(str(root / "tokenizer.json"))
    rng = random.Random(0)
    documents = {}
    for name in ("a", "b"):
        documents[name] = [" ".join(rng.choices(SENTENCES, k=rng.randint(1, 4))) for _ in range(40)]
        with open(root / f"{name}.jsonl", "w") as stream:
            for text in documents[name]:
                stream.write(json.dumps({"text": text, "id": 0}) + "\n")
    return root, documents


def preprocess_args(root, name, workers, input=None, output_prefix=None):
    return [
        "--input", str(input or root / f"{name}.jsonl"), "--json-keys", "text",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(root / "tokenizer.json"),
        "--output-prefix", str(output_prefix or root / name), "--append-eod", "--workers", str(workers),
    ]


@pytest.fixture(scope="module")
def prefixes(corpus):
    """a: through the CLI in a subprocess with 2 workers; b: in-process, 1 worker."""
    root, _ = corpus
    subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), *preprocess_args(root, "a", 2)],
        check=True, capture_output=True, cwd=REPO,
    )
    preprocess_data.main(preprocess_args(root, "b", 1))
    return {name: str(root / f"{name}_text_document") for name in ("a", "b")}


def test_preprocess_matches_tokenizer(corpus, prefixes):
    from tokenizers import Tokenizer

    root, documents = corpus
    reference = Tokenizer.from_file(str(root / "tokenizer.json"))
    eod = reference.token_to_id(EOD)
    for name, prefix in prefixes.items():
        dataset = IndexedDataset(prefix)
        assert dataset.index.dtype.__name__ == "uint16"  # vocab 300 < 65500, Megatron's optimal_dtype
        assert len(dataset) == len(documents[name])
        for text, ids in zip(documents[name], dataset):
            assert ids.tolist() == reference.encode(text).ids + [eod]


def test_preprocess_errors(corpus, tmp_path):
    root, _ = corpus
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b"}\n\n{"txt": "c"}\n')
    with pytest.raises(SystemExit, match=r"bad\.jsonl:3: no key 'text'"):
        preprocess_data.main(preprocess_args(root, "a", 1, input=bad, output_prefix=tmp_path / "out"))
    with pytest.raises(SystemExit):  # argparse: "--input ... not found", exit status 2
        preprocess_data.main(preprocess_args(root, "a", 1, input=tmp_path / "missing.jsonl"))


def test_tokenizers(corpus):
    from tokenizers import Tokenizer

    root, _ = corpus
    null = build_tokenizer("NullTokenizer", vocab_size=100)
    assert (null.vocab_size, null.eod) == (100, 99)
    assert null.tokenize("5 17  3\n42") == [5, 17, 3, 42]
    assert null.detokenize([5, 17]) == "5 17"
    hf = build_tokenizer("HuggingFaceTokenizer", str(root / "tokenizer.json"))
    reference = Tokenizer.from_file(str(root / "tokenizer.json"))
    assert (hf.vocab_size, hf.eod) == (reference.get_vocab_size(), reference.token_to_id(EOD))
    assert hf.tokenize(SENTENCES[3]) == reference.encode(SENTENCES[3]).ids
    assert hf.detokenize(hf.tokenize(SENTENCES[3])) == SENTENCES[3]
    with pytest.raises(ValueError, match="HuggingFaceTokenizer, NullTokenizer"):
        build_tokenizer("GPT2BPETokenizer")
    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer", str(root / "nope.json"))


def test_parse_data_path(prefixes):
    a, b = prefixes["a"], prefixes["b"]
    assert parse_data_path([f"0.3 {a}", "0.7", b]) == ([a, b], [0.3, 0.7])
    assert parse_data_path(f"{a} {b}") == ([a, b], None)
    with pytest.raises(ValueError, match="--data-path"):
        parse_data_path(["0.3", a, b])
    with pytest.raises(FileNotFoundError, match="preprocess_data"):
        parse_data_path("1 /nonexistent/prefix")


def build_blend(prefixes, tokenizer, cache, train_samples):
    train, valid, test = build_pretraining_datasets(
        data_path=[f"0.3 {prefixes['a']}", f"0.7 {prefixes['b']}"], split="90,10,0", mock_data=False,
        seq_length=SEQ, seed=1234, tokenizer=tokenizer, train_samples=train_samples, valid_samples=0,
        test_samples=0, data_cache_path=cache,
    )
    assert valid is None and test is None
    return train


def test_blended_dataset(corpus, prefixes, tmp_path):
    root, documents = corpus
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(root / "tokenizer.json"))
    train = build_blend(prefixes, tokenizer, str(tmp_path / "cache"), 100)
    assert len(train) == 100
    whole_documents = {tuple(tokenizer.tokenize(t)) for docs in documents.values() for t in docs}
    counts = [0, 0]
    for i in range(len(train)):
        sample = train[i]
        assert sample["tokens"].shape == sample["labels"].shape == sample["position_ids"].shape == (SEQ,)
        assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
        assert torch.equal(sample["position_ids"], torch.arange(SEQ))
        assert torch.all(sample["loss_mask"] == 1)
        # any document lying whole between two EODs of the sample is one of the corpus's documents
        text = torch.cat([sample["tokens"], sample["labels"][-1:]]).tolist()
        ends = [j for j, t in enumerate(text) if t == tokenizer.eod]
        for begin, end in zip(ends, ends[1:]):
            assert tuple(text[begin + 1:end]) in whole_documents
        counts[int(sample["dataset_id"])] += 1
    assert abs(counts[1] - 70) <= 1  # Megatron's blending tracks the 0.3/0.7 weights to within a sample
    # the cached indices (and a rebuild without a cache) give the same samples
    for cache in (str(tmp_path / "cache"), None):
        again = build_blend(prefixes, tokenizer, cache, 100)
        assert all(torch.equal(again[i]["tokens"], train[i]["tokens"]) for i in range(0, 100, 7))


def test_mock_data_with_null_tokenizer():
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=128)
    train, valid, test = build_pretraining_datasets(
        data_path=None, split="969,30,1", mock_data=True, seq_length=SEQ, seed=1, tokenizer=tokenizer,
        train_samples=64, valid_samples=8, test_samples=0,
    )
    assert test is None and len(train) >= 64 and len(valid) >= 8
    batch = next(build_data_iterator(train, 4, 0, 1, 0))
    tokens, labels = batch["tokens"], batch["labels"]
    assert tokens.shape == labels.shape == (4, SEQ) and tokens.max() < 128
    # mock documents are 1, 2, ..., L-1 (mod vocab) then EOD
    follows = (labels == (tokens + 1) % 128) | (labels == tokenizer.eod) | (tokens == tokenizer.eod)
    assert follows.all()


def test_iterator_data_parallel_and_resume(corpus, prefixes, tmp_path):
    root, _ = corpus
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(root / "tokenizer.json"))
    train = build_blend(prefixes, tokenizer, str(tmp_path / "cache"), 50)
    mbs, dp = 2, 2
    single = list(build_data_iterator(train, mbs * dp, 0, 1, 0))
    assert len(single) == len(train) // (mbs * dp)  # the incomplete last global micro-batch is dropped
    for step, batch in enumerate(single):  # global order: sample step*4 + j
        expected = torch.stack([train[step * mbs * dp + j]["tokens"] for j in range(mbs * dp)])
        assert torch.equal(batch["tokens"], expected)
    ranks = [list(build_data_iterator(train, mbs, rank, dp, 0)) for rank in range(dp)]
    for step, batch in enumerate(single):
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert ranks[0][step][key].shape == (mbs, SEQ)
            assert torch.equal(torch.cat([ranks[0][step][key], ranks[1][step][key]]), batch[key])
    consumed = 3 * mbs * dp
    resumed = [list(build_data_iterator(train, mbs, rank, dp, consumed)) for rank in range(dp)]
    for rank in range(dp):
        assert len(resumed[rank]) == len(ranks[rank]) - 3
        for a, b in zip(resumed[rank], ranks[rank][3:]):
            assert torch.equal(a["tokens"], b["tokens"])
    with pytest.raises(ValueError, match="data_parallel_rank"):
        build_data_iterator(train, mbs, 2, dp, 0)
