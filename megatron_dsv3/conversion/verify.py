"""`--verify`: logits of the Megatron model (one process) and of transformers' DeepseekV3ForCausalLM
on the same random token sequences, both in fp32. Both models are built whole: for models that fit
in host memory. transformers drops the MTP layer, so only the main model's logits are compared."""

import dataclasses
import json
import tempfile
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.serialization import StrictHandling

from megatron_dsv3.checkpointing.checkpoint import sharded_metadata
from megatron_dsv3.conversion.convert import check_has_ema, ema_or_live_key, model_config_of, resolve_checkpoint
from megatron_dsv3.conversion.dist_ckpt_io import DistCheckpointReader
from megatron_dsv3.conversion.safetensors_io import HFCheckpointReader, ShardedCheckpointWriter
from megatron_dsv3.models.gpt_builder import build_model
from megatron_dsv3.models.transformer_config import build_transformer_config
from megatron_dsv3.training.initialize import initialize_single_process


def capture_main_logits(model):
    """A list that receives the output layer's logits [s, b, V] on each forward; with MTP, the main
    model's logits are the last call of a forward (megatron-core computes the MTP heads' first). Cloned:
    megatron-core's cross entropy then works in place on the logits."""
    calls = []
    model.output_layer.register_forward_hook(lambda module, args, output: calls.append(output[0].detach().clone()))
    return calls


def megatron_forward(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, V] of a GPTModel (all stages in this process)."""
    calls = capture_main_logits(model)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    labels = torch.roll(tokens, -1, dims=1)  # megatron-core's MTP needs labels; the loss is not used
    with torch.no_grad():
        model(tokens, positions, None, labels=labels if model.config.mtp_num_layers else None)
    return calls[-1].transpose(0, 1).float()


def megatron_logits(checkpoint, tokens: torch.Tensor, ema: bool = False) -> torch.Tensor:
    """`ema`: with the parameters' EMA (as `mcore-to-hf --ema` exports them)."""
    initialize_single_process()
    path = resolve_checkpoint(checkpoint)
    cfg = model_config_of(path)
    model = build_model(build_transformer_config(cfg), cfg.vocab_size, tokens.shape[1], pre_process=True,
                        post_process=True, pp_rank=0)
    sharded = model.sharded_state_dict(metadata=sharded_metadata())
    if ema:
        check_has_ema(path)
        reader = DistCheckpointReader(path)
        sharded = {name: dataclasses.replace(entry, key=ema_or_live_key(reader, entry.key))
                   for name, entry in sharded.items()}
    state = dist_checkpointing.load({"model": sharded}, str(path), strict=StrictHandling.RAISE_UNEXPECTED)
    model.load_state_dict(state["model"])
    model.eval()
    return megatron_forward(model, tokens)


def _dequantized_copy(hf_dir, out_dir) -> None:
    """transformers' CPU FP8 loader is wrong for dims that are not multiples of 128: give it BF16."""
    reader = HFCheckpointReader(hf_dir, dequant_dtype=torch.bfloat16)
    config = {k: v for k, v in reader.config.items() if k != "quantization_config"}
    with ShardedCheckpointWriter(out_dir) as writer:
        for _, tensors in reader.layer_groups():
            for name, tensor in tensors.items():
                writer.add(name, tensor)
        writer.add_file("config.json", json.dumps(config))


def hf_logits(hf_dir, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import DeepseekV3ForCausalLM  # imported only when verifying: slow to import

    hf_dir = Path(hf_dir)
    with tempfile.TemporaryDirectory() as tmp:
        reader = HFCheckpointReader(hf_dir)
        if reader.config.get("quantization_config"):
            _dequantized_copy(hf_dir, Path(tmp) / "dequantized")
            hf_dir = Path(tmp) / "dequantized"
        model = DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def compare_logits(hf_dir, checkpoint, *, num_sequences: int = 4, seq_length: int = 32, seed: int = 0,
                   ema: bool = False):
    """(max abs diff, max abs diff / max |HF logit|) on `num_sequences` random sequences."""
    vocab = json.loads((Path(hf_dir) / "config.json").read_text())["vocab_size"]
    tokens = torch.randint(0, vocab, (num_sequences, seq_length), generator=torch.Generator().manual_seed(seed))
    reference = hf_logits(hf_dir, tokens)
    ours = megatron_logits(checkpoint, tokens, ema)
    diff = (ours - reference).abs().max().item()
    return diff, diff / reference.abs().max().item()
