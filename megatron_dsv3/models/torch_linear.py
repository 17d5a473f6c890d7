"""megatron-core's ColumnParallelLinear / RowParallelLinear computing y = x·Wᵀ + b as one local GEMM (torch's
linear, one C++ autograd node) whenever the layer has no communication of its own to run.

megatron-core's forward wraps its GEMM in Python autograd functions for the tensor-parallel regions (identity
forward, all-reduce of dL/dx; the row layer's all-reduce of y) and computes it in another
(LinearWithGradAccumulationAndAsyncCommunication: sequence parallelism, fused dL/dW accumulation into main_grad,
deferred embedding wgrad). With a tensor-parallel group of one rank (DeepSeek-V3 trains with TP = 1), no sequence
parallelism, no gradient_accumulation_fusion (this project never turns it on) and no CPU offloading, all of that
is the identity around F.linear, paid in Python per layer per micro-batch in both directions. Then `forward` is
`_matmul` (F.linear here; the B/W-split and FP8-emulated linears override `_matmul` with their GEMMs); otherwise
it is megatron-core's. dL/dW reaches `param.grad` either way, which megatron's DDP hook adds into main_grad.
Same parameters and state, so checkpoints do not depend on the class.
"""

import torch.nn.functional as F
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear


class LocalMatmul:
    """Mixin: the local forward of a parallel linear (see the module docstring)."""

    def _matmul(self, input, weight, bias):
        return F.linear(input, weight, bias)

    def _runs_locally(self) -> bool:
        tp = self.tp_group
        return ((tp is None or tp.size() == 1) and not self.sequence_parallel and not self.gradient_accumulation_fusion
                and not self.config.defer_embedding_wgrad_compute and self.config._cpu_offloading_context is None)

    def _local_forward(self, input, weight):
        """(output, bias left to add), as megatron's parallel linears return them."""
        if self.skip_bias_add:
            return self._matmul(input, weight, None), self.bias
        return self._matmul(input, weight, self.bias), None


class TorchColumnParallelLinear(LocalMatmul, ColumnParallelLinear):
    def forward(self, input_, weight=None, runtime_gather_output=None):
        if self._runs_locally():
            return self._local_forward(input_, self.weight if weight is None else weight)
        return super().forward(input_, weight, runtime_gather_output)


class TorchRowParallelLinear(LocalMatmul, RowParallelLinear):
    def forward(self, input_):
        if self._runs_locally():
            return self._local_forward(input_, self.weight)
        return super().forward(input_)
