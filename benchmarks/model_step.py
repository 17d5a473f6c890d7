"""Training-step time of our DeepSeek-V3 model against transformers' DeepseekV3ForCausalLM, same weights.

One process, one model config built twice: ours as `pretrain_dsv3.py` builds it (megatron-core GPTModel with
our spec, router and dispatcher) and transformers', loaded with the weights our converter writes, so both
compute the same function (checked: the losses agree). Forward + backward steps alternate between the two,
so both see the same machine state; the table gives median step times, the median of the paired ratios and
the peak bytes autograd saves for backward, parameters excluded (pipeline.recording.SavedActivationMeter, in one
more step of each, untimed: the hooks cost time).

On a CPU our step runs as the trainer's does: the model's forward outside the platform's CUDA-to-CPU mode, the
backward inside it (our Python autograd nodes pay its per-call cost); transformers' step runs wholly outside it,
as it does without this package.

MTP is left out of both (transformers has no MTP head); the router keeps its bias, groups and balance loss.
Each size runs twice: our routed experts as grouped GEMMs (--moe-grouped-gemm; transformers' DeepseekV3 computes
its experts with torch._grouped_mm too, so this row compares like with like) and as the per-expert loop.

    python benchmarks/model_step.py                       # CPU, fp32, 1 thread, tiny and 2x-wide
    python benchmarks/model_step.py --device cuda         # bf16 on a GPU
"""

import argparse
import json
import statistics
import tempfile
import time

import torch

from megatron_dsv3 import platform
from megatron_dsv3.models.presets import get_preset

EXPERTS = {  # our routed experts, as pretrain_dsv3.py builds them
    "grouped": "--moe-grouped-gemm, torch._grouped_mm (as transformers' DeepseekV3 computes its experts)",
    "loop": "the default, megatron-core's SequentialMLP",
}
SIZES = {  # name -> overrides of the tiny preset
    "tiny": {},
    "tiny-2x-wide": {"hidden_size": 128, "num_attention_heads": 8, "ffn_hidden_size": 256, "q_lora_rank": 64,
                     "kv_lora_rank": 64, "moe_ffn_hidden_size": 64, "moe_shared_expert_intermediate_size": 64},
}


def build_ours(cfg, seq_length: int, device: str, dtype: torch.dtype, grouped: bool):
    from megatron_dsv3.training.initialize import initialize_single_process
    from megatron_dsv3.models.gpt_builder import build_model
    from megatron_dsv3.models.transformer_config import build_transformer_config
    from megatron_dsv3.training.init_weights import init_weights_layout_independent

    initialize_single_process()
    config = build_transformer_config(cfg, bf16=dtype == torch.bfloat16, moe_grouped_gemm=grouped)
    model = build_model(config, cfg.vocab_size, seq_length, pre_process=True, post_process=True, pp_rank=0)
    init_weights_layout_independent([model], std=cfg.init_method_std, seed=1234)
    return model.to(device)


def build_transformers(ours, cfg, device: str, dtype: torch.dtype):
    """transformers' model with our weights, through the converter's name mapping and config writer."""
    from safetensors.torch import save_file
    from transformers import DeepseekV3ForCausalLM

    from megatron_dsv3.conversion.hf_config import model_config_to_hf_config
    from megatron_dsv3.conversion.name_mapping import (
        megatron_layer_index, megatron_to_hf_global_tensors, megatron_to_hf_layer_tensors)

    state = {k: v for k, v in ours.state_dict().items() if not k.endswith("_extra_state")}
    hf_state = megatron_to_hf_global_tensors(
        {k: v for k, v in state.items() if megatron_layer_index(k, cfg) is None}, cfg)
    for layer in range(cfg.num_layers):
        tensors = {k: v for k, v in state.items() if megatron_layer_index(k, cfg) == layer}
        hf_state.update(megatron_to_hf_layer_tensors(layer, tensors, cfg))
    with tempfile.TemporaryDirectory() as tmp:  # from_pretrained maps per-expert tensors to its fused layout
        save_file({k: v.contiguous() for k, v in hf_state.items()}, f"{tmp}/model.safetensors")
        with open(f"{tmp}/config.json", "w") as f:
            json.dump(model_config_to_hf_config(cfg, "float32"), f)
        model = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    return model.to(device=device, dtype=dtype)


def our_step(model, tokens, labels, mask):
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    per_token = model(tokens, positions, None, labels=labels, loss_mask=mask)
    loss = (per_token.float() * mask).sum() / mask.sum()
    loss.backward()
    return loss.detach()


def hf_step(model, tokens, labels, mask):
    with platform.cpu_mapping_suspended():
        logits = model(tokens).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        loss = (loss * mask.flatten()).sum() / mask.sum()
        loss.backward()
    return loss.detach()


def timed(step, model, batch, sync):
    model.zero_grad(set_to_none=True)
    sync()
    start = time.perf_counter()
    loss = step(model, *batch)
    sync()
    return time.perf_counter() - start, loss.item()


def saved_activation_bytes(step, model, batch) -> int:
    """Peak bytes autograd holds for backward during one (untimed) step, parameters excluded."""
    from megatron_dsv3.pipeline.recording import SavedActivationMeter

    model.zero_grad(set_to_none=True)
    with SavedActivationMeter(list(model.parameters())) as meter:
        step(model, *batch)
    return meter.peak


def compare(name, overrides, experts, args, dtype):
    cfg = get_preset("tiny").replace(mtp_num_layers=None, **overrides)
    ours = build_ours(cfg, args.seq_length, args.device, dtype, experts == "grouped")
    reference = build_transformers(ours, cfg, args.device, dtype)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_length + 1), generator=generator)
    tokens, labels = tokens[:, :-1].to(args.device), tokens[:, 1:].to(args.device)
    mask = torch.ones_like(labels, dtype=torch.float32)
    batch = (tokens, labels, mask)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    times = {"ours": [], "transformers": []}
    for step in range(args.warmup + args.steps):
        t_ours, loss_ours = timed(our_step, ours, batch, sync)
        t_ref, loss_ref = timed(hf_step, reference, batch, sync)
        if step == 0:
            if abs(loss_ours - loss_ref) > 1e-4 * max(1.0, abs(loss_ref)) * (100 if dtype != torch.float32 else 1):
                raise SystemExit(f"{name}: losses differ (ours {loss_ours:.6f}, transformers {loss_ref:.6f}): "
                                 "the two models do not compute the same function")
            first_losses = (loss_ours, loss_ref)
        if step >= args.warmup:
            times["ours"].append(t_ours)
            times["transformers"].append(t_ref)
    ratio = statistics.median(o / r for o, r in zip(times["ours"], times["transformers"]))
    params = sum(p.numel() for p in ours.parameters())
    return {"size": name, "experts": experts, "params": params, "loss": first_losses,
            "ours_ms": 1e3 * statistics.median(times["ours"]),
            "ref_ms": 1e3 * statistics.median(times["transformers"]),
            "ratio": ratio,
            "saved": (saved_activation_bytes(our_step, ours, batch), saved_activation_bytes(hf_step, reference, batch))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads (default 1)")
    parser.add_argument("--experts", nargs="+", default=list(EXPERTS), choices=list(EXPERTS),
                        help="our routed experts: " + "; ".join(f"{k}: {v}" for k, v in EXPERTS.items()))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device is visible")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    print(f"forward+backward, batch {args.batch_size} x seq {args.seq_length}, {dtype}, {args.device}, "
          f"{args.steps} interleaved steps after {args.warmup} warm-up; transformers' experts are grouped GEMMs")
    header = (f"{'size':<14}{'our experts':<13}{'params':>10}{'loss ours / transformers':>28}{'ours ms':>10}"
              f"{'transf. ms':>12}{'ratio':>8}{'saved MiB ours / transf.':>28}")
    print(header)
    for name in args.sizes:
        for experts in args.experts:
            row = compare(name, SIZES[name], experts, args, dtype)
            print(f"{row['size']:<14}{row['experts']:<13}{row['params']:>10,}{row['loss'][0]:>14.5f} / "
                  f"{row['loss'][1]:<11.5f}{row['ours_ms']:>10.1f}{row['ref_ms']:>12.1f}{row['ratio']:>7.2f}x"
                  f"{row['saved'][0] / 2**20:>15.2f} / {row['saved'][1] / 2**20:<10.2f}", flush=True)


if __name__ == "__main__":
    main()
