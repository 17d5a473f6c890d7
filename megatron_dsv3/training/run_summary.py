"""What a run is (a start banner, rank 0, once) and what it did (an end summary, printed by the metrics writer,
the last rank, which holds the loss). Parameter counts are models/param_count's, as tools/model_info prints."""

import time

import torch.distributed as dist

from megatron_dsv3.models.param_count import count_parameters

BANNER_HEAD = "==== run:"
SUMMARY_HEAD = "==== done:"


def split_tokens(dataset):
    """Tokens of the documents a (blended) GPT dataset draws from; None for mock data."""
    if hasattr(dataset, "datasets"):  # BlendedDataset
        parts = [split_tokens(d) for d in dataset.datasets]
        return None if None in parts else sum(parts)
    indexed = getattr(dataset, "dataset", None)
    lengths = getattr(indexed, "sequence_lengths", None)
    indices = getattr(dataset, "indices", None)
    if lengths is None or indices is None:
        return None
    return int(lengths[indices].sum())


def banner_lines(args, train_set) -> list:
    m = args.model_config
    p = count_parameters(m)
    moe = f"{m.num_experts} routed experts top-{m.moe_router_topk}" if m.num_experts else "dense"
    vpp = f", VPP {args.virtual_pipeline_model_parallel_size}" if args.virtual_pipeline_model_parallel_size else ""
    tokens_per_step = args.global_batch_size * args.seq_length
    ramp = f" (ramp-up {' '.join(map(str, args.rampup_batch_size))})" if args.rampup_batch_size else ""
    fp8 = "off"
    if args.fp8_format:
        fp8 = f"{args.fp8_format} {args.fp8_recipe or ''}{' (emulated)' if args.fp8_emulation else ''}".strip()
    recompute = "off"
    if args.recompute_granularity == "full":
        recompute = f"full, {args.recompute_method} {args.recompute_num_layers} layers"
    elif args.recompute_granularity == "selective":
        recompute = f"selective {' '.join(args.recompute_modules or ['core_attn'])}"
    if args.mock_data:
        data = "mock (synthetic tokens)"
    else:
        data = " ".join(args.data_path)
        tokens = split_tokens(train_set) if train_set is not None else None
        if tokens is not None:
            data += f" ({tokens:,} tokens in the train split's documents)"
    return [
        f"{BANNER_HEAD} model {args.model}: {m.num_layers} layers, hidden {m.hidden_size}, {moe}, "
        f"MTP {m.mtp_num_layers or 0}, vocab {m.vocab_size}",
        f"  parameters   {p.total:,} total ({p.total_with_mtp:,} with MTP), {p.activated:,} activated per token",
        f"  layout       TP {args.tensor_model_parallel_size} × PP {args.pipeline_model_parallel_size} × "
        f"DP {args.data_parallel_size} (EP {args.expert_model_parallel_size}{vpp}) = {args.world_size} ranks, "
        f"schedule {args.pipeline_schedule}",
        f"  batch        global {args.global_batch_size}{ramp} = micro {args.micro_batch_size} × "
        f"{args.num_microbatches} micro-batches × DP {args.data_parallel_size}; seq {args.seq_length}; "
        f"{tokens_per_step:,} tokens/step",
        f"  training     {args.train_iters} iterations, {args.train_samples:,} samples; "
        f"{'bf16' if args.bf16 else 'fp32'}, FP8 {fp8}, recompute {recompute}",
        f"  data         {data}; tokenizer {args.tokenizer_type}",
        f"  checkpoints  save {args.save or '-'} (every {args.save_interval or '-'} iterations), "
        f"load {args.load or '-'}",
    ]


class RunSummary:
    def __init__(self, args):
        self.args = args
        self.start = time.time()
        self.first_iteration = 1
        self.iterations = self.skipped = self.tokens = 0
        self.step_time = 0.0
        self.checkpoint = None
        self.expert_load_png = None

    def print_banner(self, train_set) -> None:
        if dist.get_rank() == 0:
            print("\n".join(banner_lines(self.args, train_set)), flush=True)

    def started_at(self, iteration: int) -> None:
        self.first_iteration = iteration + 1

    def record(self, tokens: int, step_time: float, skipped: bool) -> None:
        self.iterations += 1
        self.tokens += tokens
        self.step_time += step_time
        self.skipped += int(skipped)

    def saved(self, iteration: int, expert_load_png) -> None:
        self.checkpoint = f"{self.args.save}/iter_{iteration:07d}"
        self.expert_load_png = expert_load_png or self.expert_load_png

    def lines(self, iteration: int, last: dict) -> list:
        wall = time.time() - self.start
        first = self.first_iteration
        if self.iterations:
            head = (f"iterations {first}..{iteration} ({self.iterations} this run, {self.skipped} skipped), "
                    f"{self.tokens:,} tokens")
        else:
            head = f"no training iterations this run (at iteration {iteration})"
        lines = [f"{SUMMARY_HEAD} {head}, wall {wall:.1f} s"]
        if self.iterations:
            lines.append(f"  mean step    {self.step_time / self.iterations * 1000:.0f} ms, "
                         f"{self.tokens / self.step_time:,.0f} tokens/s")
        if "interval_lm_loss" in last:
            loss = f"  final loss   lm {last['interval_lm_loss']:.4f}"
            if "interval_mtp_loss" in last:
                loss += f", mtp {last['interval_mtp_loss']:.4f}"
            first_logged = last["iteration"] - last["interval_iterations"] + 1
            lines.append(loss + f" (mean of iterations {first_logged}..{last['iteration']})")
        lines.append(f"  checkpoint   {self.checkpoint or 'none saved'}")
        if self.expert_load_png:
            lines.append(f"  expert load  {self.expert_load_png}")
        return lines

    def print_summary(self, iteration: int, last: dict, is_writer: bool) -> None:
        if is_writer:
            print("\n".join(self.lines(iteration, last)), flush=True)
