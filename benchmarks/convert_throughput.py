"""Checkpoint conversion throughput and peak memory as the checkpoint grows.

Synthesizes DeepSeek-V3-shaped HF checkpoints (random BF16, written shard by shard) of each size,
converts each HF -> Megatron -> HF with tools/convert_checkpoint.py in a subprocess, and prints GiB/s
and the converter's peak RSS (from wait4) per size. The layer shape is fixed and the layer count
grows with the size, so a streaming converter's peak RSS stays flat.

    python benchmarks/convert_throughput.py --sizes-gb 0.5 1 2
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_dsv3.conversion.hf_config import model_config_to_hf_config  # noqa: E402
from megatron_dsv3.conversion.megatron_layout import expected_shape  # noqa: E402
from megatron_dsv3.conversion.name_mapping import megatron_sources  # noqa: E402
from megatron_dsv3.conversion.safetensors_io import ShardedCheckpointWriter  # noqa: E402
from megatron_dsv3.models.presets import DSv3ModelConfig  # noqa: E402

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "convert_checkpoint.py")
LAYER = dict(  # about 55 MB per MoE layer in BF16
    hidden_size=1024, num_attention_heads=8, ffn_hidden_size=2816, vocab_size=8192, q_lora_rank=384,
    kv_lora_rank=256, qk_head_dim=64, qk_pos_emb_head_dim=32, v_head_dim=64, num_experts=16,
    moe_ffn_hidden_size=512, moe_shared_expert_intermediate_size=512, moe_router_topk=4,
    moe_router_num_groups=4, moe_router_group_topk=2, moe_router_topk_scaling_factor=2.5,
)


def _hf_tensors(layer, cfg, generator):
    """Random HF tensors of one layer (None: embedding, final norm, head)."""
    for megatron, sources in megatron_sources(layer, cfg).items():
        shape = expected_shape(megatron, cfg)
        part = (shape[0] // len(sources), *shape[1:])
        for name in sources:
            dtype = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
            yield name, (torch.randn(part, generator=generator) * 0.02).to(dtype)


def synthesize(path: Path, target_bytes: int, shard_bytes: int) -> DSv3ModelConfig:
    probe = DSv3ModelConfig(num_layers=2, moe_layer_freq=[0, 1], **LAYER)
    per_layer = sum(t.nbytes for _, t in _hf_tensors(1, probe, torch.Generator()))
    fixed = sum(t.nbytes for _, t in _hf_tensors(None, probe, torch.Generator()))
    layers = max(2, round((target_bytes - fixed) / per_layer))
    cfg = DSv3ModelConfig(num_layers=layers, moe_layer_freq=[0] + [1] * (layers - 1), **LAYER)
    generator = torch.Generator().manual_seed(0)
    with ShardedCheckpointWriter(path, shard_bytes) as writer:
        for layer in [None, *range(layers)]:
            for name, tensor in _hf_tensors(layer, cfg, generator):
                writer.add(name, tensor)
        writer.add_file("config.json", json.dumps(model_config_to_hf_config(cfg)))
    return cfg


def run_converter(*args):
    """(GiB/s of the conversion itself, peak RSS in bytes) of one tools/convert_checkpoint.py run."""
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    process = subprocess.Popen([sys.executable, TOOL, *map(str, args), "--no-progress"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"converter failed:\n{output[-3000:]}")
    rate = float(re.search(r"\(([\d.]+) GiB/s\)", output).group(1))
    return rate, usage.ru_maxrss * 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--shard-mb", type=int, default=256, help="HF shard size (input and output)")
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="convert_bench_"))
    shard = args.shard_mb * 2**20
    print(f"{'size GiB':>8} {'layers':>6} | {'HF->Megatron GiB/s':>18} {'peak RSS GiB':>12} | "
          f"{'Megatron->HF GiB/s':>18} {'peak RSS GiB':>12}", flush=True)
    try:
        for size in args.sizes_gb:
            work = root / f"{size:g}GB"
            cfg = synthesize(work / "hf", int(size * 2**30), shard)
            nbytes = sum(f.stat().st_size for f in (work / "hf").glob("*.safetensors"))
            to_mcore = run_converter("hf-to-mcore", "--hf-dir", work / "hf", "--output", work / "mcore")
            to_hf = run_converter("mcore-to-hf", "--load", work / "mcore", "--output", work / "hf_out",
                                  "--max-shard-size", shard)
            print(f"{nbytes / 2**30:8.2f} {cfg.num_layers:6d} | {to_mcore[0]:18.3f} {to_mcore[1] / 2**30:12.2f} | "
                  f"{to_hf[0]:18.3f} {to_hf[1] / 2**30:12.2f}",
                  flush=True)
            shutil.rmtree(work)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
