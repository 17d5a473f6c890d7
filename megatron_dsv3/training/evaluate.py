"""Held-out evaluation (Megatron-LM's --eval-interval / --eval-iters / --skip-train semantics).

Each evaluation runs `--eval-iters` global batches of `--global-batch-size` samples forward-only through the
run's own pipeline schedule (1F1B, interleaved, DualPipe, DualPipeV), with dropout off and no router load
counting (submodules in eval mode). Evaluation number j (j = iteration // eval_interval - 1 at an interval,
train_iters // eval_interval at the end) reads validation samples [j·K·B, (j+1)·K·B), K = eval iters,
B = global batch, so a resumed run evaluates the same samples an uninterrupted one does; the test set is
read once, from sample 0, at the end (Megatron sizes the splits the same way).

Logged: lm loss (mean over micro-batches, averaged over data parallel), its perplexity exp(lm loss), and the
MTP loss (megatron's MTPLossLoggingHelper tracker, which GPTModel fills only while its own `training` flag is
set: that flag alone stays on during evaluation).
"""

import json
import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from megatron_dsv3.training.metrics import clear_mtp_loss_tracker


def add_eval_args(parser) -> None:
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval-interval", type=int, default=None,
                   help="evaluate on the validation set every N iterations and at the end (default: never)")
    g.add_argument("--eval-iters", type=int, default=100, help="global batches per evaluation")
    g.add_argument("--skip-train", action="store_true",
                   help="evaluate the --load checkpoint on the validation and test sets only")
    g.add_argument("--valid-data-path", nargs="+", default=None,
                   help="validation set prefix(es) instead of the --split share of --data-path")
    g.add_argument("--test-data-path", nargs="+", default=None,
                   help="test set prefix(es) instead of the --split share of --data-path")


def validate_eval_args(args) -> str | None:
    """The one-line problem with the evaluation flags, or None."""
    if args.eval_interval is not None and args.eval_interval <= 0:
        return f"--eval-interval must be a positive number of iterations, got {args.eval_interval}"
    if args.eval_iters < 0:
        return f"--eval-iters must be >= 0, got {args.eval_iters}"
    if (args.valid_data_path or args.test_data_path) and not args.data_path:
        return "--valid-data-path/--test-data-path need --data-path for the training set"
    if args.skip_train and not args.load:
        return "--skip-train evaluates a checkpoint: give --load DIR"
    args.do_eval = bool(args.eval_iters and (args.eval_interval or args.skip_train))
    return None


def eval_sample_counts(args) -> tuple[int, int]:
    """(validation, test) samples the run reads."""
    if not args.do_eval:
        return 0, 0
    per_eval = args.eval_iters * args.global_batch_size
    evaluations = 1 if args.skip_train else args.train_iters // args.eval_interval + 1
    return evaluations * per_eval, per_eval


class Evaluator:
    def __init__(self, args, chunks, valid, test, logger, forward_backward, forward_step, make_iterator, ema=None):
        self.args, self.chunks, self.logger, self.ema = args, chunks, logger, ema
        self.sets = {"validation": valid, "test": test}
        self.forward_backward, self.forward_step, self.make_iterator = forward_backward, forward_step, make_iterator
        self.last_evaluated = None

    def at_interval(self, iteration: int) -> None:
        if self.args.do_eval and self.args.eval_interval and iteration % self.args.eval_interval == 0:
            self.evaluate("validation", iteration, iteration // self.args.eval_interval - 1)

    def at_end(self, iteration: int) -> None:
        if not self.args.do_eval:
            return
        if self.last_evaluated != iteration:
            window = 0 if self.args.skip_train else self.args.train_iters // self.args.eval_interval
            self.evaluate("validation", iteration, window)
        self.evaluate("test", iteration, 0)

    def evaluate(self, split: str, iteration: int, window: int) -> dict | None:
        """The split's loss with the live weights and, under --ema-decay, with the EMA (split `NAME-ema`: the
        same samples, DeepSeek-V3 §3.2.3's early judge of the model after learning-rate decay)."""
        dataset = self.sets[split]
        if dataset is None:
            return None
        metrics = self._evaluate(dataset, split, iteration, window)
        if split == "validation":
            self.last_evaluated = iteration
        if self.ema is not None:
            with self.ema.swapped_in():
                self._evaluate(dataset, f"{split}-ema", iteration, window)
        return metrics

    def _evaluate(self, dataset, split: str, iteration: int, window: int) -> dict:
        args = self.args
        per_eval = args.eval_iters * args.global_batch_size
        iterator = self.make_iterator(dataset, window * per_eval)
        num_microbatches = args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)
        clear_mtp_loss_tracker()
        for chunk in self.chunks:
            chunk.eval()
            chunk.module.training = True  # GPTModel's own flag: it records MTP losses (submodules stay in eval)
        lm_losses = []
        with torch.no_grad():
            for _ in range(args.eval_iters):
                losses = self.forward_backward(
                    forward_step_func=self.forward_step, data_iterator=iterator,
                    model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
                    num_microbatches=num_microbatches, seq_length=args.seq_length,
                    micro_batch_size=args.micro_batch_size, forward_only=True,
                )
                lm_losses += [x["lm loss"] for x in losses]
        for chunk in self.chunks:
            chunk.train()
        device = torch.cuda.current_device()
        totals = torch.zeros(2, device=device)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            totals[0] = torch.stack(lm_losses).float().mean()
        values = MTPLossLoggingHelper.tracker.get("values")
        if values is not None:
            totals[1] = values.float().mean() / (args.eval_iters * num_microbatches)
        clear_mtp_loss_tracker()
        dp_group = parallel_state.get_data_parallel_group()
        dist.all_reduce(totals, group=dp_group)
        totals /= dist.get_world_size(dp_group)
        dist.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
        lm_loss = totals[0].item()
        metrics = {"iteration": iteration, "split": split, "lm_loss": lm_loss,
                   "lm_loss_ppl": math.exp(min(20.0, lm_loss)), "samples": per_eval}
        if args.model_config.mtp_num_layers:
            metrics["mtp_loss"] = totals[1].item()
        self._write(metrics)
        return metrics

    def _write(self, m: dict) -> None:
        if not self.logger.is_writer:
            return
        line = (f" {m['split']} loss at iteration {m['iteration']} | lm loss value: {m['lm_loss']:.6E} | "
                f"lm loss PPL: {m['lm_loss_ppl']:.6E}")
        if "mtp_loss" in m:
            line += f" | mtp loss: {m['mtp_loss']:.6E}"
        print(line, flush=True)
        scalars = {f"{m['split']}/{k}": v for k, v in m.items() if k in ("lm_loss", "lm_loss_ppl", "mtp_loss")}
        if self.logger.tensorboard:
            for key, value in scalars.items():
                self.logger.tensorboard.add_scalar(key, value, m["iteration"])
        if self.logger.wandb:
            self.logger.wandb.log(scalars, step=m["iteration"])
        if self.args.metrics_jsonl:
            with open(self.args.metrics_jsonl, "a") as f:
                f.write(json.dumps(m) + "\n")
