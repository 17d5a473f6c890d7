"""GPT pretraining datasets (megatron-core's BlendedMegatronDatasetBuilder) and the pretraining
sampler's iterator.

GPTDatasetConfig choices: create_attention_mask=False (attention is causal, the kernel builds its
mask); reset_position_ids / reset_attention_mask / eod_mask_loss = False (documents are packed and
attend across EOD, as Megatron-LM's defaults do; these three must be set, the config asserts so).

Distributed: the builder builds on global rank 0 first, then a barrier, then the other ranks read
the cached indices, so every rank must call `build_pretraining_datasets` and the cache directory
(`data_cache_path`, else `<prefix>/cache/`) must be visible to all ranks. Without a process group
it builds locally.
"""

import contextlib
import os

import torch
from torch.utils.data import default_collate
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import Split

from megatron_dsv3.data.fim import FIMGPTDataset, FIMGPTDatasetConfig


def parse_data_path(data_path) -> tuple[list[str], list[float] | None]:
    """Megatron's --data-path: "PREFIX [PREFIX ...]" (weighted by size) or "W1 PREFIX1 W2 PREFIX2 ...",
    as one string or the list argparse's nargs="+" gives. Returns (prefixes, weights or None)."""
    words = (data_path.split() if isinstance(data_path, str) else [w for item in data_path for w in item.split()])
    if not words:
        raise ValueError("--data-path is empty: give PREFIX or W1 PREFIX1 W2 PREFIX2 ...")
    is_number = [_is_float(w) for w in words]
    if not any(is_number):
        prefixes, weights = words, None
    elif len(words) % 2 == 0 and all(is_number[0::2]) and not any(is_number[1::2]):
        prefixes, weights = words[1::2], [float(w) for w in words[0::2]]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"--data-path weights must be >= 0 with a positive sum, got {weights}")
    else:
        raise ValueError(f"--data-path {' '.join(words)!r}: expected PREFIX ... or W1 PREFIX1 W2 PREFIX2 ...")
    for prefix in prefixes:
        if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
            raise FileNotFoundError(
                f"--data-path prefix {prefix!r}: {prefix}.bin/.idx not found (make them with tools/preprocess_data.py)"
            )
    return prefixes, weights


def _is_float(word: str) -> bool:
    try:
        float(word)
        return True
    except ValueError:
        return False


def build_pretraining_datasets(
    *, data_path, split, mock_data, seq_length, seed, tokenizer, train_samples, valid_samples, test_samples,
    data_cache_path=None, valid_data_path=None, test_data_path=None, fim=None,
):
    """Returns (train, valid, test); a split asked for 0 samples, or given no share by `split`, is None.
    With `valid_data_path`/`test_data_path` (Megatron's per-split blends) each split reads its own prefixes,
    the training set the whole of `data_path`, and `split` is not used. `fim` (fim.FIMSettings) rearranges
    the documents of every split before packing (data/fim.py)."""
    sizes = [train_samples, valid_samples, test_samples]
    per_split = None
    if not mock_data and (valid_data_path or test_data_path):
        per_split = [parse_data_path(p) if p else None for p in (data_path, valid_data_path, test_data_path)]
    config_class, dataset_class = (FIMGPTDatasetConfig, FIMGPTDataset) if fim else (GPTDatasetConfig, GPTDataset)
    config = config_class(
        **({"fim": fim} if fim else {}),
        random_seed=seed,
        sequence_length=seq_length,
        blend=None if mock_data or per_split else parse_data_path(data_path),
        blend_per_split=per_split,
        split=None if mock_data or per_split else split,  # mock data: the config splits its synthetic documents 1:1:1
        path_to_cache=data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    # Keep the document ranges `split` gives, but build no split nobody asked samples of.
    if per_split:
        config.blend_per_split = [None if size == 0 else blend for blend, size in zip(per_split, sizes)]
    else:
        config.split_matrix = [None if size == 0 else bounds for bounds, size in zip(config.split_matrix, sizes)]
    builder = BlendedMegatronDatasetBuilder(MockGPTDataset if mock_data else dataset_class, sizes, lambda: True, config)
    with _process_group_for(data_cache_path):
        datasets = builder.build()
    for split_, dataset, size in zip(Split, datasets, sizes):
        if size and (dataset is None or len(dataset) < size):
            raise ValueError(
                f"{split_.name} split: {size} samples asked, {0 if dataset is None else len(dataset)} available; "
                f"check --split {split!r} gives it documents"
            )
    return tuple(datasets)


@contextlib.contextmanager
def _process_group_for(data_cache_path):
    """megatron-core 0.16.1's BlendedDataset calls torch.distributed.get_rank() whenever a cache path
    is set, which fails without a process group: give a lone process a one-rank group meanwhile."""
    if data_cache_path is None or torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def pretraining_batch_indices(num_samples, micro_batch_size, data_parallel_rank, data_parallel_size, consumed_samples):
    """Megatron's pretraining sampler: global order 0..num_samples-1 from `consumed_samples`, cut into
    global micro-batches of micro_batch_size x data_parallel_size; rank r takes slice [r*mbs, (r+1)*mbs)
    of each; an incomplete last global micro-batch is dropped."""
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(f"data_parallel_rank {data_parallel_rank} outside [0, {data_parallel_size})")
    if not 0 <= consumed_samples <= num_samples:
        raise ValueError(f"consumed_samples {consumed_samples} outside the dataset's [0, {num_samples}] samples")
    global_batch = micro_batch_size * data_parallel_size
    start = data_parallel_rank * micro_batch_size
    firsts = range(consumed_samples + start, num_samples - global_batch + start + 1, global_batch)
    return (range(first, first + micro_batch_size) for first in firsts)


def build_data_iterator(dataset, micro_batch_size, data_parallel_rank, data_parallel_size, consumed_samples):
    """Yields dicts of [micro_batch_size, seq_length] tensors: tokens, labels, loss_mask, position_ids
    (and a blend's [micro_batch_size] dataset_id); ends after the dataset's last whole global micro-batch."""
    batches = pretraining_batch_indices(
        len(dataset), micro_batch_size, data_parallel_rank, data_parallel_size, consumed_samples
    )
    return (default_collate([dataset[i] for i in indices]) for indices in batches)
