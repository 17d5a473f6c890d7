"""The training loop: model chunks + DDP + (distributed) optimizer, a pipeline schedule, logging,
checkpoints. One `pretrain(args)` call is one job; `pretrain_dsv3.py` parses the flags."""

import time
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.num_microbatches_calculator import (
    get_current_global_batch_size, get_num_microbatches, update_num_microbatches,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_dsv3.checkpointing.checkpoint import load_checkpoint, save_checkpoint
from megatron_dsv3.data.datasets import build_data_iterator, build_pretraining_datasets
from megatron_dsv3.data.fim import fim_settings
from megatron_dsv3.data.tokenizer import build_tokenizer, fit_vocab
from megatron_dsv3.models.gpt_builder import build_model
from megatron_dsv3.models.transformer_config import transformer_config_from_args
from megatron_dsv3.moe.hierarchical_dispatcher import HierarchicalTokenDispatcher
from megatron_dsv3.moe.router import finalize_model_grads_keeping_expert_load
from megatron_dsv3.moe.token_dispatcher import AllToAllTokenDispatcher
from megatron_dsv3.pipeline.dualpipe import get_dual_forward_backward_func
from megatron_dsv3.pipeline.placement import DUAL_SCHEDULES, build_dual_chunks
from megatron_dsv3.training.batch_schedule import start_batch_schedule
from megatron_dsv3.training.ema import build_ema
from megatron_dsv3.training.evaluate import Evaluator, eval_sample_counts
from megatron_dsv3.training.init_weights import init_weights_layout_independent
from megatron_dsv3.training.lr_schedule import build_lr_scheduler
from megatron_dsv3.training.initialize import destroy_distributed, initialize_distributed
from megatron_dsv3.training.input_checks import check_files_before_model
from megatron_dsv3.training.launcher_watch import watch_launcher
from megatron_dsv3.training.metrics import MetricsLogger, clear_mtp_loss_tracker
from megatron_dsv3.training.preemption import EXIT_CODE_REQUEUE, StopConditions
from megatron_dsv3.training.token_schedules import TokenSchedules


TOKEN_DISPATCHERS = {"alltoall": AllToAllTokenDispatcher, "hierarchical": HierarchicalTokenDispatcher}


def build_model_chunks(args, config):
    vpp = args.virtual_pipeline_model_parallel_size
    dispatcher = TOKEN_DISPATCHERS[args.moe_token_dispatcher_type]
    if args.pipeline_schedule in DUAL_SCHEDULES:
        chunks = build_dual_chunks(
            config, args.padded_vocab_size, args.seq_length, args.pipeline_schedule, token_dispatcher=dispatcher
        )
    else:
        chunks = [
            build_model(config, args.padded_vocab_size, args.seq_length, vp_stage=stage, token_dispatcher=dispatcher)
            for stage in (range(vpp) if vpp else [None])
        ]
    init_weights_layout_independent(chunks, std=config.init_method_std, seed=args.seed)
    if torch.cuda.is_available():  # megatron's linears start there; torch's norms and our router do not
        chunks = [chunk.cuda(torch.cuda.current_device()) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=False,
    )
    return [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]


def setup_model_and_optimizer(args, config):
    """Model chunks, optimizer and lr scheduler, with the hooks megatron's schedules call set on `config`."""
    chunks = build_model_chunks(args, config)
    optimizer, scheduler = build_optimizer(args, chunks)
    config.finalize_model_grads_func = finalize_model_grads_keeping_expert_load
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    config.grad_scale_func = optimizer.scale_loss
    return chunks, optimizer, scheduler


def build_optimizer(args, chunks):
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, chunks)
    scheduler = build_lr_scheduler(args, optimizer)
    return optimizer, scheduler


def loss_func(loss_mask, output_tensor):
    """Mean next-token cross entropy over unmasked tokens of the micro-batch (MTP's loss rides
    along in backward through megatron-core's MTPLossAutoScaler)."""
    mask = loss_mask.reshape(-1).float()
    loss = (output_tensor.float().reshape(-1) * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"lm loss": loss.detach().clone()}  # the schedule divides `loss` in place


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    if torch.cuda.is_available():
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    output = model(
        batch["tokens"],
        batch["position_ids"],
        None,
        labels=batch["labels"],
        loss_mask=batch["loss_mask"],
    )
    return output, partial(loss_func, batch["loss_mask"])


def build_datasets(args, tokenizer):
    """(train, validation, test) datasets sized for the run (evaluate.eval_sample_counts)."""
    valid_samples, test_samples = eval_sample_counts(args)
    return build_pretraining_datasets(
        data_path=args.data_path,
        split=args.split,
        mock_data=args.mock_data,
        seq_length=args.seq_length,
        seed=args.seed,
        tokenizer=tokenizer,
        train_samples=0 if args.skip_train else args.train_samples,
        valid_samples=valid_samples,
        test_samples=test_samples,
        data_cache_path=args.data_cache_path,
        valid_data_path=args.valid_data_path,
        test_data_path=args.test_data_path,
        fim=fim_settings(args, tokenizer),
    )


def chunk_iterators(args, dataset, consumed_samples, num_chunks):
    """One iterator per model chunk (the interleaved schedule pulls each chunk's micro-batches)."""
    if dataset is None:
        return None
    iterators = [
        build_data_iterator(
            dataset,
            args.micro_batch_size,
            parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(),
            consumed_samples,
        )
        for _ in range(num_chunks)
    ]
    return iterators if num_chunks > 1 else iterators[0]


def forward_backward_func(args):
    if args.pipeline_schedule in DUAL_SCHEDULES:
        return get_dual_forward_backward_func(args.pipeline_schedule, args.overlap_moe_expert_parallel_comm)
    return get_forward_backward_func()


def train_step(args, chunks, optimizer, scheduler, data_iterator, config):
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = forward_backward_func(args)(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=get_num_microbatches(),
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        forward_only=False,
    )
    lm_loss = None
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        lm_loss = torch.stack([x["lm loss"] for x in losses]).mean()
    if gradients_are_nonfinite(chunks):
        return lm_loss, None, False  # the optimizer and the lr schedule skip this batch
    update_successful, grad_norm, _ = optimizer.step()
    scheduler.step(increment=get_current_global_batch_size())  # the schedule counts samples (lr_schedule)
    return lm_loss, grad_norm, update_successful


def gradients_are_nonfinite(chunks) -> bool:
    """A NaN/Inf in any rank's reduced gradients (a NaN/Inf loss puts one there), before the step."""
    finite = torch.stack([p.main_grad.isfinite().all() for c in chunks for p in c.parameters() if p.requires_grad])
    flag = (~finite.all()).int().reshape(1)  # on the gradients' device: one sync, NCCL-reducible
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def pretrain(args) -> dict:
    """Runs the job described by `args`; returns the last logged metrics."""
    watch_launcher()
    initialize_distributed(args)
    try:
        return _pretrain(args)
    finally:
        if getattr(args, "save_lock", None):
            args.save_lock.release()
        destroy_distributed()


def build_job_tokenizer(args):
    """The job's tokenizer, with the model's vocabulary fitted to it (args.model_config, args.padded_vocab_size)."""
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.model_config.vocab_size)
    args.model_config = fit_vocab(args.model_config, tokenizer)
    args.padded_vocab_size = args.model_config.vocab_size
    return tokenizer


def _pretrain(args) -> dict:
    load_plan = check_files_before_model(args)
    tokenizer = build_job_tokenizer(args)
    config = transformer_config_from_args(args)
    chunks, optimizer, scheduler = setup_model_and_optimizer(args, config)
    ema = build_ema(args, chunks)
    token_schedules = TokenSchedules(args, chunks)
    start_batch_schedule(args)

    iteration, consumed_samples = 0, 0
    if args.load:
        iteration, consumed_samples = load_checkpoint(args, chunks, optimizer, scheduler, load_plan, ema=ema)
    train_set, valid_set, test_set = build_datasets(args, tokenizer)
    train_iterator = chunk_iterators(args, train_set, consumed_samples, len(chunks))
    logger = MetricsLogger(args, config)
    evaluator = Evaluator(args, chunks, valid_set, test_set, logger, forward_backward_func(args), forward_step,
                          partial(chunk_iterators, args, num_chunks=len(chunks)), ema)

    stop = StopConditions(args)
    last, reason, skipped = {}, None, 0
    while iteration < args.train_iters and reason is None and not args.skip_train:
        start = time.time()
        update_num_microbatches(consumed_samples, consistency_check=True)
        token_schedules.apply(consumed_samples)
        lm_loss, grad_norm, ok = train_step(args, chunks, optimizer, scheduler, train_iterator, config)
        if ema is not None and ok:
            ema.update()
        iteration += 1
        consumed_samples += get_current_global_batch_size()
        if not ok:
            skipped += 1
            if skipped > args.max_skipped_nonfinite_steps:
                raise SystemExit(
                    f"error: NaN/Inf in the loss or gradients at iteration {iteration} "
                    f"({skipped} such step(s), --max-skipped-nonfinite-steps {args.max_skipped_nonfinite_steps}); "
                    "lower --lr, check the data, or resume from the last checkpoint"
                )
            if dist.get_rank() == 0:
                print(f"iteration {iteration}: NaN/Inf gradients, step skipped ({skipped} so far)", flush=True)
        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            last = logger.log(
                iteration,
                chunks,
                lm_loss=lm_loss,
                grad_norm=grad_norm,
                lr=scheduler.get_lr(optimizer.param_groups[0]),
                step_time=time.time() - start,
                skipped=not ok,
            )
        else:
            clear_mtp_loss_tracker()
        evaluator.at_interval(iteration)
        reason = stop.check(iteration)
        if args.save and (reason or (args.save_interval and iteration % args.save_interval == 0)):
            save_checkpoint(args, iteration, consumed_samples, chunks, optimizer, scheduler, ema)
    if args.save and iteration == args.train_iters and not args.skip_train:
        save_checkpoint(args, iteration, consumed_samples, chunks, optimizer, scheduler, ema)
    if reason is None:
        evaluator.at_end(iteration)
    if ema is not None:
        ema.close()
    logger.close()
    if reason and dist.get_rank() == 0:
        print(f"stopping at iteration {iteration}: {reason}", flush=True)
    if reason == "signal":
        raise SystemExit(EXIT_CODE_REQUEUE)
    return last
