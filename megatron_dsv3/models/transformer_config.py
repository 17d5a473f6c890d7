"""Preset + parallel layout -> megatron-core's MLATransformerConfig for the DeepSeek-V3 spec."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import MLATransformerConfig

from megatron_dsv3 import platform
from megatron_dsv3.fp8.recipes import fp8_config_fields
from megatron_dsv3.models.presets import DSv3ModelConfig


@dataclass
class DSv3TransformerConfig(MLATransformerConfig):
    """MLATransformerConfig plus the DeepSeek fields megatron-core lacks."""

    moe_router_norm_topk_prob: bool = True
    """Normalize the selected experts' scores to sum to 1 before routed scaling (V3: true)."""

    fp8_emulation: bool = False
    """--fp8-emulation: the FP8 layers' linears emulate DeepSeek-V3's blockwise FP8 GEMMs (megatron_dsv3.fp8)."""

    fp8_activation_storage: bool = True
    """--fp8-emulation: the FP8 linears save their input for the wgrad as FP8 xᵀ tiles (DeepSeek-V3 §3.3.3), not
    the high-precision x (--no-fp8-activation-storage)."""

    share_mtp_embedding: bool = True
    """DualPipe/DualPipeV: MTP uses the word embedding of the stage-0 chunk on the same rank (DeepSeek-V3 §3.2.3)
    instead of a copy of its own (--no-share-mtp-embedding; the copies' gradients are then summed)."""

    split_weight_grad: bool = False
    """DualPipe/DualPipeV chunks: the decoder and MTP linears can defer their weight-gradients from a B op to
    its W op (megatron_dsv3.pipeline.weight_grad_store)."""


def build_transformer_config(
    model: DSv3ModelConfig,
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size=None,
    expert_model_parallel_size: int = 1,
    decoder_first_pipeline_num_layers=None,
    decoder_last_pipeline_num_layers=None,
    bf16: bool = False,
    recompute_granularity=None,
    recompute_method=None,
    recompute_num_layers=None,
    recompute_modules=None,
    rope_fusion: bool = True,
    **overrides,
) -> DSv3TransformerConfig:
    dtype = torch.bfloat16 if bf16 else torch.float32
    on_gpu = torch.cuda.is_available()
    return DSv3TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        ffn_hidden_size=model.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        # MLA + YaRN
        q_lora_rank=model.q_lora_rank,
        kv_lora_rank=model.kv_lora_rank,
        qk_head_dim=model.qk_head_dim,
        qk_pos_emb_head_dim=model.qk_pos_emb_head_dim,
        v_head_dim=model.v_head_dim,
        rope_type="yarn",
        rotary_base=model.rotary_base,
        rotary_scaling_factor=model.rotary_scaling_factor,
        original_max_position_embeddings=model.original_max_position_embeddings,
        beta_fast=model.beta_fast,
        beta_slow=model.beta_slow,
        mscale=model.mscale,
        mscale_all_dim=model.mscale_all_dim,
        # DeepSeekMoE (router and dispatcher are ours; megatron's own machinery stays off)
        num_moe_experts=model.num_experts,
        moe_layer_freq=model.moe_layer_pattern,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
        moe_router_topk=model.moe_router_topk,
        moe_router_score_function=model.moe_router_score_function,
        moe_router_num_groups=model.moe_router_num_groups,
        moe_router_group_topk=model.moe_router_group_topk,
        moe_router_topk_scaling_factor=model.moe_router_topk_scaling_factor,
        moe_router_enable_expert_bias=model.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=model.moe_router_bias_update_rate,
        moe_router_norm_topk_prob=model.moe_router_norm_topk_prob,
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_router_load_balancing_type="none",
        moe_token_dispatcher_type="allgather",
        # MTP
        mtp_num_layers=model.mtp_num_layers,
        mtp_loss_scaling_factor=model.mtp_loss_scaling_factor,
        # parallelism and precision
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        num_layers_in_first_pipeline_stage=decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=decoder_last_pipeline_num_layers,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=rope_fusion and platform.use_mla_rope_fusion(),
        cuda_graph_scope=[],  # the whole layer: megatron-core's default "full", without its deprecation warning
        persist_layer_norm=False,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
        **({"recompute_modules": recompute_modules} if recompute_modules else {}),
        # Megatron-LM's setting: a pipeline stage's output keeps only its grad_fn once sent (free-after-send)
        **{"deallocate_pipeline_outputs": True, **overrides},
    )


def transformer_config_from_args(args) -> DSv3TransformerConfig:
    """The config pretrain_dsv3.py's flags describe."""
    return build_transformer_config(
        args.model_config,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        decoder_first_pipeline_num_layers=args.decoder_first_pipeline_num_layers,
        decoder_last_pipeline_num_layers=args.decoder_last_pipeline_num_layers,
        bf16=args.bf16,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        recompute_modules=args.recompute_modules,
        rope_fusion=not args.no_rope_fusion,
        deallocate_pipeline_outputs=args.deallocate_pipeline_outputs,
        share_mtp_embedding=args.share_mtp_embedding,
        moe_grouped_gemm=args.moe_grouped_gemm,
        **fp8_config_fields(args),
    )
