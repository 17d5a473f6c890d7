"""One global batch of the tiny model through the real training loop under several pipeline schedules, in one
launch; rank files hold, per schedule, the loss, the gradient norm and every gradient under its global name
(each DualPipe copy separately), plus the gathered DualPipe timeline.

    torchrun --nproc-per-node N tests/scripts/dualpipe_parity.py OUT_DIR SCHEDULES [pretrain flags]

SCHEDULES: comma-separated megatron|interleaved|dualpipe|dualpipev, the dual ones optionally with "+overlap"
(--overlap-moe-expert-parallel-comm), any optionally with "+keep" (config.deallocate_pipeline_outputs off: stage
outputs stay whole until their backward) and then "+meter" (the step under recording.SavedActivationMeter; its
saved-tensor hooks change the dual schedules' deferred weight-gradients of stage 0, so gradients are compared
without it); `megatron` is train.py's own schedule (no pipelining on one rank, 1F1B with
--pipeline-model-parallel-size > 1), `interleaved` megatron's interleaved 1F1B with one layer per virtual stage.
Megatron's schedules are timed by recording.record_megatron_ops. `activation_peak` (with "+meter"): the step's peak of
recording.SavedActivationMeter (saved-for-backward tensors plus what the dual schedules keep alive themselves).
"""

import contextlib

import sys
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from dump_loss_and_grads import global_grads
from megatron_dsv3.moe.topology import destroy_ep_topology
from megatron_dsv3.pipeline.dualpipe import dump_trace, gather_trace, get_dual_forward_backward_func
from megatron_dsv3.pipeline.placement import DUAL_SCHEDULES, build_dual_chunks
from megatron_dsv3.pipeline.recording import SavedActivationMeter, record_megatron_ops
from megatron_dsv3.pipeline.weight_grad_store import SplitBackwardMatmul
from megatron_dsv3.training import train
from megatron_dsv3.training.arguments import parse_args
from megatron_dsv3.training.init_weights import init_weights_layout_independent


def build_dual_model_chunks(schedule, args, config):
    """train.build_model_chunks with the DualPipe/DualPipeV placement."""
    dispatcher = train.TOKEN_DISPATCHERS[args.moe_token_dispatcher_type]
    chunks = build_dual_chunks(config, args.padded_vocab_size, args.seq_length, schedule, token_dispatcher=dispatcher)
    init_weights_layout_independent(chunks, std=config.init_method_std, seed=args.seed)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=args.use_distributed_optimizer, overlap_grad_reduce=False
    )
    return [DistributedDataParallel(config, ddp_config, c, disable_bucketing=i > 0) for i, c in enumerate(chunks)]


def unsplit_linears(chunks):
    """Parallel linear layers whose weight-gradient a B op cannot defer (pipeline.weight_grad_store)."""
    linears = (ColumnParallelLinear, RowParallelLinear)
    return sorted({name for c in chunks for name, m in getattr(c, "module", c).named_modules()
                   if isinstance(m, linears) and not isinstance(m, SplitBackwardMatmul)})


def embedding_sharing(chunks, optimizer) -> dict:
    """How this rank holds the word embedding: `uses` (chunks whose forward embeds tokens: stage 0 and MTP),
    `parameters` (distinct embedding parameters), `optimizer_states` (optimizer state entries of those), and
    all distinct trainable parameters against all optimizer state entries."""
    modules = [getattr(c, "module", c) for c in chunks]
    embeddings = [m.embedding.word_embeddings.weight for m in modules if hasattr(m, "embedding")]
    distinct = {id(e) for e in embeddings}
    states = [p for sub in getattr(optimizer, "chained_optimizers", [optimizer])
              for p in sub.optimizer.state]
    params = {id(p) for m in modules for p in m.parameters() if p.requires_grad}
    return dict(uses=len(embeddings), parameters=len(distinct),
                optimizer_states=sum(id(p) in distinct for p in states),
                distinct_parameters=len(params), all_optimizer_states=len(states),
                mtp_embedding_parameters=[n for m in modules for n, _ in m.named_parameters()
                                          if n.startswith("mtp.") and "word_embeddings" in n])


def recorded(iterator, seen):
    for batch in iterator:
        seen.append(batch)
        yield batch


def run(name, argv, out_dir):
    metered = name.endswith("+meter")
    keep = name.removesuffix("+meter").endswith("+keep")
    name_base = name.removesuffix("+meter").removesuffix("+keep")
    schedule, overlapped = name_base.removesuffix("+overlap"), name_base.endswith("+overlap")
    # lr 0: the step leaves the weights as they are; clip far above the norm: the norm is computed, not applied
    extra = ["--pipeline-schedule", "interleaved", "--num-layers-per-virtual-pipeline-stage", "1"]
    args = parse_args(argv + ["--train-iters", "1", "--clip-grad", "1e9"]
                      + (extra if schedule == "interleaved" else []))
    args.lr = args.min_lr = 0.0  # the step leaves the weights as they are (the CLI refuses --lr 0)
    saved = train.build_model_chunks, train.get_forward_backward_func, train.train_step
    captured = {}

    def step_and_capture(args, chunks, optimizer, scheduler, data_iterator, config):
        iterators = data_iterator if isinstance(data_iterator, list) else [data_iterator]
        batches = [[] for _ in iterators]
        recording = [recorded(it, seen) for it, seen in zip(iterators, batches)]
        ops = []
        timed = (contextlib.nullcontext() if schedule in DUAL_SCHEDULES
                 else record_megatron_ops(chunks, parallel_state.get_pipeline_model_parallel_rank(), ops))
        config.deallocate_pipeline_outputs = not keep
        params = [p for c in chunks for p in c.parameters()]
        meter = SavedActivationMeter(params + [p.main_grad for p in params]) if metered else contextlib.nullcontext()
        with timed, meter:
            result = saved[2](args, chunks, optimizer, scheduler,
                              recording if isinstance(data_iterator, list) else recording[0], config)
        captured.update(loss=result[0], grad_norm=result[1], activation_peak=meter.peak if metered else None,
                        embedding=embedding_sharing(chunks, optimizer),
                        grads=[global_grads([c]) for c in chunks],  # per chunk: DualPipe's copies separately
                        unsplit_linears=unsplit_linears(chunks))
        captured["trace"] = gather_trace() if schedule in DUAL_SCHEDULES else gather_trace(ops)
        # the same batch again, forward only (lr 0 and no expert-bias update: the same weights and routing)
        eval_losses = train.get_forward_backward_func()(
            forward_step_func=train.forward_step,
            data_iterator=[iter(b) for b in batches] if isinstance(data_iterator, list) else iter(batches[0]),
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=args.num_microbatches,
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
            forward_only=True,
        )
        if eval_losses:
            captured["eval_loss"] = torch.stack([x["lm loss"] for x in eval_losses]).mean()
        return result

    if schedule in DUAL_SCHEDULES:
        train.build_model_chunks = partial(build_dual_model_chunks, schedule)
        train.get_forward_backward_func = partial(get_dual_forward_backward_func, schedule, overlapped)
    train.train_step = step_and_capture
    train.initialize_distributed(args)
    try:
        train._pretrain(args)
    finally:
        train.build_model_chunks, train.get_forward_backward_func, train.train_step = saved
        destroy_ep_topology()
        parallel_state.destroy_model_parallel()
    if "trace" in captured and dist.get_rank() == 0:
        dump_trace(captured["trace"], f"{out_dir}/{name}_trace.json")
    return captured


def main():
    out_dir, schedules, argv = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
    results = {}
    try:
        for schedule in schedules:
            results[schedule] = run(schedule, argv, out_dir)
        torch.save(results, f"{out_dir}/rank{dist.get_rank()}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
