"""--fp8-emulation inside the tiny DeepSeek-V3 model on 2 CPU ranks (EP 2): which modules are FP8, one FP8
linear layer against an independent reference, the whole model against high precision, the FP8 dispatch.

    torchrun --nproc-per-node 2 tests/scripts/fp8_model_check.py OUT.json

References quantize tile by tile in FP64 loops (no megatron_dsv3.fp8 code): power-of-two scale
2^⌈log2(amax/448)⌉ per tile, round to E4M3, multiply back.
"""

import json
import math
import sys

import torch
import torch.distributed as dist

from megatron_dsv3.models.gpt_builder import build_model
from megatron_dsv3.models.transformer_config import transformer_config_from_args
from megatron_dsv3.training.arguments import parse_args
from megatron_dsv3.training.initialize import initialize_distributed, set_seed

FP8_FLAGS = ["--fp8-format", "e4m3", "--fp8-emulation"]


def fake_quant(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=torch.float64)
    for i in range(0, t.shape[0], rows):
        for j in range(0, t.shape[1], cols):
            tile = t[i:i + rows, j:j + cols].detach().double()
            amax = tile.abs().max().item()
            scale = 2.0 ** math.ceil(math.log2(amax / 448)) if amax > 0 else 1.0
            out[i:i + rows, j:j + cols] = (tile / scale).float().to(torch.float8_e4m3fn).double() * scale
    return out


def build(*flags):
    args = parse_args(["--expert-model-parallel-size", "2", *flags], world_size=2)
    set_seed(args.seed)
    return args, build_model(transformer_config_from_args(args), args.model_config.vocab_size, args.seq_length)


def max_rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def check_linear(linear, in_features, seed):
    """Forward, dgrad, wgrad of one emulated FP8 linear layer vs the reference from quantized FP64 operands."""
    torch.manual_seed(seed)
    x = (torch.randn(16, 2, in_features) * torch.logspace(-3, 1, 16)[:, None, None]).requires_grad_()
    y = linear(x)[0]
    dy = torch.randn_like(y)
    y.backward(dy)
    x2d, dy2d, w = x.detach().reshape(-1, in_features), dy.reshape(-1, y.shape[-1]), linear.weight.detach()
    w_q = fake_quant(w, 128, 128)
    y_ref = fake_quant(x2d, 1, 128) @ w_q.t()
    dx_ref = fake_quant(dy2d, 1, 128) @ w_q
    dw_ref = fake_quant(dy2d, 128, 1).t() @ fake_quant(x2d, 128, 1)
    return {
        "class": type(linear).__name__,
        "weight_shape": list(w.shape),
        "fprop_vs_ref": max_rel(y.reshape(-1, y.shape[-1]), y_ref),
        "dgrad_vs_ref": max_rel(x.grad.reshape(-1, in_features), dx_ref),
        "wgrad_vs_ref": max_rel(linear.weight.grad, dw_ref),
        "fprop_vs_exact": max_rel(y.reshape(-1, y.shape[-1]), x2d.double() @ w.double().t()),
    }


def model_loss_and_grads(model, tokens):
    labels = torch.roll(tokens, -1, dims=1)
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    loss = model(tokens, position_ids, None, labels=labels, loss_mask=torch.ones_like(tokens).float()).mean()
    loss.backward()
    return loss.item(), model.decoder.layers[1].self_attention.linear_q_up_proj.weight.grad


def check_dispatch(fp8_dispatcher, hp_dispatcher, hidden_size, experts, topk):
    """The same tokens through the FP8 and the high-precision dispatcher of the same MoE layer."""
    torch.manual_seed(7 + dist.get_rank())
    tokens = 24
    x = torch.randn(tokens, hidden_size) * torch.logspace(-2, 2, tokens)[:, None]
    chosen = torch.rand(tokens, experts).topk(topk, dim=1).indices
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter(1, chosen, True)
    probs = torch.rand(tokens, experts) * routing_map
    grad = torch.randn(tokens * topk * 2, hidden_size)  # ≥ the rows any rank receives
    out = {}
    for name, dispatcher in (("fp8", fp8_dispatcher), ("hp", hp_dispatcher)):
        dispatcher.traffic.reset()
        leaf = x.clone().requires_grad_()
        received, _ = dispatcher.token_dispatch(*dispatcher.dispatch_preprocess(leaf, routing_map, probs))
        (received * grad[: received.shape[0]]).sum().backward()
        out[name] = (received.detach(), leaf.grad, dispatcher.traffic.intra_node_bytes + dispatcher.traffic.inter_node_bytes)
    (fp8, fp8_dx, fp8_bytes), (hp, hp_dx, hp_bytes) = out["fp8"], out["hp"]
    return {
        "fp8_flag": [fp8_dispatcher.fp8_dispatch, hp_dispatcher.fp8_dispatch],
        "rows": fp8.shape[0],
        "equals_quantized_hp": torch.equal(fp8.double(), fake_quant(hp, 1, 128)),
        "differs_from_hp": not torch.equal(fp8, hp),
        "dx_equal": torch.equal(fp8_dx, hp_dx),  # the dispatch's gradient returns in high precision
        "bytes": [fp8_bytes, hp_bytes],
    }


def main():
    initialize_distributed(parse_args(["--expert-model-parallel-size", "2"], world_size=2))
    hp_args, hp_model = build()
    _, fp8_model = build(*FP8_FLAGS)
    _, ends_model = build(*FP8_FLAGS, "--first-last-layers-bf16")
    fp8_model.load_state_dict(hp_model.state_dict())
    result = {"classes": {name: {n: type(m).__name__ for n, m in model.named_modules() if n}
                          for name, model in (("fp8", fp8_model), ("ends", ends_model), ("hp", hp_model))}}
    result["dispatch_fp8"] = {name: [getattr(getattr(layer.mlp, "token_dispatcher", None), "fp8_dispatch", None)
                                     for layer in model.decoder.layers]
                              for name, model in (("fp8", fp8_model), ("ends", ends_model))}
    attention = fp8_model.decoder.layers[1].self_attention
    config = fp8_model.config
    result["linears"] = {
        "kv_down_proj": check_linear(attention.linear_kv_down_proj, config.hidden_size, 1),
        "linear_proj": check_linear(attention.linear_proj, config.num_attention_heads * config.v_head_dim, 2),
        "expert_fc1": check_linear(fp8_model.decoder.layers[1].mlp.experts.local_experts[0].linear_fc1,
                                   config.hidden_size, 3),
    }
    torch.manual_seed(11)
    tokens = torch.randint(0, hp_args.model_config.vocab_size, (2, 32))
    for name, model in (("hp", hp_model), ("fp8", fp8_model)):
        model.zero_grad()
        result[f"{name}_loss"], result[f"{name}_grad"] = model_loss_and_grads(model, tokens)
    hp_grad, fp8_grad = result.pop("hp_grad"), result.pop("fp8_grad")
    result["grad_cosine"] = torch.nn.functional.cosine_similarity(hp_grad.flatten(), fp8_grad.flatten(), dim=0).item()
    result["grad_differs"] = not torch.equal(hp_grad, fp8_grad)
    result["dispatch"] = check_dispatch(fp8_model.decoder.layers[1].mlp.token_dispatcher,
                                        hp_model.decoder.layers[1].mlp.token_dispatcher,
                                        config.hidden_size, config.num_moe_experts, config.moe_router_topk)
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
