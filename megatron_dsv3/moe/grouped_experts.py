"""Routed experts as one grouped computation (`--moe-grouped-gemm`), chosen by the spec.

The rows reaching a rank's E local experts arrive sorted by expert (`tokens_per_expert` rows each). With W1_e
[2F, H] and W2_e [H, F] the experts' SwiGLU weights and p the rows' gate weights:

    [a | b] = x_e · W1_eᵀ,   y_e = ((silu(a) ⊙ b) · p) · W2_eᵀ        for every e in one grouped GEMM each

The spec (models/spec.py `experts_spec`) picks the module:
    GPU with Transformer Engine                megatron-core's TEGroupedMLP (TE's grouped GEMM, FP8 or BF16)
    emulated FP8 layer (--fp8-emulation)       SequentialMLP with the emulated FP8 linears (a loop)
    otherwise                                  GroupedExperts: torch._grouped_mm (Hopper GPUs and CPU), where
                                               the device and the shapes allow it, else SequentialMLP
GroupedExperts keeps SequentialMLP's parameters (each local expert's linear_fc1 / linear_fc2): the same
checkpoint keys, optimizer state and initialization, so a run may switch between them at any resume. The two
GEMMs and the gated activation are one autograd node (one Python call each way, fewer saved tensors than autograd
keeps for them); each GEMM stacks the E weights for the call only (the node keeps the per-expert weights, not the
stack) and, under a DualPipe B op, defers the weight-gradients to the W op (pipeline.weight_grad_store).
"""

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_dsv3.pipeline.weight_grad_store import weight_grads

GROUPED_MM_ALIGNMENT_BYTES = 16  # torch._grouped_mm: every row stride a multiple of 16 bytes


class _GroupedSwiGLU(torch.autograd.Function):
    """The experts' two grouped GEMMs and their gated activation as one autograd node, offsets = the cumulative
    row counts (int32). Saves x, [a | b], p and h (the fc2 input). With dh = dy · W2_e:
        dW2_e = dyᵀ · h,   dp = Σ_f dh ⊙ silu(a) ⊙ b,   da = silu'(a) ⊙ dh·p ⊙ b,   db = dh·p ⊙ silu(a)
        dx = [da | db] · W1_e,   dW1_e = [da | db]ᵀ · x    (weight-gradients now, or in the W op of a B op)"""

    @staticmethod
    def forward(ctx, x, offsets, probs, num_experts, *weights):
        fc1, fc2 = weights[:num_experts], weights[num_experts:]
        ab = torch._grouped_mm(x, torch.stack(fc1).transpose(1, 2), offs=offsets)
        a, b = ab.chunk(2, dim=-1)
        # as megatron's MLP with per_token_scale: the gate weight after the activation, in the rows' dtype
        h = (F.silu(a) * b * probs.unsqueeze(-1)).to(x.dtype)
        ctx.num_experts = num_experts
        ctx.save_for_backward(x, offsets, probs, ab, h, *weights)
        return torch._grouped_mm(h, torch.stack(fc2).transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, dy):
        x, offsets, probs, ab, h, *weights = ctx.saved_tensors
        fc1, fc2 = weights[:ctx.num_experts], weights[ctx.num_experts:]
        dh = torch._grouped_mm(dy, torch.stack(fc2), offs=offsets)
        dw2 = weight_grads(fc2, lambda: torch._grouped_mm(dy.t(), h, offs=offsets).unbind(0), holds=(dy, h))
        a, b = ab.chunk(2, dim=-1)
        silu = F.silu(a)
        dh = dh.to(probs.dtype)
        dprobs = (dh * (silu * b)).sum(-1)
        dgated = dh * probs.unsqueeze(-1)  # d(silu(a) ⊙ b)
        dab = torch.cat((torch.ops.aten.silu_backward(dgated * b, a), dgated * silu), dim=-1).to(x.dtype)
        dx = torch._grouped_mm(dab, torch.stack(fc1), offs=offsets)
        dw1 = weight_grads(fc1, lambda: torch._grouped_mm(dab.t(), x, offs=offsets).unbind(0), holds=(dab, x))
        return dx, None, dprobs, None, *dw1, *dw2


class GroupedExperts(SequentialMLP):
    """SequentialMLP's experts (SwiGLU, no bias) computed by two grouped GEMMs instead of a loop."""

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        x = permuted_local_hidden_states
        offsets = tokens_per_expert.cumsum(0).to(device=x.device, dtype=torch.int32, non_blocking=True)
        fc1 = [expert.linear_fc1.weight for expert in self.local_experts]
        fc2 = [expert.linear_fc2.weight for expert in self.local_experts]
        return _GroupedSwiGLU.apply(x, offsets, permuted_probs, len(fc1), *fc1, *fc2), None


def grouped_mm_supported(config, device: torch.device) -> bool:
    """torch._grouped_mm runs these experts here: a CPU or a Hopper-or-newer GPU, SwiGLU without bias, row
    strides (H, 2F and F elements) 16-byte aligned."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        return False
    if not (config.gated_linear_unit and config.activation_func is F.silu) or config.add_bias_linear:
        return False
    element = torch.tensor([], dtype=config.params_dtype).element_size()
    widths = (config.hidden_size, config.moe_ffn_hidden_size)
    return all(width * element % GROUPED_MM_ALIGNMENT_BYTES == 0 for width in widths)
