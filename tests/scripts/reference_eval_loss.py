"""Single-process reference for evaluation: load a checkpoint into one rank, forward the validation and test
samples of evaluation window W directly (no pipeline schedule), print the mean LM and MTP losses as JSON.

    torchrun --nproc-per-node 1 tests/scripts/reference_eval_loss.py OUT.json WINDOW [pretrain flags]
"""

import json
import sys

import torch
from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

from megatron_dsv3.checkpointing.checkpoint import load_checkpoint
from megatron_dsv3.models.transformer_config import transformer_config_from_args
from megatron_dsv3.training import train
from megatron_dsv3.training.arguments import parse_args
from megatron_dsv3.training.metrics import clear_mtp_loss_tracker


def main():
    out, window, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    args = parse_args(argv + ["--no-load-optim"], world_size=1)
    train.initialize_distributed(args)
    try:
        tokenizer = train.build_job_tokenizer(args)
        chunks, optimizer, scheduler = train.setup_model_and_optimizer(args, transformer_config_from_args(args))
        load_checkpoint(args, chunks, optimizer, scheduler)
        model = chunks[0].module
        model.eval()
        model.training = True  # GPTModel records MTP losses only with its own flag set
        _, valid, test = train.build_datasets(args, tokenizer)
        per_eval = args.eval_iters * args.global_batch_size
        result = {}
        for name, dataset, first in (("validation", valid, window * per_eval), ("test", test, 0)):
            clear_mtp_loss_tracker()
            samples = [dataset[i] for i in range(first, first + per_eval)]
            batch = {k: torch.stack([s[k] for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
            with torch.no_grad():
                per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                                  loss_mask=batch["loss_mask"])
            mask = batch["loss_mask"].float()
            result[name] = {"lm_loss": ((per_token * mask).sum() / mask.sum()).item()}
            if args.model_config.mtp_num_layers:
                result[name]["mtp_loss"] = MTPLossLoggingHelper.tracker["values"].float().mean().item()
        with open(out, "w") as f:
            json.dump(result, f)
    finally:
        train.destroy_distributed()


if __name__ == "__main__":
    main()
