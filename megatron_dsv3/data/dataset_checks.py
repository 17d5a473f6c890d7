"""A --data-path's files, checked before the model is built: the index header (megatron-core's
MMIDIDX format: magic, version 1, dtype code, sequence and document counts, then int32 lengths and
int64 byte pointers), the .bin size it implies, and the largest token id against the vocabulary.

The largest id comes from `<prefix>.stats.json`, which tools/preprocess_data.py writes beside the
files (and which is trusted only while the .bin keeps its size), else from one scan of the .bin.
"""

import json
import os
import struct

import numpy
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

from megatron_dsv3.data.datasets import parse_data_path

SCAN_TOKENS = 1 << 24


def stats_path(prefix: str) -> str:
    return prefix + ".stats.json"


def write_stats(prefix: str, max_id: int, vocab_size: int) -> None:
    with open(stats_path(prefix), "w") as f:
        json.dump({"max_id": int(max_id), "vocab_size": int(vocab_size),
                   "bin_bytes": os.path.getsize(prefix + ".bin")}, f)


def read_index_header(prefix: str):
    """(dtype, bytes the .bin must have), or ValueError naming the .idx."""
    idx = prefix + ".idx"
    with open(idx, "rb") as f:
        head = f.read(len(_INDEX_HEADER) + 8 + 1 + 16)
        if len(head) < len(_INDEX_HEADER) + 25 or head[: len(_INDEX_HEADER)] != _INDEX_HEADER:
            raise ValueError(f"--data-path {prefix}: {idx} is not a megatron-core index (bad header); "
                             "rebuild it with tools/preprocess_data.py")
        version, code, sequences, documents = struct.unpack("<QBQQ", head[len(_INDEX_HEADER):])
        try:
            dtype = DType.dtype_from_code(code)
        except (KeyError, ValueError):
            dtype = None
        if version != 1 or dtype is None:
            raise ValueError(f"--data-path {prefix}: {idx} has version {version}, dtype code {code}; "
                             "rebuild it with tools/preprocess_data.py")
        expected = len(_INDEX_HEADER) + 25 + sequences * 12 + documents * 8
        if os.path.getsize(idx) != expected:
            raise ValueError(f"--data-path {prefix}: {idx} is truncated or damaged ({os.path.getsize(idx)} bytes, "
                             f"its header implies {expected}); rebuild it")
        if sequences == 0:
            raise ValueError(f"--data-path {prefix}: {idx} holds no documents")
        f.seek(len(_INDEX_HEADER) + 25 + (sequences - 1) * 4)
        last_length = struct.unpack("<i", f.read(4))[0]
        f.seek(len(_INDEX_HEADER) + 25 + sequences * 4 + (sequences - 1) * 8)
        last_pointer = struct.unpack("<q", f.read(8))[0]
    return dtype, last_pointer + last_length * numpy.dtype(dtype).itemsize


def max_token_id(prefix: str, dtype) -> int:
    size = os.path.getsize(prefix + ".bin")
    try:
        with open(stats_path(prefix)) as f:
            stats = json.load(f)
        if stats.get("bin_bytes") == size:
            return int(stats["max_id"])
    except (OSError, ValueError, KeyError):
        pass
    tokens = numpy.memmap(prefix + ".bin", dtype=dtype, mode="r")
    return max(int(tokens[i:i + SCAN_TOKENS].max()) for i in range(0, len(tokens), SCAN_TOKENS))


def check_data_path(data_path, vocab_size: int) -> None:
    prefixes, _ = parse_data_path(data_path)
    for prefix in prefixes:
        dtype, needed = read_index_header(prefix)
        size = os.path.getsize(prefix + ".bin")
        if size != needed:
            raise ValueError(f"--data-path {prefix}: {prefix}.bin has {size} bytes but its index describes {needed}; "
                             "the pair is truncated or mismatched: rebuild it")
        largest = max_token_id(prefix, dtype)
        if largest >= vocab_size:
            raise ValueError(f"--data-path {prefix}: token id {largest} ≥ vocabulary size {vocab_size} "
                             "(--vocab-size / the tokenizer); tokenize with the model's tokenizer")
