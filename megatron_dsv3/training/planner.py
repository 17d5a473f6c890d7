"""Parallelism planner: per-rank memory, step time and communication of a layout, from formulas only.

Memory of the fullest pipeline rank (bytes), after DeepSeek-V3 §3.2-3.3 and Megatron's distributed optimizer:
  weights      2 B/param (bf16; 4 B in fp32) for every stage copy the rank holds (DualPipe: stages r and
               PP-1-r, two copies of the model across the pipeline); +1 B per GEMM weight with --fp8 (the FP8
               weight copy kept between micro-batches; embedding, head, norms and router stay bf16)
  main_grads   4 B/param fp32 per stage copy (gradient accumulation over micro-batches)
  optimizer    ZeRO-1: (fp32 master 4 B, absent when training in fp32) + Adam m, v (2+2 B as DeepSeek-V3 keeps
               them in bf16, or 4+4 B), sharded over the data-parallel ranks holding the same parameter:
               DP for dense parameters, expert-DP = DP*TP/EP for routed experts; each of DualPipe's two copies
               of a stage has its own state (the distributed optimizer shards over DP only, as measured by
               benchmarks/memory_plan.py)
  activations  per micro-batch and layer (`layer_activation_bytes`) summed over the rank's stages, weighted by
               the micro-batches in flight at the schedule's peak (replayed from `schedule_plan`: 1F1B's first
               rank holds PP, DualPipe's PP+1 stage-activations)
  reserved     a fixed allowance for the CUDA context, NCCL buffers and allocator fragmentation

Step time: training FLOPs (`flops_per_token`; x4/3 under full recompute) / (GPUs * peak * MFU), plus the pipeline bubble of
the schedule's formula with F = forward, B = 2F (b = w = F), F&B = F + B, plus communication that the schedule
does not hide (1F1B: all of it; DualPipe/V overlap it with computation). Expert all-to-all is node-limited: a
token crosses InfiniBand to at most M = --moe-router-group-topk nodes, then fans out over NVLink.
Default MFU 0.4 of the dense bf16 peak reproduces DeepSeek-V3's 2.664M H800 GPU-hours for 14.8T tokens.
"""

import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

from megatron_dsv3.models.param_count import (
    flops_per_token,
    layer_params,
    mtp_module_params,
    norm_params,
    routed_expert_params,
)
from megatron_dsv3.models.presets import DSv3ModelConfig
from megatron_dsv3.pipeline.schedule_plan import BW, B, F, build_plan, stage_of
from megatron_dsv3.pipeline.simulator import bubble_1f1b, bubble_dualpipe, bubble_dualpipev

GiB = 2**30
SCHEDULES = ("1f1b", "dualpipe", "dualpipev")
RECOMPUTE = ("none", "norm_and_up_proj", "full")


@dataclass
class Cluster:
    num_nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gb: float = 80.0  # GiB
    intra_node_bw_gbps: float = 160.0  # GB/s per GPU (NVLink)
    inter_node_bw_gbps: float = 50.0  # GB/s per GPU (InfiniBand, 400 Gb/s)
    peak_tflops: float = 989.0  # dense bf16 per GPU (H800/H100 SXM)
    mfu: float = 0.4
    reserved_gb: float = 4.0  # GiB: CUDA context, NCCL buffers, fragmentation

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.gpus_per_node


@dataclass
class Layout:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    data_parallel_size: int = 1
    pipeline_schedule: str = "1f1b"
    micro_batch_size: int = 1
    global_batch_size: int = 1
    seq_length: int = 4096
    recompute: str = "none"
    fp8: bool = False
    bf16: bool = True  # False: fp32 training (CPU)
    adam_moments_bf16: bool = True  # DeepSeek-V3 §3.3.3
    distributed_optimizer: bool = True
    flash_attention: bool = True  # False: the unfused core attention stores its softmax probabilities
    composite_kernels: bool = False  # True: torch's composite CPU kernels, which keep more (CPU runs of this repo)
    decoder_first_pipeline_num_layers: Optional[int] = None
    decoder_last_pipeline_num_layers: Optional[int] = None
    fp8_activation_storage: bool = True  # with fp8: cached GEMM inputs kept in FP8 (DeepSeek-V3 §3.3.3)
    free_sent_outputs: bool = True  # a stage output is freed once sent (megatron's deallocate_pipeline_outputs)
    share_mtp_embedding: bool = True  # MTP uses stage 0's embedding where both sit on one rank (§3.2.3)

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    @property
    def num_stages(self) -> int:
        """Model stages: PP, or 2*PP for DualPipeV's V of two chunks per rank."""
        return self.pipeline_model_parallel_size * (2 if self.pipeline_schedule == "dualpipev" else 1)


def check_layout(c: DSv3ModelConfig, lay: Layout) -> None:
    """Raise ValueError naming the flag when the layout cannot run at all."""
    tp, pp, ep, dp = (lay.tensor_model_parallel_size, lay.pipeline_model_parallel_size,
                      lay.expert_model_parallel_size, lay.data_parallel_size)
    if min(tp, pp, ep, dp, lay.micro_batch_size, lay.seq_length) < 1:
        raise ValueError("parallel sizes, --micro-batch-size and --seq-length must be positive")
    if lay.pipeline_schedule not in SCHEDULES:
        raise ValueError(f"--pipeline-schedule {lay.pipeline_schedule!r}: choose one of {SCHEDULES}")
    if lay.recompute not in RECOMPUTE:
        raise ValueError(f"--recompute {lay.recompute!r}: choose one of {RECOMPUTE}")
    if (dp * tp) % ep:
        raise ValueError(f"--expert-model-parallel-size {ep} must divide DP*TP = {dp * tp}")
    if c.num_experts and c.num_experts % ep:
        raise ValueError(f"--expert-model-parallel-size {ep} must divide --num-experts {c.num_experts}")
    if lay.global_batch_size % (lay.micro_batch_size * dp):
        raise ValueError(f"--global-batch-size {lay.global_batch_size} is not a multiple of "
                         f"--micro-batch-size x DP = {lay.micro_batch_size * dp}")
    if lay.fp8 and not lay.bf16:
        raise ValueError("--fp8 needs bf16 training")
    stage_layers(c, lay)  # raises when the layers do not split
    if pp > 1:
        build_plan(lay.pipeline_schedule, pp, min(lay.num_microbatches, _plan_microbatches(lay)))
    elif lay.pipeline_schedule != "1f1b":
        raise ValueError(f"--pipeline-schedule {lay.pipeline_schedule} needs --pipeline-model-parallel-size >= 2")


def stage_layers(c: DSv3ModelConfig, lay: Layout) -> List[List[int]]:
    """Layer indices of each model stage. Default split: middle stages get ceil(L/S) layers, the first stage
    up to as many, the last stage (which also holds the head and MTP) the rest."""
    L, S = c.num_layers, lay.num_stages
    first, last = lay.decoder_first_pipeline_num_layers, lay.decoder_last_pipeline_num_layers
    if S == 1:
        return [list(range(L))]
    if first is None and last is None and L % S:
        m = math.ceil(L / S)
        rest = L - (S - 2) * m
        if rest < 0:
            raise ValueError(f"--num-layers {L} is too few for {S} pipeline stages")
        first = min(m, rest)
        last = rest - first
    middle_stages = S - (first is not None) - (last is not None)
    middle = L - (first or 0) - (last or 0)
    if middle < 0 or (middle_stages and middle % middle_stages) or (not middle_stages and middle):
        raise ValueError(f"--num-layers {L} does not split over {S} stages with first {first} / last {last} layers; "
                         "set --decoder-first/last-pipeline-num-layers")
    per = middle // middle_stages if middle_stages else 0
    sizes = ([first] if first is not None else []) + [per] * middle_stages + ([last] if last is not None else [])
    bounds = [sum(sizes[:i]) for i in range(S + 1)]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(S)]


# ---------------------------------------------------------------- parameters per stage


def _gemm_params(c: DSv3ModelConfig, is_moe: bool) -> int:
    """Weights of a layer that run as FP8 GEMMs under --fp8: all but norms and the (bf16) router."""
    p = layer_params(c, is_moe)
    return sum(p.values()) - norm_params(c) - p.get("router", 0)


def stage_params(c: DSv3ModelConfig, lay: Layout, stage: int, layers: List[int]) -> Dict[str, float]:
    """Parameters one rank holds for one stage: dense (sharded by TP), expert (by EP), and the GEMM part."""
    tp, ep = lay.tensor_model_parallel_size, lay.expert_model_parallel_size
    pattern = c.moe_layer_pattern
    dense = expert = dense_gemm = 0.0
    mtp_moe = c.num_experts is not None
    blocks = [bool(pattern[i]) for i in layers]
    if stage == lay.num_stages - 1 and c.mtp_num_layers:
        blocks += [mtp_moe] * c.mtp_num_layers
    for is_moe in blocks:
        routed = c.num_experts * routed_expert_params(c) if is_moe else 0
        dense += sum(layer_params(c, is_moe).values()) - routed
        expert += routed
        dense_gemm += _gemm_params(c, is_moe) - routed
    vocab = c.vocab_size * c.hidden_size
    if stage == 0:
        dense += vocab
    if stage == lay.num_stages - 1:
        dense += c.hidden_size + (vocab if c.untie_embeddings_and_output_weights else 0)
        if c.mtp_num_layers:
            mtp = mtp_module_params(c)
            dense += c.mtp_num_layers * (mtp["eh_proj"] + mtp["norms"])
            dense_gemm += c.mtp_num_layers * mtp["eh_proj"]
            if lay.num_stages > 1:
                dense += vocab  # MTP's embedding on the last stage (shared when stage 0 is on the same rank)
    return {"dense": dense / tp, "expert": expert / ep, "gemm": dense_gemm / tp + expert / ep}


# ---------------------------------------------------------------- activations


def layer_activation_bytes(c: DSv3ModelConfig, lay: Layout, is_moe: bool) -> float:
    """Bytes one token leaves stored for the backward of one layer (per micro-batch, no TP).

    a = activation dtype, g = cached GEMM input (1 B FP8 with --fp8, DeepSeek-V3 §3.3.3). Stored:
      attention  layer input x (a.h); ln1 out (g.h)*; c_q (a.q_lora), its norm out (g.q_lora); kv_down out
                 (a.(kv_lora + rope)), its norm out (g.kv_lora); Q, K (a.heads.(nope+rope) each)**, V
                 (a.heads.v)**; attention output O (a.heads.v) and softmax stats (4.heads), or with unfused
                 attention its probabilities (a.heads.s: the causal mask zeroes the upper triangle, it is still
                 stored); o_proj's FP8 input (g.heads.v)
      MLP        residual x2 (a.h); ln2 out (g.h)*; dense: fc1 out (2.ffn) and act out (ffn); MoE: router
                 probabilities (4.E), top-k dispatched copies (k.g.h), fc1 out (k.2.moe_ffn), act out (k.moe_ffn),
                 shared expert fc1 out and act out; routing weights are applied inside the activation
                 (Megatron's weighted SwiGLU), so expert outputs are not kept. With --fp8, SwiGLU inputs are kept in
                 FP8 and its output recomputed (DeepSeek-V3 §3.3.3).
      * dropped by --recompute norm_and_up_proj (recomputed RMSNorms), ** dropped by it too (MLA up-projections).
        The latent norms' outputs stay: megatron-core's up-projection recompute starts from them (measured).
    --recompute full keeps only x (a.h); the layer is rebuilt in the backward.
    The tensors are those fused GPU kernels keep. --composite-kernels adds what torch's composite CPU kernels
    keep besides: each RMSNorm its normalized input (a per norm width), SwiGLU the silu output (a.ffn; routed
    experts also the probability-weighted product, k.a.moe_ffn), the MoE combine the k expert outputs (k.a.h); the
    CPU flash attention (one head dim for q, k and v: models/mla_core_attention.py pads V to Q's) keeps the padded
    V in place of V (a.heads.(nope+rope)), which recomputing the up-projections does not free, and its padded
    output besides O (a.heads.(nope+rope)), in place of O when o_proj caches its input in FP8 (measured by
    benchmarks/memory_plan.py and tests/test_memory_plan.py).
    The fused RoPE keeps nothing on either (models/mla_rope.py saves only cos and sin, as the Triton kernels do).
    """
    a = 2 if lay.bf16 else 4
    fp8_cache = lay.fp8 and lay.fp8_activation_storage
    g = 1 if fp8_cache else a
    h, n = c.hidden_size, c.num_attention_heads
    if lay.recompute == "full":
        return a * h
    light = lay.recompute == "norm_and_up_proj"
    qk, v = c.qk_head_dim + c.qk_pos_emb_head_dim, c.v_head_dim
    ql = c.q_lora_rank or 0
    attn = a * h + a * ql + a * (c.kv_lora_rank + c.qk_pos_emb_head_dim) + a * n * v
    attn += 4 * n if lay.flash_attention else a * n * lay.seq_length
    attn += g * n * v if fp8_cache else 0
    attn += g * ql + g * c.kv_lora_rank  # the latent norms' outputs, where the up-projection recompute starts
    if not light:
        attn += g * h + a * n * (2 * qk + v)
    mlp = a * h + (0 if light else g * h)
    act_out = 0 if fp8_cache else g  # SwiGLU output (the fc2 input) unless recomputed from its FP8 input
    fc1_out = g if fp8_cache else a

    def swiglu(width):
        return width * (2 * fc1_out + act_out)

    shared = c.moe_shared_expert_intermediate_size or 0
    if is_moe:
        k, e = c.moe_router_topk, c.num_experts
        mlp += 4 * e + k * g * h + k * swiglu(c.moe_ffn_hidden_size)
        mlp += swiglu(shared)
    else:
        mlp += swiglu(c.ffn_hidden_size)
    if lay.composite_kernels:
        attn += a * (h + ql + c.kv_lora_rank)
        # padded V in place of V; padded output besides O (in place of O where o_proj keeps only its FP8 input)
        attn += a * n * (qk - v) + a * n * (qk - v if fp8_cache else qk)
        if light:  # the padded V is the pad's output, not the recomputed V: it stays
            attn += a * n * v
        mlp += a * h
        if is_moe:
            mlp += k * a * (2 * c.moe_ffn_hidden_size + h) + a * shared
        else:
            mlp += a * c.ffn_hidden_size
    return attn + mlp


def stage_activation_bytes(c: DSv3ModelConfig, lay: Layout, stage: int, layers: List[int]) -> float:
    """One micro-batch's stored activations in a stage (MTP and the fp32 logits on the last stage)."""
    tokens = lay.micro_batch_size * lay.seq_length / lay.tensor_model_parallel_size
    pattern = c.moe_layer_pattern
    per_token = sum(layer_activation_bytes(c, lay, bool(pattern[i])) for i in layers)
    if not lay.free_sent_outputs and stage < lay.num_stages - 1:
        per_token += (2 if lay.bf16 else 4) * c.hidden_size  # the sent output, kept whole until the backward
    if stage == lay.num_stages - 1:
        a = 2 if lay.bf16 else 4
        heads = 1 + (c.mtp_num_layers or 0)
        per_token += 4 * c.vocab_size * heads  # fp32 softmax kept by the cross-entropy
        if c.mtp_num_layers:
            mtp_layer = layer_activation_bytes(c, lay, c.num_experts is not None)
            per_token += c.mtp_num_layers * (mtp_layer + 4 * a * c.hidden_size)  # + enorm/hnorm in, eh_proj in
        if lay.composite_kernels:  # normalized inputs of the final norms and of MTP's enorm/hnorm
            per_token += a * c.hidden_size * (1 + 3 * (c.mtp_num_layers or 0))
    return per_token * tokens


def _plan_microbatches(lay: Layout) -> int:
    """Micro-batches replayed to find the activation peak: the steady state is reached by 4*PP."""
    n = min(lay.num_microbatches, 4 * lay.pipeline_model_parallel_size)
    return n - n % 2 if lay.pipeline_schedule != "1f1b" and lay.num_microbatches > n else n


def peak_activation_bytes(stage_bytes: List[float], lay: Layout) -> List[float]:
    """Per pipeline rank: the peak over the schedule of the activations held (an F stores its stage's
    activations, its B/BW frees them), plus one layer rebuilt at a time under full recompute."""
    pp = lay.pipeline_model_parallel_size
    if pp == 1:
        return [stage_bytes[0]]
    plan = build_plan(lay.pipeline_schedule, pp, _plan_microbatches(lay))
    peaks = []
    for r, ops in enumerate(plan.ranks):
        live = peak = 0.0
        for part in (p for op in ops for p in op.parts()):
            size = stage_bytes[stage_of(plan, r, part.chunk)]
            live += size if part.kind == F else -size if part.kind in (B, BW) else 0
            peak = max(peak, live)
        peaks.append(peak)
    return peaks


# ---------------------------------------------------------------- memory


def _rank_stages(lay: Layout, rank: int) -> List[int]:
    pp, S = lay.pipeline_model_parallel_size, lay.num_stages
    if lay.pipeline_schedule == "dualpipe":
        return sorted({rank, pp - 1 - rank})
    if lay.pipeline_schedule == "dualpipev":
        return [rank, S - 1 - rank]
    return [rank]


def estimate_memory(c: DSv3ModelConfig, lay: Layout, rank: Optional[int] = None) -> Dict[str, float]:
    """Bytes on the fullest pipeline rank (or on `rank`): weights, fp8_weights, main_grads, optimizer,
    activations, total (without the cluster's reserved allowance), and `pipeline_rank` naming that rank."""
    check_layout(c, lay)
    split = stage_layers(c, lay)
    params = [stage_params(c, lay, s, layers) for s, layers in enumerate(split)]
    acts = peak_activation_bytes([stage_activation_bytes(c, lay, s, l) for s, l in enumerate(split)], lay)
    a = 2 if lay.bf16 else 4
    adam = 4 if lay.adam_moments_bf16 and lay.bf16 else 8
    master = 4 if lay.bf16 else 0
    dp = lay.data_parallel_size
    edp = dp * lay.tensor_model_parallel_size // lay.expert_model_parallel_size
    best = None
    for r in range(lay.pipeline_model_parallel_size) if rank is None else [rank]:
        held = [params[s] for s in _rank_stages(lay, r)]
        dense = sum(p["dense"] for p in held)
        vocab = c.vocab_size * c.hidden_size / lay.tensor_model_parallel_size
        if c.mtp_num_layers and lay.num_stages > 1 and 0 in _rank_stages(lay, r) and lay.share_mtp_embedding:
            dense -= vocab  # DeepSeek-V3 §3.2.3: MTP shares the embedding held on the same rank
        expert = sum(p["expert"] for p in held)
        n_params = dense + expert
        shard = (dp, edp) if lay.distributed_optimizer else (1, 1)
        terms = {
            "weights": a * n_params,
            "fp8_weights": sum(p["gemm"] for p in held) if lay.fp8 else 0.0,
            "main_grads": 4 * n_params,
            "optimizer": (master + adam) * (dense / shard[0] + expert / shard[1]),
            "activations": acts[r] + (_full_recompute_transient(c, lay) if lay.recompute == "full" else 0.0),
        }
        terms["total"] = sum(terms.values())
        terms["pipeline_rank"] = r
        terms["parameters"] = n_params
        if best is None or terms["total"] > best["total"]:
            best = terms
    return best


def _full_recompute_transient(c: DSv3ModelConfig, lay: Layout) -> float:
    """Under full recompute one layer's activations are rebuilt at a time."""
    tokens = lay.micro_batch_size * lay.seq_length / lay.tensor_model_parallel_size
    return tokens * max(layer_activation_bytes(c, replace(lay, recompute="none"), m) for m in (False, True))


# ---------------------------------------------------------------- time and communication


def estimate_time(c: DSv3ModelConfig, lay: Layout, cluster: Cluster) -> Dict[str, float]:
    """Seconds per step: compute, bubble, all-to-all and pipeline p2p (and what is left exposed), step; plus
    tokens/s and the traffic bytes of `step_traffic_bytes`."""
    world = cluster.world_size
    pp, n_mb = lay.pipeline_model_parallel_size, lay.num_microbatches
    tokens_step = lay.global_batch_size * lay.seq_length
    compute = flops_per_token(c, lay.seq_length) * tokens_step / (world * cluster.peak_tflops * 1e12 * cluster.mfu)
    if lay.recompute == "full":
        compute *= 4 / 3  # the forward runs twice (selective recompute of norms and up-projections: negligible)
    fwd = compute / (3 * n_mb)  # one stage's forward of one micro-batch (b = w = fwd); per rank compute = n_mb(F+B)
    if pp == 1:
        bubble = 0.0
    elif lay.pipeline_schedule == "1f1b":
        bubble = bubble_1f1b(pp, fwd, 2 * fwd)
    elif lay.pipeline_schedule == "dualpipe":
        bubble = bubble_dualpipe(pp, fwd, 2 * fwd, fwd, 3 * fwd)
    else:
        h = fwd / 2  # a DualPipeV chunk is half a stage
        bubble = bubble_dualpipev(pp, h, 2 * h, h, 3 * h)
    traffic = step_traffic_bytes(c, lay, cluster)
    a2a = (traffic["all_to_all_ib"] / (cluster.inter_node_bw_gbps * 1e9)
           + traffic["all_to_all_nvlink"] / (cluster.intra_node_bw_gbps * 1e9))
    p2p = traffic["pp_p2p"] / (cluster.inter_node_bw_gbps * 1e9)
    comm = a2a + p2p
    exposed = comm if lay.pipeline_schedule == "1f1b" else max(0.0, comm - compute)
    step = compute + bubble + exposed
    return {"compute": compute, "bubble": bubble, "all_to_all": a2a, "pp_p2p": p2p, "exposed_comm": exposed,
            "step": step, "tokens_per_s": tokens_step / step, **traffic}


def step_traffic_bytes(c: DSv3ModelConfig, lay: Layout, cluster: Cluster) -> Dict[str, float]:
    """Bytes one GPU sends per step.

    Expert all-to-all, per token copy and MoE layer: dispatch (1 B/elem FP8 with --fp8, else 2) + combine (2), and
    the same two transfers in the backward (2 + 2), times hidden. Node-limited routing: a token crosses InfiniBand
    to at most M = --moe-router-group-topk of the EP group's nodes (not its own: x (nodes-1)/nodes), then reaches
    its top-k experts over NVLink. Pipeline p2p: each micro-batch's activation forward and its gradient backward
    at every stage boundary the rank feeds (twice per micro-batch for DualPipeV's two chunks).
    """
    h, pp = c.hidden_size, lay.pipeline_model_parallel_size
    tokens_rank = lay.global_batch_size * lay.seq_length / lay.data_parallel_size
    out = {"all_to_all_ib": 0.0, "all_to_all_nvlink": 0.0, "pp_p2p": 0.0}
    ep, gpn = lay.expert_model_parallel_size, cluster.gpus_per_node
    if c.num_experts and ep > 1:
        moe_layers = sum(c.moe_layer_pattern) + (c.mtp_num_layers or 0)
        per_copy = ((1 if lay.fp8 else 2) + 2 + 2 + 2) * h * tokens_rank * moe_layers / pp
        nodes = max(1, ep // gpn)
        m = min(c.moe_router_group_topk or nodes, nodes)
        out["all_to_all_ib"] = per_copy * m * (nodes - 1) / nodes
        local = min(ep, gpn)
        out["all_to_all_nvlink"] = per_copy * c.moe_router_topk * (local - 1) / local
    if pp > 1:
        a = 2 if lay.bf16 else 4
        passes = 2 if lay.pipeline_schedule == "dualpipev" else 1
        out["pp_p2p"] = 2 * lay.num_microbatches * passes * lay.micro_batch_size * lay.seq_length * h * a
    return out


# ---------------------------------------------------------------- verdicts and search


@dataclass
class Verdict:
    layout: Layout
    fits: bool
    reason: str
    memory: Dict[str, float] = field(default_factory=dict)
    time: Dict[str, float] = field(default_factory=dict)


MEMORY_TERMS = ("weights", "fp8_weights", "main_grads", "optimizer", "activations")


def format_bytes(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.2f} MiB"


def plan(c: DSv3ModelConfig, lay: Layout, cluster: Cluster) -> Verdict:
    """Does `lay` (data_parallel_size derived from the cluster) fit? The reason names the overflowing terms."""
    tp, pp = lay.tensor_model_parallel_size, lay.pipeline_model_parallel_size
    if cluster.world_size % (tp * pp):
        return Verdict(lay, False, f"invalid: {cluster.world_size} GPUs are not a multiple of TP*PP = {tp * pp}")
    lay = replace(lay, data_parallel_size=cluster.world_size // (tp * pp))
    try:
        check_layout(c, lay)
    except ValueError as err:
        return Verdict(lay, False, f"invalid: {err}")
    mem = estimate_memory(c, lay)
    tim = estimate_time(c, lay, cluster)
    budget = (cluster.gpu_memory_gb - cluster.reserved_gb) * GiB
    if mem["total"] <= budget:
        return Verdict(lay, True, f"fits: {format_bytes(mem['total'])} of {format_bytes(budget)} usable per GPU on "
                                  f"the fullest rank (pipeline rank {mem['pipeline_rank']})", mem, tim)
    ranked = sorted(MEMORY_TERMS, key=lambda t: -mem[t])
    over = [t for t in ranked if mem[t] > budget]
    culprit = over or ranked[:2]
    detail = ", ".join(f"{t} {format_bytes(mem[t])}" for t in culprit)
    why = "alone exceeds" if over else "dominate"
    return Verdict(lay, False, f"does not fit: {format_bytes(mem['total'])} > {format_bytes(budget)} usable on "
                               f"pipeline rank {mem['pipeline_rank']}; {detail} ({why} the budget)", mem, tim)


# (saving, the Layout fields that switch it off): what `savings` takes away one at a time
SAVINGS = (
    ("recompute RMSNorms + MLA up-projections", {"recompute": "none"}),
    ("BF16 Adam moments", {"adam_moments_bf16": False}),
    ("FP8 activation storage", {"fp8_activation_storage": False}),
    ("free stage output after send", {"free_sent_outputs": False}),
    ("MTP shares the embedding", {"share_mtp_embedding": False}),
    ("ZeRO-1 distributed optimizer", {"distributed_optimizer": False}),
)


def savings(c: DSv3ModelConfig, lay: Layout) -> List[Dict[str, float]]:
    """Per memory saving switched on in `lay` that changes its memory: the bytes the fullest pipeline rank
    would grow by without it (`saved` = total without it - total with it, each on its own fullest rank), the
    terms that grow there, and the fullest rank without it (`pipeline_rank`)."""
    base = estimate_memory(c, lay)
    rows = []
    for name, off in SAVINGS:
        if lay.recompute == "full" and "recompute" in off or all(getattr(lay, k) == v for k, v in off.items()):
            continue  # full recompute is another choice than this one; or the saving is off already
        without = estimate_memory(c, replace(lay, **off))
        if without["total"] != base["total"]:
            same_rank = estimate_memory(c, lay, without["pipeline_rank"])
            rows.append({"saving": name, "saved": without["total"] - base["total"],
                         "terms": [t for t in MEMORY_TERMS if without[t] > same_rank[t]],
                         "pipeline_rank": without["pipeline_rank"]})
    return rows


def search(c: DSv3ModelConfig, base: Layout, cluster: Cluster, top: int = 5) -> List[Verdict]:
    """Fitting layouts over PP, EP, schedule and recompute (TP, batch, seq, fp8 as in `base`), fastest first."""
    world = cluster.world_size
    powers = [2**i for i in range(int(math.log2(world)) + 1)]
    found = []
    for pp in (p for p in powers if p <= c.num_layers):
        for ep in powers:
            for schedule in SCHEDULES:
                for recompute in RECOMPUTE:
                    lay = replace(base, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
                                  pipeline_schedule=schedule, recompute=recompute,
                                  decoder_first_pipeline_num_layers=None, decoder_last_pipeline_num_layers=None)
                    v = plan(c, lay, cluster)
                    if v.fits:
                        found.append(v)
    found.sort(key=lambda v: (round(v.time["step"], 3), v.memory["total"]))
    return found[:top]
