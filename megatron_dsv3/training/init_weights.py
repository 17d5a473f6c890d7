"""Layout-independent initialization: the same seed gives the same model at any TP/PP/EP layout.

DeepSeek-V3 (§4.2) initializes every learnable weight from N(0, 0.006). Each weight is drawn here
from a generator seeded by its global checkpoint key and its layer/expert index (the leading axes
megatron-core prepends in the sharded state dict), then the rank keeps its own slice. Norm weights
stay 1 and the router's expert bias stays 0.
"""

import zlib

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from megatron_dsv3.checkpointing.checkpoint import sharded_metadata


def _sharded_tensors(model_chunks):
    for chunk in model_chunks:
        for item in nested_values(chunk.sharded_state_dict(metadata=sharded_metadata())):
            if isinstance(item, ShardedTensorFactory):
                yield from (t for t in nested_values(item.build()) if isinstance(t, ShardedTensor))
            elif isinstance(item, ShardedTensor):
                yield item


@torch.no_grad()
def init_weights_layout_independent(model_chunks, std: float, seed: int) -> None:
    for tensor in _sharded_tensors(model_chunks):
        if tensor.data.dim() < 2:  # norms (ones) and the expert bias (zeros)
            continue
        lead = tensor.prepend_axis_num
        index = tensor.global_offset[:lead]
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{tensor.key}:{index}".encode()))
        full = torch.empty(tensor.global_shape[lead:]).normal_(0.0, std, generator=generator)
        window = tuple(
            slice(offset, offset + size)
            for offset, size in zip(tensor.global_offset[lead:], tensor.data.shape)
        )
        tensor.data.copy_(full[window])
