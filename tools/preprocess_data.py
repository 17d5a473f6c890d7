"""Tokenize a JSONL corpus into megatron-core indexed datasets (Megatron-LM's preprocess_data.py CLI).

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model /path/tokenizer.json \\
        --output-prefix data/corpus --append-eod --workers 8

writes data/corpus_text_document.{bin,idx} per key; pass that prefix to --data-path. The input is
streamed: memory is bounded by the chunks in flight and the index (12 bytes a document), not the
file size.
"""

import argparse
import collections
import itertools
import json
import multiprocessing
import os
import sys
import time

import numpy
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder  # noqa: E402

from megatron_dsv3.training.input_checks import ArgumentParser  # noqa: E402
from megatron_dsv3.data.dataset_checks import write_stats  # noqa: E402
from megatron_dsv3.data.tokenizer import TOKENIZER_TYPES, build_tokenizer  # noqa: E402


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="JSONL file, one JSON object per line")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="keys whose strings to tokenize")
    parser.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    parser.add_argument("--tokenizer-model", default=None, help="tokenizer.json or its directory")
    parser.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer only")
    parser.add_argument("--append-eod", action="store_true", help="end each document with the EOD token")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--chunk-size", type=int, default=64, help="lines handed to a worker at a time")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.input):
        parser.error(f"--input {args.input} not found")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    return args


class Encoder:
    """Per-process tokenizer: JSON line -> {key: token ids} (built once per worker by `initializer`)."""

    def __init__(self, args):
        self.args = args

    def initializer(self):
        Encoder.tokenizer = build_tokenizer(self.args.tokenizer_type, self.args.tokenizer_model, self.args.vocab_size)

    def encode(self, numbered_line):
        line_number, line = numbered_line
        try:
            document = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.args.input}:{line_number}: not valid JSON ({error})") from None
        if not isinstance(document, dict):
            raise ValueError(f"{self.args.input}:{line_number}: a JSON {type(document).__name__}, not an object")
        ids = {}
        for key in self.args.json_keys:
            if key not in document:
                raise ValueError(
                    f"{self.args.input}:{line_number}: no key {key!r} (--json-keys {' '.join(self.args.json_keys)})"
                )
            if not isinstance(document[key], str):
                raise ValueError(f"{self.args.input}:{line_number}: {key!r} holds a {type(document[key]).__name__}, "
                                 "not a string")
            try:
                ids[key] = Encoder.tokenizer.tokenize(document[key])
            except ValueError as error:  # NullTokenizer: a word that is not an integer
                raise ValueError(f"{self.args.input}:{line_number}: {key!r} does not tokenize ({error})") from None
            bad = [i for i in ids[key] if not 0 <= i < Encoder.tokenizer.vocab_size]
            if bad:
                raise ValueError(f"{self.args.input}:{line_number}: token id {bad[0]} in {key!r} is outside the "
                                 f"vocabulary [0, {Encoder.tokenizer.vocab_size}) (--vocab-size / --tokenizer-model)")
            if self.args.append_eod:
                ids[key].append(Encoder.tokenizer.eod)
        return ids, len(line.encode("utf-8"))

    def encode_chunk(self, numbered_lines):
        return [self.encode(numbered_line) for numbered_line in numbered_lines]


def numbered_lines(path):
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if line.strip():
                yield number, line


def encoded_documents(args, encoder):
    """(ids per key, bytes read) per line, in file order. With workers, at most 2 chunks per worker
    are in flight (a Pool.imap would read the whole file ahead into its task queue)."""
    lines = numbered_lines(args.input)
    if args.workers == 1:
        yield from map(encoder.encode, lines)
        return
    with multiprocessing.get_context("fork").Pool(args.workers, initializer=encoder.initializer) as pool:
        pending = collections.deque()
        while chunk := list(itertools.islice(lines, args.chunk_size)):
            pending.append(pool.apply_async(encoder.encode_chunk, (chunk,)))
            if len(pending) > 2 * args.workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def main(argv=None):
    args = parse_args(argv)
    encoder = Encoder(args)
    try:
        encoder.initializer()
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    dtype = DType.optimal_dtype(Encoder.tokenizer.vocab_size)
    assert numpy.iinfo(dtype).max >= Encoder.tokenizer.vocab_size - 1  # every checked id fits
    if not any(True for _ in numbered_lines(args.input)):
        raise SystemExit(f"error: --input {args.input}: no documents (the file is empty or blank)")
    output_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(output_dir, exist_ok=True)
    prefixes = {key: f"{args.output_prefix}_{key}_document" for key in args.json_keys}
    # written under .partial names, renamed when complete: a failed run leaves earlier outputs as they were
    builders = {key: IndexedDatasetBuilder(prefix + ".bin.partial", dtype=dtype) for key, prefix in prefixes.items()}

    start, total_bytes, max_id = time.time(), 0, {key: -1 for key in args.json_keys}
    try:
        with tqdm(encoded_documents(args, encoder), unit="docs", file=sys.stderr) as progress:
            for ids, num_bytes in progress:
                for key, tokens in ids.items():
                    if tokens:  # an empty document would be a zero-length sequence
                        builders[key].add_document(numpy.asarray(tokens), [len(tokens)])
                        max_id[key] = max(max_id[key], max(tokens))
                total_bytes += num_bytes
                megabytes_per_second = total_bytes / 2**20 / max(time.time() - start, 1e-9)
                progress.set_postfix_str(f"{megabytes_per_second:.2f} MB/s", refresh=False)
    except ValueError as error:
        for prefix in prefixes.values():
            os.remove(prefix + ".bin.partial")
        raise SystemExit(f"error: {error}") from None
    for key, prefix in prefixes.items():
        builders[key].finalize(prefix + ".idx.partial")
        os.replace(prefix + ".bin.partial", prefix + ".bin")
        os.replace(prefix + ".idx.partial", prefix + ".idx")
        write_stats(prefix, max_id[key], Encoder.tokenizer.vocab_size)
        print(f"wrote {prefix}.bin/.idx ({numpy.dtype(dtype).name})", file=sys.stderr)


if __name__ == "__main__":
    main()
