"""Megatron-Core linear layers whose GEMMs run DeepSeek-V3's blockwise FP8 recipe, emulated (--fp8-emulation).

Fp8ColumnParallelLinear / Fp8RowParallelLinear are megatron's ColumnParallelLinear / RowParallelLinear
with the same parameters, initialization, tensor-parallel communication and checkpoint keys; only the
matmul differs: fprop, dgrad and wgrad go through `fp8_blockwise_linear` (1×128 activation/gradient
tiles, 128×128 weight blocks, FP32 accumulation; megatron_dsv3.fp8.blockwise). The layer spec picks
them for the decoder layers that run in FP8 (megatron_dsv3.models.spec).

Scales are powers of two, as in Transformer Engine's Float8BlockScaling (the GPU recipe these flags map
to) and DeepSeek-V3's FP8 MoE dispatch (§3.3.3): re-quantizing FP8-dispatched tokens is then exact.
"""

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.multi_latent_attention import MLASelfAttention

from megatron_dsv3.fp8.blockwise import fp8_blockwise_linear

POWER_OF_TWO_SCALES = True


class Fp8EmulatedMatmul:
    """Replaces the `_forward_impl` GEMM of megatron's parallel linear layers (mixin)."""

    def _forward_impl(self, input, weight, bias, allreduce_dgrad, sequence_parallel, tp_group, **unused):
        if sequence_parallel:
            raise NotImplementedError("--fp8-emulation does not support sequence parallelism")
        if allreduce_dgrad:  # TP > 1 without SP: identity forward, all-reduce of dx backward (megatron's column layer)
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        return fp8_blockwise_linear(input, weight, bias, POWER_OF_TWO_SCALES)


class Fp8ColumnParallelLinear(Fp8EmulatedMatmul, ColumnParallelLinear):
    pass


class Fp8RowParallelLinear(Fp8EmulatedMatmul, RowParallelLinear):
    pass


class Fp8MLASelfAttention(MLASelfAttention):
    """MLASelfAttention whose q/kv down projections are FP8 too.

    megatron-core builds linear_q_down_proj / linear_kv_down_proj only from an exact list of classes
    (ColumnParallelLinear, TELinear, ...), so the spec passes ColumnParallelLinear there and they become
    Fp8ColumnParallelLinear here: same parameters and state, only the GEMM differs.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in ("linear_q_down_proj", "linear_kv_down_proj"):
            if type(getattr(self, name, None)) is ColumnParallelLinear:
                getattr(self, name).__class__ = Fp8ColumnParallelLinear
