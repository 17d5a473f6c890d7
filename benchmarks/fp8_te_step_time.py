"""Training step time of Transformer Engine's blockwise FP8 (DeepSeek-V3's recipe) vs BF16 on one GPU.

    python benchmarks/fp8_te_step_time.py [--preset deepseek-v2-lite] [--num-layers 4] [--seq-length 4096]
        [--micro-batch-size 1] [--steps 10] [--warmup 3] [--recipes bf16,blockwise] [pretrain flags...]

Needs a CUDA GPU and Transformer Engine (the image the Dockerfile builds: NGC PyTorch); blockwise also needs
TE ≥ 2.3, SM ≥ 9.0 and CUDA ≥ 12.9 (megatron_dsv3.fp8.recipes). Elsewhere it exits with status 2 and one line
saying what is missing, before doing anything else.

Builds the preset's decoder stack (MLA + DeepSeekMoE layers) with the trainer's setup_model_and_optimizer (our
spec, the layout-independent init, so every recipe starts from the same weights, DDP, Adam) once per recipe, one
process, world size 1, and runs --warmup untimed then --steps timed steps of the trainer's train_step (forward, backward, Adam)
on the same mock-data batches. Per recipe it prints:
  FP8 linears  TE linear modules whose last forward ran inside fp8_autocast / all TE linear modules
  step ms      mean wall time of a timed step, torch.cuda.synchronize() before and after each
  TFLOP/s      flops_per_token(model, seq) · global batch · seq / step time, the trainer's TFLOP/s/device;
               flops_per_token = 6·N_matmul + 3·2·L·heads·(d_qk + d_rope + d_v)·(s + 1)/2 (param_count.py)
  peak GiB     torch.cuda.max_memory_allocated() from building the model to the last step
  loss         LM loss of the first and the last timed step (a sanity check: recipes should agree closely)
bf16: --bf16 with the same TE linear modules and megatron-core's fp8 switch off (no fp8_autocast). An FP8
recipe R: --bf16 --fp8-format e4m3 --fp8-recipe R (recipes.fp8_config_fields), so megatron-core's
TransformerBlock enters TE's fp8_autocast with get_fp8_context(config, layer) around every decoder layer.
Any other pretrain_dsv3.py flag (e.g. --hidden-size 1024, --num-experts 32, --lr 1e-4) is passed to every run.
Memory: 18 bytes per parameter (BF16 weight 2 + FP32 main gradient 4 + FP32 master weight 4 + Adam 2·4) plus
activations; the default 4-layer deepseek-v2-lite stack (2.25B parameters) needs about 41 GB + activations.
"""

import argparse
import gc
import itertools
import sys
import time

import torch
import torch.distributed as dist

from megatron_dsv3.fp8.recipes import FP8_FORMATS, FP8_RECIPES, add_fp8_args, probe_machine, validate_fp8_args
from megatron_dsv3.models.presets import PRESETS

# megatron-core warns on import where TE or Apex is missing, so it is imported only past refuse_unless_capable()
SCRIPT = "benchmarks/fp8_te_step_time.py"
GiB = 2**30


def recipe_list(text: str) -> list:
    recipes = [r for r in text.split(",") if r]
    unknown = [r for r in recipes if r not in ("bf16", *FP8_RECIPES)]
    if unknown or not recipes:
        raise argparse.ArgumentTypeError(f"unknown recipe(s) {unknown}; choose from bf16,{','.join(FP8_RECIPES)}")
    return recipes


def parse_cli(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--preset", choices=sorted(PRESETS), default="deepseek-v2-lite",
                   help="model preset (--model of pretrain_dsv3.py)")
    p.add_argument("--num-layers", type=int, default=4,
                   help="decoder layers: the preset's leading dense layers (at most N - 1), the rest MoE; "
                        "0 keeps the preset's layers")
    p.add_argument("--seq-length", type=int, default=4096)
    p.add_argument("--micro-batch-size", type=int, default=1, help="one micro-batch per step")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps before them")
    p.add_argument("--recipes", type=recipe_list, default="bf16,blockwise",
                   help=f"comma-separated, run in this order: bf16 and/or FP8 recipes ({', '.join(FP8_RECIPES)})")
    p.add_argument("--fp8-format", choices=FP8_FORMATS, default="e4m3", help="--fp8-format of the FP8 recipes")
    cli, extra = p.parse_known_args(argv)
    if cli.steps < 1 or cli.warmup < 0 or cli.num_layers < 0:
        p.error("--steps must be ≥ 1, --warmup and --num-layers ≥ 0")
    return cli, extra


def refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def refuse_unless_capable(cli) -> None:
    """Exit with status 2 and one line unless this machine has CUDA, TE and what each FP8 recipe needs
    (recipes.probe_machine and the requirement table pretrain_dsv3.py checks at startup)."""
    machine = probe_machine()
    if machine.sm is None or machine.te is None:
        refuse(f"{SCRIPT} needs a CUDA GPU and Transformer Engine (the NGC PyTorch container); "
               f"this machine has {machine.describe()}")
    for recipe in cli.recipes:
        if recipe == "bf16":
            continue
        parser = argparse.ArgumentParser()
        add_fp8_args(parser)
        try:
            validate_fp8_args(parser.parse_args(["--fp8-format", cli.fp8_format, "--fp8-recipe", recipe]))
        except ValueError as e:  # without its last clause, the trainer's --fp8-emulation hint
            refuse(f"{SCRIPT}: " + str(e).rsplit("; ", 1)[0])


def training_flags(cli, recipe: str, extra: list) -> list:
    n = cli.num_layers
    flags = ["--model", cli.preset, "--seq-length", str(cli.seq_length), "--micro-batch-size",
             str(cli.micro_batch_size), "--global-batch-size", str(cli.micro_batch_size),
             "--train-iters", str(cli.warmup + cli.steps), "--bf16",
             "--lr", "2.2e-4", "--min-lr", "2.2e-5"]  # DeepSeek-V3's peak lr; the trainer's 3e-3 suits the tiny preset
    if n:
        pattern = PRESETS[cli.preset].moe_layer_pattern
        dense = min(pattern.index(1) if 1 in pattern else n, n - 1)
        flags += ["--num-layers", str(n), "--moe-layer-freq", f"([0]*{dense}+[1]*{n - dense})"]
    if recipe != "bf16":
        flags += ["--fp8-format", cli.fp8_format, "--fp8-recipe", recipe]
    return flags + extra


def measure(cli, recipe: str, extra: list) -> dict:
    """Builds the model for `recipe`, trains cli.warmup + cli.steps steps; the timed steps' numbers."""
    from megatron.core.fp8_utils import get_fp8_recipe
    from transformer_engine.pytorch.fp8 import FP8GlobalStateManager

    from megatron_dsv3.models.param_count import flops_per_token
    from megatron_dsv3.models.transformer_config import transformer_config_from_args
    from megatron_dsv3.training.arguments import parse_args
    from megatron_dsv3.training.batch_schedule import start_batch_schedule
    from megatron_dsv3.training.initialize import set_seed
    from megatron_dsv3.training.metrics import clear_mtp_loss_tracker
    from megatron_dsv3.training.train import (
        build_datasets, build_job_tokenizer, chunk_iterators, setup_model_and_optimizer, train_step,
    )

    args = parse_args(training_flags(cli, recipe, extra), world_size=1)
    tokenizer = build_job_tokenizer(args)
    batches = [{k: v.cuda() for k, v in batch.items()} for batch in itertools.islice(
        chunk_iterators(args, build_datasets(args, tokenizer)[0], 0, 1), args.train_iters * args.num_microbatches)]

    gc.collect()  # the previous run's model and optimizer
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    set_seed(args.seed)
    config = transformer_config_from_args(args)
    # spec.linear_classes gives TE's linears only under megatron's fp8 switch: bf16 builds with it on and
    # trains with it off, so both runs use the same TE modules
    fp8 = config.fp8
    config.fp8 = fp8 or cli.fp8_format
    [model], optimizer, scheduler = setup_model_and_optimizer(args, config)
    start_batch_schedule(args)  # train_step reads the micro-batch count from megatron-core's calculator
    config.fp8 = fp8

    data, times, losses, skipped = iter(batches), [], [], 0
    for step in range(args.train_iters):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _, ok = train_step(args, [model], optimizer, scheduler, data, config)
        torch.cuda.synchronize()
        if step >= cli.warmup:
            times.append(time.perf_counter() - start)
            losses.append(loss.item())
            skipped += not ok
        clear_mtp_loss_tracker()

    te_linears = [m for m in model.modules() if hasattr(m, "fp8_meta")]
    step_s = sum(times) / len(times)
    flops = flops_per_token(args.model_config, args.seq_length) * args.global_batch_size * args.seq_length
    row = dict(recipe=recipe, te_recipe=type(get_fp8_recipe(config)).__name__ if config.fp8 else "-",
               fp8_linears=sum(bool(getattr(m, "fp8", False)) for m in te_linears), te_linears=len(te_linears),
               step_ms=1e3 * step_s, tflops=flops / step_s / 1e12,
               peak_gib=torch.cuda.max_memory_allocated() / GiB, losses=losses, skipped=skipped)
    FP8GlobalStateManager.reset()  # drop TE's references to this model's FP8 state (delayed scaling's amaxes)
    if recipe != "bf16" and row["fp8_linears"] == 0:
        raise SystemExit(f"error: {SCRIPT}: --recipes {recipe} ran no Transformer Engine linear in FP8")
    return row


def print_header(cli, args) -> None:
    from megatron_dsv3.models.param_count import count_parameters

    m, counts = args.model_config, count_parameters(args.model_config)
    pattern = m.moe_layer_pattern
    print(f"{cli.preset}: {m.num_layers} layers ({pattern.count(0)} dense + {sum(pattern)} MoE, {m.num_experts} "
          f"experts, top-{m.moe_router_topk}), hidden {m.hidden_size}, MTP {m.mtp_num_layers or 0}; "
          f"{counts.total / 1e9:.3g}B parameters without MTP, {counts.activated / 1e9:.3g}B activated per token")
    print(f"seq {args.seq_length} × micro-batch {args.micro_batch_size}, {cli.steps} timed steps after {cli.warmup} "
          f"warm-up; {probe_machine().describe()}")


def print_table(rows: list) -> None:
    print(f"{'recipe':<12}{'TE recipe':<22}{'FP8 linears':>12}{'step ms':>10}{'TFLOP/s':>9}{'peak GiB':>10}"
          f"{'loss first':>12}{'loss last':>11}")
    for r in rows:
        print(f"{r['recipe']:<12}{r['te_recipe']:<22}{r['fp8_linears']:>6}/{r['te_linears']:<5}{r['step_ms']:>10.1f}"
              f"{r['tflops']:>9.1f}{r['peak_gib']:>10.2f}{r['losses'][0]:>12.4f}{r['losses'][-1]:>11.4f}"
              + (f"  ({r['skipped']} non-finite steps skipped)" if r["skipped"] else ""))
    base = next((r for r in rows if r["recipe"] == "bf16"), None)
    for r in rows if base else []:
        if r is not base:  # relative loss difference |fp8 − bf16| / bf16 at the last step
            print(f"{r['recipe']} vs bf16: {base['step_ms'] / r['step_ms']:.2f}× the speed, "
                  f"{r['peak_gib'] / base['peak_gib']:.2f}× the peak memory, last-step loss differs by "
                  f"{abs(r['losses'][-1] - base['losses'][-1]) / base['losses'][-1]:.3%}")


def main(argv=None):
    cli, extra = parse_cli(argv)
    refuse_unless_capable(cli)
    from megatron_dsv3.training.arguments import parse_args
    from megatron_dsv3.training.initialize import destroy_distributed, initialize_distributed

    args = parse_args(training_flags(cli, "bf16", extra), world_size=1)  # the trainer's checks, before any run
    torch.cuda.set_device(0)
    # one rank, no rendezvous port; NCCL for CUDA tensors, gloo for any CPU ones
    dist.init_process_group("cpu:gloo,cuda:nccl", store=dist.HashStore(), rank=0, world_size=1)
    initialize_distributed(args)  # megatron's parallel_state (all sizes 1) and seeds
    try:
        print_header(cli, args)
        print_table([measure(cli, recipe, extra) for recipe in cli.recipes])
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
