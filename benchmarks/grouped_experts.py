"""Routed experts: megatron-core's SequentialMLP loop vs our grouped GEMMs (--moe-grouped-gemm) on one layer.

The same weights and rows through both (forward + backward, steps interleaved); prints the median step time of
each, their ratio and the largest output difference. Rows are spread over the experts as a router would
(unevenly, some experts empty).

    python benchmarks/grouped_experts.py                       # CPU: small shapes, fp32
    python benchmarks/grouped_experts.py --device cuda         # DeepSeek-V3's expert shapes in BF16
"""

import argparse
import statistics
import time

import torch


def build(config, module_spec, num_experts, device):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.spec_utils import build_module

    return build_module(module_spec, num_experts, config, pg_collection=get_default_pg_collection()).to(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--experts", type=int, default=8, help="local experts (V3: 256 / EP)")
    parser.add_argument("--rows", type=int, default=None, help="rows reaching the experts (default: per device)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device is visible")

    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_dsv3.models import spec
    from megatron_dsv3.models.presets import get_preset
    from megatron_dsv3.models.transformer_config import build_transformer_config
    from megatron_dsv3.moe.grouped_experts import GroupedExperts
    from megatron_dsv3.training.initialize import initialize_single_process

    initialize_single_process()
    cuda = args.device == "cuda"
    preset = get_preset("deepseek-v3") if cuda else get_preset("tiny").replace(hidden_size=512, moe_ffn_hidden_size=256)
    rows = args.rows or (32768 if cuda else 2048)
    config = build_transformer_config(preset, bf16=cuda, moe_grouped_gemm=True)
    loop = build(config, spec.ModuleSpec(module=SequentialMLP, submodules=spec._swiglu_mlp(spec.HIGH_PRECISION)),
                 args.experts, args.device)
    grouped_spec = spec.experts_spec(config, spec.HIGH_PRECISION)
    if grouped_spec.module is not GroupedExperts:
        raise SystemExit(f"error: this device runs {grouped_spec.module.__name__} for --moe-grouped-gemm, "
                         "not torch._grouped_mm (a GPU before Hopper?)")
    grouped = build(config, grouped_spec, args.experts, args.device)
    with torch.no_grad():
        for p in loop.parameters():
            p.normal_(0, 0.02)
    grouped.load_state_dict(loop.state_dict())

    generator = torch.Generator().manual_seed(0)
    share = torch.rand(args.experts, generator=generator) ** 3  # uneven load
    share[-1] = 0  # an expert without rows
    counts = (share / share.sum() * rows).floor().long()
    counts[0] += rows - counts.sum()
    dtype = config.params_dtype
    x = torch.randn(rows, config.hidden_size, generator=generator).to(args.device, dtype)
    probs = torch.rand(rows, generator=generator).to(args.device, torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(module):
        leaf = x.detach().requires_grad_()
        sync()
        start = time.perf_counter()
        out, _ = module(leaf, counts, probs)
        out.float().square().sum().backward()
        sync()
        return time.perf_counter() - start, out.detach()

    times = {"loop": [], "grouped": []}
    for i in range(args.warmup + args.steps):
        (t_loop, out_loop), (t_grouped, out_grouped) = step(loop), step(grouped)
        if i >= args.warmup:
            times["loop"].append(t_loop)
            times["grouped"].append(t_grouped)
    diff = (out_loop.float() - out_grouped.float()).abs().max().item()
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    print(f"{args.experts} experts, hidden {config.hidden_size}, expert width {config.moe_ffn_hidden_size}, "
          f"{rows} rows, {dtype}, {args.device}, forward+backward, {args.steps} interleaved steps")
    print(f"{'SequentialMLP ms':>17} {'grouped ms':>11} {'grouped/loop':>13} {'max |Δ output|':>15}")
    print(f"{ms['loop']:>17.2f} {ms['grouped']:>11.2f} {ms['grouped'] / ms['loop']:>12.2f}x {diff:>15.2e}")


if __name__ == "__main__":
    main()
