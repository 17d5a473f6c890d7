"""Per-iteration metrics: reduced over ranks, printed by the last rank, optionally to TensorBoard,
wandb and a JSON-lines file."""

import json

import psutil
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import get_current_global_batch_size, get_num_microbatches
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from megatron_dsv3.models.param_count import flops_per_token
from megatron_dsv3.moe.router import DSv3Router, expert_load_imbalance
from megatron_dsv3.training.token_schedules import scheduled_values


def clear_mtp_loss_tracker() -> None:
    if "values" in MTPLossLoggingHelper.tracker:
        MTPLossLoggingHelper.clean_loss_in_tracker()


def _memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return psutil.Process().memory_info().rss / 2**20


class MetricsLogger:
    def __init__(self, args, config):
        self.args = args
        self.config = config
        self.is_writer = dist.get_rank() == dist.get_world_size() - 1
        self.flops_per_token = flops_per_token(args.model_config, args.seq_length)
        self.tensorboard = self.wandb = None
        if self.is_writer and args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(args.tensorboard_dir)
        if self.is_writer and args.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise SystemExit("error: --wandb-project needs the wandb package: pip install wandb") from e
            self.wandb = wandb.init(
                project=args.wandb_project,
                name=args.wandb_exp_name,
                dir=args.wandb_save_dir or args.save or ".",
                config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))},
            )

    def _reduce(self, values: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> torch.Tensor:
        dist.all_reduce(values, op=op, group=group)
        return values

    def log(self, iteration, chunks, *, lm_loss, grad_norm, lr, step_time, skipped) -> dict:
        args = self.args
        dp_group = parallel_state.get_data_parallel_group()
        last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)

        # LM loss lives on the last pipeline stage: average over DP, then sum over PP
        # (the MTP module runs on the last stage, or on both ends of the pipe with DualPipe)
        losses = torch.zeros(2, device=torch.cuda.current_device())  # NCCL reduces GPU tensors only
        if last_stage:
            losses[0] = lm_loss
        values = MTPLossLoggingHelper.tracker.get("values")
        if values is not None:
            losses[1] = values.float().mean() / get_num_microbatches()
        losses = self._reduce(losses, group=dp_group) / dist.get_world_size(dp_group)
        clear_mtp_loss_tracker()
        losses = self._reduce(losses, group=parallel_state.get_pipeline_model_parallel_group())

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
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": tokens_per_s,
            "tflops_per_device": self.flops_per_token * tokens_per_s / dist.get_world_size() / 1e12,
            "step_time_s": step_time,
            "expert_imbalance_mean": (summed[0] / summed[1]).item() if summed[1] else None,
            "expert_imbalance_max": peak[2].item() if summed[1] else None,
            "inter_node_mb_per_step": summed[5].item() / 2**20,
            "intra_node_mb_per_step": summed[6].item() / 2**20,
            "max_memory_mb": peak[7].item(),
            "skipped": bool(skipped),
        }
        metrics.update(scheduled_values(args, self.config))
        if args.model_config.mtp_num_layers:
            metrics["mtp_loss"] = losses[1].item()
        if summed[4]:
            metrics["balance_loss"] = (summed[3] / summed[4]).item()
        if self.is_writer:
            self._write(metrics)
        return metrics

    def _write(self, m: dict) -> None:
        line = f"iteration {m['iteration']:6d}/{self.args.train_iters} | lm loss {m['lm_loss']:.4f}"
        if "mtp_loss" in m:
            line += f" | mtp loss {m['mtp_loss']:.4f}"
        line += (
            f" | lr {m['lr']:.3e} | grad norm {m['grad_norm']:.3f} | tokens/s {m['tokens_per_s']:.0f}"
            f" | TFLOP/s/device {m['tflops_per_device']:.3f}"
        )
        if m["expert_imbalance_mean"] is not None:
            line += (
                f" | expert load max/mean {m['expert_imbalance_mean']:.2f} (worst layer"
                f" {m['expert_imbalance_max']:.2f}) | a2a inter/intra-node {m['inter_node_mb_per_step']:.2f}/"
                f"{m['intra_node_mb_per_step']:.2f} MB"
            )
        line += f" | mem {m['max_memory_mb']:.0f} MB | {m['step_time_s'] * 1000:.0f} ms"
        if m["skipped"]:
            line += " | step skipped"
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

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
