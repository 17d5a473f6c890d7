"""Metrics: reduced over ranks, printed by the last rank, optionally to TensorBoard, wandb and a JSON-lines
file. The printed line gives, like Megatron-LM's, means over the --log-interval's iterations: lm/MTP loss and
grad norm over the iterations that stepped, step time over all of them, tokens/s = the interval's tokens over
its summed step times. A --metrics-jsonl row keeps the logged iteration's own values under the plain keys and
adds those means under `interval_*` keys."""

import json

import psutil
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import get_current_global_batch_size, get_num_microbatches
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from megatron_dsv3.models.param_count import flops_per_token
from megatron_dsv3.moe.router import DSv3Router, expert_load_imbalance
from megatron_dsv3.training.expert_load import ExpertLoad
from megatron_dsv3.training.run_config import run_config
from megatron_dsv3.training.token_schedules import scheduled_values


def clear_mtp_loss_tracker() -> None:
    if "values" in MTPLossLoggingHelper.tracker:
        MTPLossLoggingHelper.clean_loss_in_tracker()


def _memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return psutil.Process().memory_info().rss / 2**20


class Interval:
    """Sums over the iterations since the last log line; the losses stay on device until `log` reduces them."""

    def __init__(self):
        self.losses = torch.zeros(2, device=torch.cuda.current_device())  # lm, MTP over iterations that stepped
        self.last = torch.zeros(2, device=torch.cuda.current_device())  # the latest iteration's lm, MTP
        self.iterations = self.skipped = 0
        self.grad_norm = self.step_time = 0.0
        self.tokens = 0
        self.last_step_time, self.last_grad_norm, self.last_skipped = 0.0, float("nan"), False

    def stepped(self) -> int:
        return self.iterations - self.skipped


class MetricsLogger:
    def __init__(self, args, config, chunks, summary):
        self.args = args
        self.config = config
        self.is_writer = dist.get_rank() == dist.get_world_size() - 1
        self.flops_per_token = flops_per_token(args.model_config, args.seq_length)
        self.interval = Interval()
        self.summary = summary
        self.expert_load = ExpertLoad(args, chunks, self.is_writer)
        self.tensorboard = self.wandb = None
        if self.is_writer and args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(args.tensorboard_dir)
            self.tensorboard.add_text("config", "```\n" + json.dumps(run_config(args), indent=1) + "\n```", 0)
        if self.is_writer and args.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise SystemExit("error: --wandb-project needs the wandb package: pip install wandb") from e
            self.wandb = wandb.init(
                project=args.wandb_project,
                name=args.wandb_exp_name,
                dir=args.wandb_save_dir or args.save or ".",
                config=run_config(args),
            )

    def _reduce(self, values: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
        dist.all_reduce(values, op=op, group=group)
        return values

    def record(self, *, lm_loss, grad_norm, step_time, skipped) -> None:
        """Every iteration: adds its values to the interval's sums (no host sync)."""
        interval = self.interval
        interval.last.zero_()
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            interval.last[0] = lm_loss
        values = MTPLossLoggingHelper.tracker.get("values")
        if values is not None:
            interval.last[1] = values.float().mean() / get_num_microbatches()
        clear_mtp_loss_tracker()
        interval.iterations += 1
        interval.step_time += step_time
        tokens = get_current_global_batch_size() * self.args.seq_length
        interval.tokens += tokens
        self.summary.record(tokens, step_time, skipped)
        interval.last_step_time = step_time
        interval.last_grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        interval.last_skipped = bool(skipped)
        if skipped:
            interval.skipped += 1
        else:
            interval.losses += interval.last
            interval.grad_norm += interval.last_grad_norm

    def log(self, iteration, chunks, *, lr) -> dict:
        args, interval = self.args, self.interval
        dp_group = parallel_state.get_data_parallel_group()

        # LM loss lives on the last pipeline stage: average over DP, then sum over PP
        # (the MTP module runs on the last stage, or on both ends of the pipe with DualPipe)
        losses = torch.cat([interval.last, interval.losses])
        losses = self._reduce(losses, group=dp_group) / dist.get_world_size(dp_group)
        losses = self._reduce(losses, group=parallel_state.get_pipeline_model_parallel_group())
        stepped = interval.stepped()

        def mean(total):
            return total / stepped if stepped else float("nan")

        mean_tokens_per_s = interval.tokens / interval.step_time
        interval_means = {
            "interval_iterations": interval.iterations,
            "interval_skipped": interval.skipped,
            "interval_lm_loss": mean(losses[2].item()),
            "interval_grad_norm": mean(interval.grad_norm),
            "interval_step_time_s": interval.step_time / interval.iterations,
            "interval_tokens_per_s": mean_tokens_per_s,
            "interval_tflops_per_device": self.flops_per_token * mean_tokens_per_s / dist.get_world_size() / 1e12,
        }
        if args.model_config.mtp_num_layers:
            interval_means["interval_mtp_loss"] = mean(losses[3].item())
        step_time, grad_norm, skipped = interval.last_step_time, interval.last_grad_norm, interval.last_skipped
        self.interval = Interval()

        # expert load: max/mean tokens per expert per MoE layer, over the whole batch
        imbalance = expert_load_imbalance(
            chunks, parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
        )
        routers = [m for c in chunks for m in c.modules() if isinstance(m, DSv3Router)]
        balance = [r.last_aux_loss for r in routers if r.last_aux_loss is not None]
        traffic = [m.token_dispatcher.traffic for c in chunks for m in c.modules() if hasattr(m, "token_dispatcher")]
        inter = sum(t.inter_node_bytes for t in traffic) / args.log_interval
        intra = sum(t.intra_node_bytes for t in traffic) / args.log_interval
        for t in traffic:
            t.reset()
        moe = torch.tensor(
            [sum(imbalance), len(imbalance), max(imbalance, default=0.0),
             float(sum(balance)) if balance else 0.0, len(balance), inter, intra, _memory_mb()],
            dtype=torch.float64, device=torch.cuda.current_device(),
        )
        summed = self._reduce(moe.clone())
        peak = self._reduce(moe.clone(), op=dist.ReduceOp.MAX)

        global_batch_size = get_current_global_batch_size()  # this iteration's (batch_schedule)
        tokens = global_batch_size * args.seq_length
        tokens_per_s = tokens / step_time
        metrics = {
            "iteration": iteration,
            "lm_loss": losses[0].item(),
            "lr": lr,
            "global_batch_size": global_batch_size,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "tflops_per_device": self.flops_per_token * tokens_per_s / dist.get_world_size() / 1e12,
            "step_time_s": step_time,
            "expert_imbalance_mean": (summed[0] / summed[1]).item() if summed[1] else None,
            "expert_imbalance_max": peak[2].item() if summed[1] else None,
            "inter_node_mb_per_step": summed[5].item() / 2**20,
            "intra_node_mb_per_step": summed[6].item() / 2**20,
            "max_memory_mb": peak[7].item(),
            "skipped": skipped,
            **interval_means,
        }
        metrics.update(scheduled_values(args, self.config))
        if args.model_config.mtp_num_layers:
            metrics["mtp_loss"] = losses[1].item()
        if summed[4]:
            metrics["balance_loss"] = (summed[3] / summed[4]).item()
        gathered = self.expert_load.gather(iteration)
        if self.is_writer:
            self._write(metrics)
            if gathered is not None and self.tensorboard:
                self.expert_load.to_tensorboard(self.tensorboard, iteration, *gathered)
        return metrics

    def _write(self, m: dict) -> None:
        line = f"iteration {m['iteration']:6d}/{self.args.train_iters} | lm loss {m['interval_lm_loss']:.4f}"
        if "interval_mtp_loss" in m:
            line += f" | mtp loss {m['interval_mtp_loss']:.4f}"
        line += (
            f" | lr {m['lr']:.3e} | grad norm {m['interval_grad_norm']:.3f}"
            f" | tokens/s {m['interval_tokens_per_s']:.0f} | TFLOP/s/device {m['interval_tflops_per_device']:.3f}"
        )
        if m["expert_imbalance_mean"] is not None:
            ceiling = self.expert_load.num_experts / self.expert_load.topk
            line += (
                f" | expert load max/mean {m['expert_imbalance_mean']:.2f} (worst layer"
                f" {m['expert_imbalance_max']:.2f}, ceiling E/K {ceiling:.1f}) | a2a inter/intra-node"
                f" {m['inter_node_mb_per_step']:.2f}/{m['intra_node_mb_per_step']:.2f} MB"
            )
        line += f" | mem {m['max_memory_mb']:.0f} MB | {m['interval_step_time_s'] * 1000:.0f} ms/iteration"
        if m["interval_skipped"]:
            line += f" | skipped {m['interval_skipped']}/{m['interval_iterations']}"
        print(line, flush=True)
        scalars = {k: v for k, v in m.items() if isinstance(v, (int, float)) and k != "iteration" and v is not None}
        if self.tensorboard:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, m["iteration"])
        if self.wandb:
            self.wandb.log(scalars, step=m["iteration"])
        if self.args.metrics_jsonl:
            with open(self.args.metrics_jsonl, "a") as f:
                f.write(json.dumps(m) + "\n")

    def draw_expert_load(self, iteration: int):
        """Collective: the expert-load PNG beside the checkpoints and in TensorBoard; its path on the writer."""
        return self.expert_load.draw(iteration, self.tensorboard)

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
