"""Build one pipeline stage (or virtual stage) of the DeepSeek-V3 GPTModel."""

import logging

import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear

from megatron_dsv3 import platform
from megatron_dsv3.models.spec import decoder_block_spec, mtp_block_spec
from megatron_dsv3.models.torch_linear import TorchColumnParallelLinear
from megatron_dsv3.moe.token_dispatcher import AllToAllTokenDispatcher


# megatron-core warns about every MLP spec whose module it does not know; our MoE layer finds its
# process groups itself, so the warning (one per MoE layer) says nothing useful.
logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(
    lambda record: "Unknown MLP type" not in record.getMessage()
)


class DSv3GPTModel(GPTModel):
    """megatron-core's GPTModel. Without tensor parallelism its LM and MTP losses are torch's cross-entropy over the
    FP32 logits: the same loss as megatron-core's vocab-parallel one, which all-reduces three times over the
    tensor-parallel group even when that group is one rank. The output head, which megatron-core builds as a
    ColumnParallelLinear whatever the spec, computes as models.torch_linear's (its local GEMM without TP). On a CPU
    host its forward runs outside the platform's CUDA-to-CPU mode (platform.cpu_mapping_suspended)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if type(getattr(self, "output_layer", None)) is ColumnParallelLinear:
            self.output_layer.__class__ = TorchColumnParallelLinear

    def forward(self, *args, **kwargs):
        with platform.cpu_mapping_suspended():
            return super().forward(*args, **kwargs)

    def compute_language_model_loss(self, labels, logits):
        if self.config.cross_entropy_loss_fusion or self.pg_collection.tp.size() > 1:
            return super().compute_language_model_loss(labels, logits)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.t().flatten(), reduction="none")
        return loss.view(logits.shape[:2]).t().contiguous()  # [s, b] -> [b, s]


def build_model(
    config,
    vocab_size: int,
    max_sequence_length: int,
    *,
    pre_process=None,
    post_process=None,
    pp_rank=None,
    vp_stage=None,
    token_dispatcher=AllToAllTokenDispatcher,
) -> DSv3GPTModel:
    if pp_rank is None:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return DSv3GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, pp_rank, vp_stage, token_dispatcher),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        mtp_block_spec=mtp_block_spec(config, pp_rank, vp_stage, token_dispatcher),
        vp_stage=vp_stage,
    )
