"""Load a (converted) checkpoint through pretrain_dsv3's own model building and checkpoint loading, at
the layout its flags give, and save the main model's logits for TOKENS_FILE from the last stage.

    torchrun --nproc-per-node N tests/scripts/converted_logits.py TOKENS_FILE OUT_FILE [pretrain flags incl. --global-batch-size = batch x DP]
"""

import sys
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_dsv3.checkpointing.checkpoint import load_checkpoint
from megatron_dsv3.conversion.verify import capture_main_logits
from megatron_dsv3.models.transformer_config import transformer_config_from_args
from megatron_dsv3.training.arguments import parse_args
from megatron_dsv3.training.initialize import destroy_distributed, initialize_distributed
from megatron_dsv3.training.train import build_model_chunks


def forward_step(batch, data_iterator, model):
    tokens = batch
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    output = model(tokens, positions, None, labels=torch.roll(tokens, -1, dims=1))
    return output, lambda output_tensor: (output_tensor.float().mean(), {})


def main():
    tokens_file, out_file, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    tokens = torch.load(tokens_file)
    batch, seq = tokens.shape
    args = parse_args(argv + ["--micro-batch-size", str(batch), "--seq-length", str(seq), "--no-load-optim"])
    initialize_distributed(args)
    try:
        args.padded_vocab_size = args.model_config.vocab_size
        config = transformer_config_from_args(args)
        chunks = build_model_chunks(args, config)
        load_checkpoint(args, chunks, None, None)
        model = chunks[0].module
        calls = capture_main_logits(model) if parallel_state.is_pipeline_last_stage() else None
        model.eval()
        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=partial(forward_step, tokens), data_iterator=None, model=chunks[0],
                num_microbatches=1, seq_length=seq, micro_batch_size=batch, forward_only=True,
            )
        if calls is not None and parallel_state.get_data_parallel_rank() == 0:
            torch.save(calls[-1].transpose(0, 1).float(), out_file)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
