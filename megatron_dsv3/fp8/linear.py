"""Megatron-Core linear layers whose GEMMs run DeepSeek-V3's blockwise FP8 recipe, emulated (--fp8-emulation).

Fp8ColumnParallelLinear / Fp8RowParallelLinear are megatron's ColumnParallelLinear / RowParallelLinear
(through models.torch_linear) with the same parameters, initialization, tensor-parallel communication and
checkpoint keys; only the matmul differs: fprop, dgrad and wgrad go through `fp8_blockwise_linear` (1×128
activation/gradient tiles, 128×128 weight blocks, FP32 accumulation; megatron_dsv3.fp8.blockwise). The layer
spec picks them for the decoder layers that run in FP8 (megatron_dsv3.models.spec).

Scales are powers of two, as in Transformer Engine's Float8BlockScaling (the GPU recipe these flags map
to) and DeepSeek-V3's FP8 MoE dispatch (§3.3.3): re-quantizing FP8-dispatched tokens is then exact.
DeepSeek-V3 itself rounds scales to powers of two only there (the dispatched activations, the activation
gradient before the MoE down-projection, the input of the linear after attention) and uses amax/448
elsewhere; a power-of-two scale maps a tile's amax into (224, 448] instead of onto 448, which costs
somewhat more rounding error on the largest entries (blockwise.py, `power_of_two_scales`).
"""

from megatron_dsv3.fp8.blockwise import fp8_blockwise_linear
from megatron_dsv3.models.torch_linear import TorchColumnParallelLinear, TorchRowParallelLinear
from megatron_dsv3.pipeline.weight_grad_store import SplitBackwardMatmul

POWER_OF_TWO_SCALES = True


class Fp8EmulatedMatmul(SplitBackwardMatmul):
    """Replaces the GEMMs of megatron's parallel linear layers (mixin); like the high-precision split layers,
    a DualPipe B op defers their wgrad to its W (pipeline.weight_grad_store). What they save for the wgrad, FP8 or
    the high-precision input, follows config.fp8_activation_storage (--no-fp8-activation-storage)."""

    config = None  # megatron's linear sets its TransformerConfig; without one (a bare matmul) FP8 storage is on

    def _matmul(self, input, weight, bias):
        return fp8_blockwise_linear(input, weight, bias, POWER_OF_TWO_SCALES,
                                    getattr(self.config, "fp8_activation_storage", True))


class Fp8ColumnParallelLinear(Fp8EmulatedMatmul, TorchColumnParallelLinear):
    pass


class Fp8RowParallelLinear(Fp8EmulatedMatmul, TorchRowParallelLinear):
    pass
