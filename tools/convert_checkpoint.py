"""Convert DeepSeek-V3 checkpoints between Hugging Face safetensors and Megatron torch_dist, streaming.

    python tools/convert_checkpoint.py hf-to-mcore --hf-dir DeepSeek-V3 --output ckpt [--dtype bf16] [--verify]
    python tools/convert_checkpoint.py mcore-to-hf --load ckpt --output hf_out [--fp8] [--tokenizer DIR] [--verify]
        [--ema]

FP8 (block-scaled E4M3) weights are dequantized on the fly. The Megatron checkpoint loads at any
TP/PP/EP layout with `pretrain_dsv3.py --load ckpt --no-load-optim` and the model flags printed at the end.
"""

import argparse
import dataclasses
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_dsv3.training.input_checks import ArgumentParser  # noqa: E402
from megatron_dsv3.conversion.convert import DTYPES, hf_to_mcore, mcore_to_hf  # noqa: E402
from megatron_dsv3.models.presets import DSv3ModelConfig  # noqa: E402


RELEASE_NUM_LAYERS = 61  # DeepSeek-V3: the MTP layer is model.layers.61, which transformers' loader ignores


def _size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def model_flags(cfg: DSv3ModelConfig) -> list:
    """pretrain_dsv3.py flags that build the model `cfg` describes."""
    flags = []
    for field in dataclasses.fields(cfg):
        value, flag = getattr(cfg, field.name), "--" + field.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            flags += [flag, "[" + ",".join(map(str, value)) + "]"]
        else:
            flags += [flag, "none" if value is None else str(value)]
    return flags


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="Hugging Face safetensors -> Megatron torch_dist")
    to_mcore.add_argument("--hf-dir", required=True, help="directory with config.json and *.safetensors")
    to_mcore.add_argument("--output", required=True, help="checkpoint root (like --save); must not exist")
    to_mcore.add_argument("--iteration", type=int, default=0, help="iteration the checkpoint is saved at")
    to_mcore.add_argument("--no-mtp", action="store_true", help="convert without the MTP layer")
    to_mcore.add_argument("--max-file-size", type=_size, default=5 * 2**30, help="per .distcp file, e.g. 5GB")
    to_hf = sub.add_parser("mcore-to-hf", help="Megatron torch_dist -> Hugging Face safetensors")
    to_hf.add_argument("--load", required=True, help="checkpoint root (latest iteration) or an iter_N directory")
    to_hf.add_argument("--output", required=True, help="output directory; must not exist or be empty")
    to_hf.add_argument("--iteration", type=int, default=None)
    to_hf.add_argument("--fp8", action="store_true", help="block-FP8 E4M3 weights + weight_scale_inv, as released")
    to_hf.add_argument("--ema", action="store_true",
                       help="export the parameters' EMA (trained with --ema-decay) instead of the live weights")
    to_hf.add_argument("--tokenizer", default=None,
                       help="the training tokenizer (directory or tokenizer.json): written for AutoTokenizer, its "
                            "bos/eos ids into config.json and generation_config.json")
    to_hf.add_argument("--no-mtp", action="store_true",
                       help="leave the MTP layer out (transformers does not run it, and below 61 layers lists its "
                            "tensors as UNEXPECTED when loading)")
    to_hf.add_argument("--max-shard-size", type=_size, default=5 * 2**30, help="per safetensors shard, e.g. 5GB")
    for p in (to_mcore, to_hf):
        p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                       help="output dtype (default: as stored; FP8 weights become bf16)")
        p.add_argument("--verify", action="store_true",
                       help="compare logits with transformers' DeepseekV3ForCausalLM (models that fit in memory)")
        p.add_argument("--verify-tolerance", type=float, default=1e-3, help="max abs logit difference allowed")
        p.add_argument("--no-progress", action="store_true")
    return parser


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    start = time.time()
    try:
        if args.command == "hf-to-mcore":
            cfg = hf_to_mcore(args.hf_dir, args.output, dtype=dtype, iteration=args.iteration, no_mtp=args.no_mtp,
                              max_file_bytes=args.max_file_size, progress=not args.no_progress)
            hf_dir, mcore_dir = args.hf_dir, args.output
        else:
            cfg = mcore_to_hf(args.load, args.output, iteration=args.iteration, dtype=dtype, fp8=args.fp8,
                              tokenizer=args.tokenizer, no_mtp=args.no_mtp, max_shard_bytes=args.max_shard_size,
                              progress=not args.no_progress, ema=args.ema)
            hf_dir, mcore_dir = args.output, args.load
    except (KeyError, ValueError, OSError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    seconds = time.time() - start
    written = sum(f.stat().st_size for f in Path(args.output).rglob("*") if f.is_file()) / 2**30
    print(f"wrote {args.output}: {written:.3f} GiB in {seconds:.1f} s ({written / seconds:.3f} GiB/s); "
          f"peak RSS {peak_rss_gib():.2f} GiB", flush=True)
    if args.command == "mcore-to-hf" and cfg.mtp_num_layers and cfg.num_layers != RELEASE_NUM_LAYERS:
        print(f"note: transformers skips the MTP layer's tensors only at model.layers.{RELEASE_NUM_LAYERS} (the "
              f"release's); loading this directory lists model.layers.{cfg.num_layers}.* as UNEXPECTED: convert "
              "with --no-mtp for a copy it loads without that table", flush=True)
    if args.command == "hf-to-mcore":
        print("load it with: pretrain_dsv3.py --load", args.output, "--no-load-optim", " ".join(model_flags(cfg)))
    if args.verify:
        from megatron_dsv3.conversion.verify import compare_logits

        diff, rel = compare_logits(hf_dir, mcore_dir, ema=getattr(args, "ema", False))
        print(f"verify: max abs logit diff {diff:.3e}, max rel diff {rel:.3e} (tolerance {args.verify_tolerance:g})")
        if not diff <= args.verify_tolerance:
            print("error: converted model's logits differ from the source's beyond the tolerance", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
