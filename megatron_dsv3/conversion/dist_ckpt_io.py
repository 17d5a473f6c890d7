"""torch_dist (PyTorch DCP) checkpoints written tensor by tensor and read key by key, in one process.

megatron-core's torch_dist format is a DCP directory (`.metadata` + `__0_N.distcp`) plus `metadata.json`
(the backend) and `common.pt` (non-sharded state). `dist_checkpointing.save` needs every tensor in
memory at once; here a DCP save plan lists the chunks up front and a callback produces each one only
when the writer reaches it, so memory holds one layer, whatever the model size. torch's own writer
keeps every written tensor referenced until its file is closed, so `_StreamingWriter` replaces its
`write_data` with one that drops each tensor after writing it (same serialization, same metadata).
"""

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter, _write_item
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

COMMON_FILE = "common.pt"


def tensor_item(key: str, global_shape, offset, shape, dtype: torch.dtype) -> WriteItem:
    return WriteItem(
        index=MetadataIndex(key, torch.Size(offset)),
        type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=torch.Size(offset), sizes=torch.Size(shape)),
            properties=TensorProperties(dtype=dtype),
            size=torch.Size(global_shape),
        ),
    )


def bytes_item(key: str) -> WriteItem:
    return WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO)


def serialized(obj) -> io.BytesIO:
    """A ShardedObject's payload as megatron-core stores it (a list of the objects of that shard)."""
    buffer = io.BytesIO()
    torch.save([obj], buffer)
    buffer.seek(0)
    return buffer


class _ListedPlanner(DefaultSavePlanner):
    """Saves the listed write items; `resolve(item)` produces each one's tensor (or BytesIO) on demand."""

    def __init__(self, items: List[WriteItem], resolve: Callable[[WriteItem], object]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._items, self._resolve = items, resolve

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
        self.state_dict, self.is_coordinator = {}, is_coordinator

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self._items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        data = self._resolve(write_item)
        if isinstance(data, torch.Tensor):
            expected = tuple(write_item.tensor_data.chunk.sizes)
            if tuple(data.shape) != expected or data.dtype != write_item.tensor_data.properties.dtype:
                raise ValueError(
                    f"{write_item.index.fqn} at {tuple(write_item.index.offset)}: produced {data.dtype} "
                    f"{tuple(data.shape)}, planned {write_item.tensor_data.properties.dtype} {expected}"
                )
            data = data.detach().cpu().contiguous()
            if data.untyped_storage().nbytes() != data.nbytes:  # torch.save writes the whole storage
                data = data.clone()
        return data


class _StreamingWriter(FileSystemWriter):
    """Writes the plan's items in order into `__0_N.distcp` files of about `max_file_bytes` each."""

    def __init__(self, path, max_file_bytes: int):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1, overwrite=False)
        self.max_file_bytes = max_file_bytes

    def write_data(self, plan: SavePlan, planner) -> torch.futures.Future:
        results, stream, file_index = [], None, 0
        try:
            for item in plan.items:
                if stream is None or stream.tell() >= self.max_file_bytes:
                    if stream is not None:
                        stream.close()
                    name = f"{plan.storage_data.prefix}{file_index}.distcp"
                    stream, file_index = open(Path(self.path) / name, "wb"), file_index + 1
                data = planner.resolve_data(item)
                results.append(_write_item(self.transforms, stream, data, item, name, self.serialization_format))
                del data
        finally:
            if stream is not None:
                stream.flush()
                os.fsync(stream.fileno())
                stream.close()
        future = torch.futures.Future()
        future.set_result(results)
        return future


@contextlib.contextmanager
def _single_process():
    """DCP without a process group: no warning about it, and the original error instead of DCP's wrapper."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            yield
        except CheckpointException as e:
            failure = next(iter(e.failures.values()))
            raise (failure[0] if isinstance(failure, tuple) else failure) from None


def save_streaming(path, items: List[WriteItem], resolve, common: dict, max_file_bytes: int = 5 * 2**30) -> None:
    """A megatron torch_dist checkpoint directory at `path` holding `items`, produced by `resolve`."""
    os.makedirs(path)
    with _single_process():
        dcp.save({}, storage_writer=_StreamingWriter(path, max_file_bytes), planner=_ListedPlanner(items, resolve),
                 no_dist=True)
    torch.save(common, Path(path) / COMMON_FILE)
    save_config(CheckpointingConfig(sharded_backend="torch_dist"), str(path))


class DistCheckpointReader:
    """Tensors of a torch_dist checkpoint by key, each read whole (global shape) from its chunks."""

    def __init__(self, path):
        self.path = Path(path)
        if not (self.path / ".metadata").is_file():
            raise FileNotFoundError(f"{self.path} is not a torch_dist checkpoint (no .metadata file)")
        self._reader = FileSystemReader(str(self.path))
        metadata = self._reader.read_metadata()
        self.tensors: Dict[str, TensorStorageMetadata] = {
            k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }
        self._files = {info.relative_path for info in metadata.storage_data.values()}

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def check_files(self) -> None:
        """Every data file the metadata points into exists and is long enough."""
        metadata = self._reader.read_metadata()
        ends = {}
        for index, info in metadata.storage_data.items():
            ends[info.relative_path] = max(ends.get(info.relative_path, (0, None))[0], info.offset + info.length), index
        for name, (end, index) in sorted(ends.items()):
            file = self.path / name
            if not file.is_file():
                raise FileNotFoundError(f"{file} is missing (it holds {index.fqn!r})")
            if file.stat().st_size < end:
                raise ValueError(f"{file} is truncated: {file.stat().st_size} bytes, {index.fqn!r} needs {end}")

    def read(self, keys) -> Dict[str, torch.Tensor]:
        state = {}
        for key in keys:
            if key not in self.tensors:
                raise KeyError(f"tensor {key!r} is not in checkpoint {self.path}")
            md = self.tensors[key]
            state[key] = torch.empty(md.size, dtype=md.properties.dtype)
        with _single_process():
            dcp.load(state, storage_reader=self._reader, no_dist=True)
        return state
