"""DeepSeekMoE layer: megatron-core's MoELayer (shared + fine-grained routed SwiGLU experts) with the
router and token dispatcher chosen by our spec instead of by CUDA-only defaults."""

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_dsv3.moe.token_dispatcher import AllToAllTokenDispatcher


class DSv3MoELayer(MoELayer):
    def __init__(
        self,
        config,
        submodules=None,
        layer_number=None,
        pg_collection=None,
        token_dispatcher=AllToAllTokenDispatcher,
        fp8_dispatch=False,
    ):
        pg_collection = pg_collection or get_default_pg_collection()
        super().__init__(config, submodules, layer_number, pg_collection)
        self.token_dispatcher = token_dispatcher(
            self.num_local_experts, self.local_expert_indices, config=config, pg_collection=pg_collection,
            fp8_dispatch=fp8_dispatch,
        )
