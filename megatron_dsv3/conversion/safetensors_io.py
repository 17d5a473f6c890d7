"""Streaming safetensors checkpoints: a layer-by-layer reader and an atomic sharded writer.

Reader: `model.safetensors.index.json` (or a single `model.safetensors`); every shard is checked up front
(exists, file size = 8 + header + data as its header declares); tensors are read lazily per layer with
`safe_open`, and block-FP8 weights are dequantized with their `<name>_scale_inv` as they are read.
Writer: shards of at most `max_shard_bytes` go to a temporary sibling directory that is renamed onto the
output directory only after the index is written, so a failed run never leaves a complete-looking output.
"""

import json
import os
import shutil
import struct
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_dsv3.conversion import fp8_blocks
from megatron_dsv3.conversion.fp8_blocks import dequantize_fp8_block
from megatron_dsv3.conversion.hf_config import hf_fp8_block_size
from megatron_dsv3.conversion.name_mapping import SCALE_INV_SUFFIX, hf_layer_index

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _safetensors_header(path: Path) -> dict:
    """The header of a safetensors file, after checking the file holds all the bytes it declares."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint shard {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"checkpoint shard {path} is truncated ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if 8 + header_len > size:
            raise ValueError(f"checkpoint shard {path} is truncated: header needs {header_len} bytes, file has {size}")
        header = json.loads(f.read(header_len))
    data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + header_len + data_end:
        needed = 8 + header_len + data_end
        raise ValueError(f"checkpoint shard {path} is truncated: {size} bytes, its header needs {needed}")
    return header


class HFCheckpointReader:
    """Tensors of a HF checkpoint directory, read shard-lazily and grouped by decoder layer.

    FP8 weights with a `_scale_inv` are returned dequantized to `dequant_dtype` unless `keep_fp8`, in
    which case both tensors are returned as stored. The block size comes from config.json's
    quantization_config unless `fp8_block` is given.
    """

    def __init__(self, path, *, keep_fp8: bool = False, fp8_block: Optional[Tuple[int, int]] = None,
                 dequant_dtype: torch.dtype = torch.float32):
        self.path = Path(path)
        self.keep_fp8, self.dequant_dtype = keep_fp8, dequant_dtype
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.path} does not exist")
        config_file = self.path / "config.json"
        self.config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        self.weight_map = self._weight_map()
        scales = [k for k in self.weight_map if k.endswith(SCALE_INV_SUFFIX)]
        self.fp8_block = fp8_block or hf_fp8_block_size(self.config)
        if scales and not keep_fp8 and self.fp8_block is None:
            raise ValueError(
                f"{self.path} holds FP8 scales (e.g. {scales[0]}) but config.json has no quantization_config "
                "weight_block_size: pass fp8_block=(128, 128)"
            )
        for scale in scales:
            weight = scale[: -len(SCALE_INV_SUFFIX)]
            if weight not in self.weight_map:
                raise KeyError(f"{scale} has no weight {weight!r} in {self.path}")
            block = self.fp8_block or fp8_blocks.DEFAULT_BLOCK
            expected = fp8_blocks._scale_shape(self.header(weight)["shape"], block)
            if tuple(self.header(scale)["shape"]) != expected:
                raise ValueError(f"{self.path / self.weight_map[scale]}: {scale} has shape "
                                 f"{tuple(self.header(scale)['shape'])} but its {tuple(self.header(weight)['shape'])} "
                                 f"weight with {tuple(block)} blocks needs {expected}")

    def _weight_map(self) -> Dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.path / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise FileNotFoundError(f"{self.path} has neither {INDEX_FILE} nor {SINGLE_FILE}")
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
        headers = {f: _safetensors_header(self.path / f) for f in files}
        self._headers = headers
        if weight_map is None:
            return {k: SINGLE_FILE for k in headers[SINGLE_FILE] if k != "__metadata__"}
        for name, file in weight_map.items():
            if name not in headers[file]:
                raise KeyError(f"{INDEX_FILE} places {name!r} in {file}, which does not hold it")
        return weight_map

    def header(self, name: str) -> dict:
        """The safetensors header entry of `name` as stored: {"dtype": "BF16", "shape": [...], ...}."""
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} is not in checkpoint {self.path}")
        return self._headers[self.weight_map[name]][name]

    def keys(self) -> List[str]:
        """Tensor names as returned (the `_scale_inv` tensors only with keep_fp8)."""
        return [k for k in self.weight_map if self.keep_fp8 or not k.endswith(SCALE_INV_SUFFIX)]

    def read(self, names) -> Dict[str, torch.Tensor]:
        """The named tensors, opening each shard once and reading only those tensors."""
        wanted = list(names)
        needed = set(wanted)
        if not self.keep_fp8:
            needed |= {n + SCALE_INV_SUFFIX for n in wanted if n + SCALE_INV_SUFFIX in self.weight_map}
        by_file = defaultdict(list)
        for name in needed:
            if name not in self.weight_map:
                raise KeyError(f"tensor {name!r} is not in checkpoint {self.path}")
            by_file[self.weight_map[name]].append(name)
        raw = {}
        for file, file_names in sorted(by_file.items()):
            with safe_open(self.path / file, framework="pt") as shard:
                raw.update({n: shard.get_tensor(n) for n in file_names})
        return {n: self._materialize(n, raw) for n in wanted}

    def _materialize(self, name: str, raw: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Pops what it uses, so the stored FP8 tensors are freed as they are dequantized."""
        tensor = raw.pop(name)
        scale = None if self.keep_fp8 else raw.pop(name + SCALE_INV_SUFFIX, None)
        if scale is None:
            return tensor
        return dequantize_fp8_block(tensor, scale, self.fp8_block, self.dequant_dtype)

    def layer_groups(self) -> Iterator[Tuple[Optional[int], Dict[str, torch.Tensor]]]:
        """(None, non-layer tensors), then (i, tensors of model.layers.i) for increasing i."""
        groups = defaultdict(list)
        for name in self.keys():
            groups[hf_layer_index(name)].append(name)
        for layer in sorted(groups, key=lambda i: -1 if i is None else i):
            yield layer, self.read(groups[layer])


def _check_empty_output(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"--output {out_dir} is a file, not a directory: give a new directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"output directory {out_dir} is not empty: remove it or pick another")


class ShardedCheckpointWriter:
    """Writes `model-0000N-of-0000M.safetensors` + index (+ extra files) atomically into `out_dir`.

    Use as a context manager: on an exception the temporary directory is removed and `out_dir` is not
    created. Tensors are buffered until a shard would exceed `max_shard_bytes`.
    """

    def __init__(self, out_dir, max_shard_bytes: int = 5 * 2**30):
        self.out_dir = Path(out_dir)
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        _check_empty_output(self.out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.tmp_dir = self.out_dir.parent / f".{self.out_dir.name}.partial-{os.getpid()}"
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True)
        self._buffer: Dict[str, torch.Tensor] = {}
        self._buffer_storages = set()
        self._buffer_bytes = 0
        self._shards: List[List[str]] = []
        self._names = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise KeyError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = self._owned(tensor)
        self._names.add(name)
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _owned(self, tensor: torch.Tensor) -> torch.Tensor:
        """safetensors refuses views and tensors sharing storage: copy those."""
        tensor = tensor.detach().cpu()
        storage = tensor.untyped_storage()
        shared = storage.data_ptr() in self._buffer_storages
        if shared or not tensor.is_contiguous() or storage.nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        self._buffer_storages.add(tensor.untyped_storage().data_ptr())
        return tensor

    def _flush(self) -> None:
        save_file(self._buffer, self.tmp_dir / f"shard-{len(self._shards)}.safetensors", metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_storages, self._buffer_bytes = {}, set(), 0

    def add_file(self, name: str, content) -> None:
        """An extra file (config.json, tokenizer files) written along with the shards."""
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(self.tmp_dir / name, mode) as f:
            f.write(content)

    def close(self) -> None:
        if self._buffer or not self._shards:
            self._flush()
        count, weight_map = len(self._shards), {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.tmp_dir / f"shard-{i}.safetensors", self.tmp_dir / final)
            weight_map.update({n: final for n in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        self.add_file(INDEX_FILE, json.dumps(index, indent=2) + "\n")
        if self.out_dir.exists():
            self.out_dir.rmdir()  # empty (checked at start)
        os.replace(self.tmp_dir, self.out_dir)

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._buffer, self._buffer_storages = {}, set()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
            return False
        try:
            self.close()
        except BaseException:
            self.abort()
            raise
        return False
