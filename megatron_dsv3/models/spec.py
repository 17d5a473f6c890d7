"""DeepSeek-V3 layer specs for megatron-core's GPTModel (what is built; the modules do the math).

Layer i: RMSNorm -> MLA -> residual -> RMSNorm -> (SwiGLU MLP if i < first_k_dense else DeepSeekMoE)
-> residual. MTP: megatron-core's MultiTokenPredictionLayer around an MoE layer:
h' = Layer(eh_proj(cat[enorm(emb(t+1)), hnorm(h)])), sharing embedding and output head.
"""

from typing import NamedTuple

import torch

from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.multi_latent_attention import (
    MLASelfAttention,
    MLASelfAttentionSubmodules,
)
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    MultiTokenPredictionLayerSubmodules,
    get_mtp_num_layers_to_build,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear

from megatron_dsv3.fp8.linear import Fp8ColumnParallelLinear, Fp8RowParallelLinear
from megatron_dsv3.fp8.recipes import layer_uses_fp8
from megatron_dsv3.models.mla_core_attention import MLACoreAttention
from megatron_dsv3.models.rms_norm import RMSNorm, transformer_engine_norm
from megatron_dsv3.models.torch_linear import TorchColumnParallelLinear, TorchRowParallelLinear
from megatron_dsv3.moe.grouped_experts import GroupedExperts, grouped_mm_supported
from megatron_dsv3.moe.moe_layer import DSv3MoELayer
from megatron_dsv3.moe.router import DSv3Router
from megatron_dsv3.moe.token_dispatcher import AllToAllTokenDispatcher
from megatron_dsv3.pipeline.weight_grad_store import SplitColumnParallelLinear, SplitRowParallelLinear


class LinearClasses(NamedTuple):
    column: type
    row: type


HIGH_PRECISION = LinearClasses(TorchColumnParallelLinear, TorchRowParallelLinear)
EMULATED_FP8 = LinearClasses(Fp8ColumnParallelLinear, Fp8RowParallelLinear)
SPLIT_BACKWARD = LinearClasses(SplitColumnParallelLinear, SplitRowParallelLinear)


def linear_classes(config, fp8: bool) -> LinearClasses:
    """The linear layers of a decoder layer that runs in FP8 (`fp8`) or not.

    Megatron's FP8 (--fp8-format on GPUs) uses Transformer Engine's everywhere: megatron-core's
    TransformerBlock enters TE's fp8_autocast around the FP8 layers only, so TE runs the others in
    BF16. --fp8-emulation (config.fp8 off) gives the FP8 layers the emulated FP8 linear classes.
    Embedding, output head, router, norms and attention core never use these (DeepSeek-V3 §3.3.1).

    DualPipe/DualPipeV (config.split_weight_grad) defer the weight-gradients of these linears from their B ops
    to W ops (pipeline.weight_grad_store): the emulated FP8 classes always can, the high-precision ones are
    swapped for SPLIT_BACKWARD. Transformer Engine's keep them in B (correct gradients, nothing deferred).
    """
    if config.fp8:
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

        return LinearClasses(TEColumnParallelLinear, TERowParallelLinear)
    if fp8:
        return EMULATED_FP8
    return SPLIT_BACKWARD if config.split_weight_grad else HIGH_PRECISION


def _swiglu_mlp(linear: LinearClasses) -> MLPSubmodules:
    return MLPSubmodules(linear_fc1=linear.column, linear_fc2=linear.row)


class MLASelfAttentionWithDownProj(MLASelfAttention):
    """MLASelfAttention whose q/kv down projections are `down_proj`, one of our ColumnParallelLinear subclasses
    (every LinearClasses here but Transformer Engine's).

    megatron-core builds linear_q_down_proj / linear_kv_down_proj only from an exact list of classes
    (ColumnParallelLinear, TELinear, ...), so the spec passes ColumnParallelLinear there and they become
    `down_proj` here: same parameters and state, only the GEMMs differ.
    """

    def __init__(self, *args, down_proj: type, **kwargs):
        super().__init__(*args, **kwargs)
        for name in ("linear_q_down_proj", "linear_kv_down_proj"):
            if type(getattr(self, name, None)) is ColumnParallelLinear:
                getattr(self, name).__class__ = down_proj


def mla_spec(linear: LinearClasses = HIGH_PRECISION) -> ModuleSpec:
    # megatron's exact-class check rejects our subclasses (see above)
    ours = issubclass(linear.column, ColumnParallelLinear) and linear.column is not ColumnParallelLinear
    return ModuleSpec(
        module=MLASelfAttentionWithDownProj if ours else MLASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal, **({"down_proj": linear.column} if ours else {})},
        submodules=MLASelfAttentionSubmodules(
            linear_q_proj=linear.column,
            linear_q_down_proj=ColumnParallelLinear if ours else linear.column,
            linear_q_up_proj=linear.column,
            linear_kv_down_proj=ColumnParallelLinear if ours else linear.column,
            linear_kv_up_proj=linear.column,
            core_attention=MLACoreAttention,
            linear_proj=linear.row,
            q_layernorm=RMSNorm,
            kv_layernorm=RMSNorm,
        ),
    )


def experts_spec(config, linear: LinearClasses) -> ModuleSpec:
    """The routed experts: a loop over SequentialMLP's experts, or with --moe-grouped-gemm one grouped GEMM per
    projection (moe/grouped_experts.py): TE's where TE runs, else torch._grouped_mm where it can; emulated FP8
    layers keep the loop. Every choice has SequentialMLP's checkpoint keys."""
    loop = ModuleSpec(module=SequentialMLP, submodules=_swiglu_mlp(linear))
    if config is None or not config.moe_grouped_gemm or linear == EMULATED_FP8:
        return loop
    if torch.cuda.is_available() and transformer_engine_norm() is not None:
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelGroupedLinear,
            TERowParallelGroupedLinear,
        )
        from megatron.core.transformer.moe.experts import TEGroupedMLP

        return ModuleSpec(module=TEGroupedMLP, submodules=MLPSubmodules(
            linear_fc1=TEColumnParallelGroupedLinear, linear_fc2=TERowParallelGroupedLinear))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if grouped_mm_supported(config, device):
        return ModuleSpec(module=GroupedExperts, submodules=_swiglu_mlp(linear))
    return loop


def moe_spec(token_dispatcher=AllToAllTokenDispatcher, linear: LinearClasses = HIGH_PRECISION,
             config=None) -> ModuleSpec:
    return ModuleSpec(
        module=DSv3MoELayer,
        # DeepSeek-V3 §3.3.3: tokens are dispatched in FP8 to the FP8 experts
        params={"token_dispatcher": token_dispatcher, "fp8_dispatch": linear == EMULATED_FP8},
        submodules=MoESubmodules(
            experts=experts_spec(config, linear),
            shared_experts=ModuleSpec(module=SharedExpertMLP, submodules=_swiglu_mlp(linear)),
            router=DSv3Router,
        ),
    )


def layer_spec(is_moe: bool, token_dispatcher=AllToAllTokenDispatcher, linear: LinearClasses = HIGH_PRECISION,
               config=None):
    mlp = (moe_spec(token_dispatcher, linear, config) if is_moe
           else ModuleSpec(module=MLP, submodules=_swiglu_mlp(linear)))
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=RMSNorm,
            self_attention=mla_spec(linear),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=RMSNorm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def decoder_block_spec(config, pp_rank=None, vp_stage=None, token_dispatcher=AllToAllTokenDispatcher):
    """The decoder layers this pipeline stage builds (megatron-core's split, incl. uneven first/last)."""
    pattern = config.moe_layer_freq
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(
        layer_specs=[
            layer_spec(bool(pattern[i]), token_dispatcher, linear_classes(config, layer_uses_fp8(i + 1, config)),
                       config)
            for i in range(offset, offset + count)
        ],
        layer_norm=RMSNorm,
    )


def mtp_block_spec(config, pp_rank=None, vp_stage=None, token_dispatcher=AllToAllTokenDispatcher):
    """The MTP modules if this (virtual) pipeline stage builds them (megatron's placement), else None."""
    if not config.mtp_num_layers or get_mtp_num_layers_to_build(config, vp_stage, pp_rank) == 0:
        return None
    return mtp_modules_spec(config, token_dispatcher)


def mtp_modules_spec(config, token_dispatcher=AllToAllTokenDispatcher) -> MultiTokenPredictionBlockSubmodules:
    mtp_layer = ModuleSpec(
        module=MultiTokenPredictionLayer,
        submodules=MultiTokenPredictionLayerSubmodules(
            enorm=RMSNorm,
            hnorm=RMSNorm,
            eh_proj=(SPLIT_BACKWARD if config.split_weight_grad else HIGH_PRECISION).column,
            # in FP8 whenever FP8 is on, as megatron-core's MTP runs (eh_proj stays high precision)
            transformer_layer=layer_spec(config.num_moe_experts is not None, token_dispatcher,
                                         linear_classes(config, config.fp8_emulation), config),
            layer_norm=RMSNorm,
        ),
    )
    return MultiTokenPredictionBlockSubmodules(layer_specs=[mtp_layer] * config.mtp_num_layers)
