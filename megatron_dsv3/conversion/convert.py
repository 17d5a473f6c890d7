"""Hugging Face DeepSeek-V3 checkpoints <-> Megatron torch_dist checkpoints, streamed.

HF -> Megatron: config.json gives the model config; every tensor's name and shape is checked against
it from the safetensors headers before anything is written; each write item of the torch_dist plan
is read from its HF tensors (FP8 weights dequantized with their block scales) when the writer reaches
it: memory holds about one tensor. Megatron -> HF: the model config comes from the checkpoint's common
state; each layer is read whole (all its experts) and buffered into safetensors shards of
`max_shard_bytes`: memory holds about one layer plus one shard. Neither depends on the model size.
Outputs are written into a hidden staging directory renamed onto the output only when complete.
"""

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from megatron.core.dist_checkpointing import load_common_state_dict
from tqdm import tqdm

from megatron_dsv3.checkpointing.checkpoint import TRACKER_FILE, checkpoint_dir, read_latest_iteration
from megatron_dsv3.conversion import dist_ckpt_io
from megatron_dsv3.conversion.fp8_blocks import DEFAULT_BLOCK, quantize_fp8_block
from megatron_dsv3.conversion.hf_config import hf_config_to_model_config, model_config_to_hf_config
from megatron_dsv3.conversion.megatron_layout import expected_shape, extra_state_key, placement
from megatron_dsv3.conversion.name_mapping import (
    MEGATRON_EMBEDDING,
    MEGATRON_HEAD,
    SCALE_INV_SUFFIX,
    expected_hf_keys,
    hf_layer_index,
    is_fp8_weight,
    is_mtp_layer,
    megatron_sources,
    megatron_to_hf_global_tensors,
    megatron_to_hf_layer_tensors,
    mtp_copies,
    optional_hf_keys,
)
from megatron_dsv3.conversion.safetensors_io import HFCheckpointReader, ShardedCheckpointWriter, _check_empty_output
from megatron_dsv3.data.tokenizer import NO_PAD, HuggingFaceTokenizer
from megatron_dsv3.models.presets import DSv3ModelConfig
from megatron_dsv3.training.ema import EMA_KEY_PREFIX

SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
                      "F8_E4M3": torch.float8_e4m3fn}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HF_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
# The router's aux-loss-free bias stays FP32 whatever --dtype says (as in the release; it is added to sigmoid
# scores that differ by less than BF16 resolves).
FP32_TENSORS = ("e_score_correction_bias", "router.expert_bias")


def _layers(cfg: DSv3ModelConfig):
    return [None, *range(cfg.num_layers + (cfg.mtp_num_layers or 0))]


class _Staging:
    """`out_dir` appears only complete: work goes to a hidden sibling renamed onto it by `commit`."""

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)
        _check_empty_output(self.out_dir)
        self.path = self.out_dir.parent / f".{self.out_dir.name}.partial-{os.getpid()}"
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def commit(self) -> None:
        if self.out_dir.exists():
            self.out_dir.rmdir()
        os.replace(self.path, self.out_dir)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        return False


def _progress(total_bytes: int, desc: str, enabled: bool):
    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, disable=not enabled)


# ---------------------------------------------------------------- HF -> Megatron


def _check_hf_keys(reader: HFCheckpointReader, cfg: DSv3ModelConfig, drop_mtp_from: Optional[int]) -> None:
    present = set(reader.keys())
    if drop_mtp_from is not None:
        present = {k for k in present if (hf_layer_index(k) or 0) < drop_mtp_from}
    expected = set(expected_hf_keys(cfg))
    unknown, missing = sorted(present - expected - set(optional_hf_keys(cfg))), sorted(expected - present)
    if unknown:
        raise KeyError(f"{reader.path / reader.weight_map[unknown[0]]}: tensor {unknown[0]!r} is not part of the "
                       "model config.json describes (unknown name, or a layer beyond num_hidden_layers + MTP)")
    if missing:
        layer, hint = hf_layer_index(missing[0]), ""
        if layer is not None and is_mtp_layer(layer, cfg):
            hint = (f": config.json has num_nextn_predict_layers={cfg.mtp_num_layers} but the checkpoint lacks the "
                    "MTP layer (transformers' save_pretrained drops it); pass --no-mtp to convert without MTP")
        raise KeyError(f"{reader.path}: tensor {missing[0]!r} is missing ({len(missing)} in all){hint}")


def _hf_shape_and_dtype(reader, megatron_name, hf_names, cfg, dtype):
    headers = [reader.header(n) for n in hf_names]
    shapes = [tuple(h["shape"]) for h in headers]
    shape = (sum(s[0] for s in shapes), *shapes[0][1:]) if len(shapes) > 1 else shapes[0]
    expected = expected_shape(megatron_name, cfg)
    if shape != expected:
        file = reader.path / reader.weight_map[hf_names[0]]
        raise ValueError(f"{file}: {' + '.join(hf_names)} has shape {shape} but config.json gives "
                         f"{megatron_name} the shape {expected}: the config does not match the checkpoint")
    stored = SAFETENSORS_DTYPES.get(headers[0]["dtype"])
    if stored is None:
        raise ValueError(f"{reader.path / reader.weight_map[hf_names[0]]}: {hf_names[0]} has unsupported dtype "
                         f"{headers[0]['dtype']}")
    if megatron_name.endswith(FP32_TENSORS):
        return shape, torch.float32
    return shape, dtype or (torch.bfloat16 if stored == torch.float8_e4m3fn else stored)


class _HFTensorSource:
    """Each Megatron tensor read from its HF tensors (gate + up fused) only when the writer reaches it,
    so memory holds about one tensor. Names and shapes were checked up front; the values that must
    agree (MTP copies of the embedding/head, zero router biases without expert bias) are checked
    when their layer is reached."""

    def __init__(self, reader: HFCheckpointReader, cfg: DSv3ModelConfig, progress):
        self.reader, self.cfg, self.progress = reader, cfg, progress
        self.items = {}  # (key, offset) -> (layer, HF source names, dtype)
        self.checked = set()

    def _check_values(self, layer) -> None:
        if layer is None:
            return
        for copy, original in mtp_copies(layer, self.cfg).items():
            pair = self.reader.read([copy, original])
            if not torch.equal(pair[copy], pair[original]):
                raise ValueError(f"{copy} differs from {original}: the MTP copy must equal the main tensor")
        for name in optional_hf_keys(self.cfg):
            if hf_layer_index(name) == layer and name in self.reader.weight_map:
                if torch.count_nonzero(self.reader.read([name])[name]):
                    raise ValueError(f"{name} is non-zero but the config has no expert bias (topk_method not noaux_tc)")

    def __call__(self, item):
        if item.tensor_data is None:
            return dist_ckpt_io.serialized(None)
        layer, sources, dtype = self.items[(item.index.fqn, tuple(item.index.offset))]
        if layer not in self.checked:
            self._check_values(layer)
            self.checked.add(layer)
        tensors = self.reader.read(sources)
        tensor = torch.cat([tensors.pop(n) for n in sources]) if len(sources) > 1 else tensors.pop(sources[0])
        tensor = tensor.to(dtype).reshape(tuple(item.tensor_data.chunk.sizes))  # routed experts: expert axis 1
        self.progress.update(tensor.nbytes)
        return tensor


def hf_to_mcore(hf_dir, out_dir, *, dtype: Optional[torch.dtype] = None, iteration: int = 0,
                no_mtp: bool = False, max_file_bytes: int = 5 * 2**30, progress: bool = True) -> DSv3ModelConfig:
    """Writes `out_dir/iter_<iteration>/` + the latest-iteration marker, as `--save` does; returns the config.
    `dtype` None keeps each tensor's stored dtype (FP8 weights become BF16)."""
    hf_dir = Path(hf_dir)
    _check_empty_output(Path(out_dir))
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir / 'config.json'} does not exist")
    reader = HFCheckpointReader(hf_dir, dequant_dtype=dtype or torch.bfloat16)  # FP8: one tensor in fp32 at a time
    cfg = hf_config_to_model_config(reader.config)
    drop_from = None
    if no_mtp and cfg.mtp_num_layers:
        cfg, drop_from = cfg.replace(mtp_num_layers=None), cfg.num_layers
    _check_hf_keys(reader, cfg, drop_from)

    items, total = [], 0
    bar = _progress(0, "HF -> Megatron", progress)
    source = _HFTensorSource(reader, cfg, bar)
    for layer in _layers(cfg):
        for name, hf_names in sorted(megatron_sources(layer, cfg).items()):
            shape, out_dtype = _hf_shape_and_dtype(reader, name, hf_names, cfg, dtype)
            where = placement(name, shape, cfg)
            chunk = (1,) * (len(where.global_shape) - len(shape)) + tuple(shape)
            items.append(dist_ckpt_io.tensor_item(where.key, where.global_shape, where.offset, chunk, out_dtype))
            source.items[(where.key, where.offset)] = (layer, hf_names, out_dtype)
            total += torch.Size(shape).numel() * out_dtype.itemsize
            extra = extra_state_key(name, cfg)
            if extra:
                items.append(dist_ckpt_io.bytes_item(extra))
    bar.total = total
    common = {
        "iteration": iteration, "consumed_samples": 0, "layout": {}, "use_distributed_optimizer": False,
        "model_config": dataclasses.asdict(cfg), "converted_from": str(hf_dir),
    }
    with _Staging(out_dir) as staging, bar:
        dist_ckpt_io.save_streaming(checkpoint_dir(str(staging.path), iteration), items, source, common, max_file_bytes)
        (staging.path / TRACKER_FILE).write_text(str(iteration))
        staging.commit()
    return cfg


# ---------------------------------------------------------------- Megatron -> HF


def resolve_checkpoint(load_dir, iteration: Optional[int] = None) -> Path:
    """The iter_N directory of a `--save` directory (latest, or `iteration`), or `load_dir` itself if it is one."""
    load_dir = Path(load_dir)
    if (load_dir / "metadata.json").is_file():
        return load_dir
    if iteration is None:
        iteration = read_latest_iteration(str(load_dir))
        if iteration is None:
            raise FileNotFoundError(f"{load_dir} holds no complete checkpoint (no {TRACKER_FILE}, no metadata.json)")
    path = Path(checkpoint_dir(str(load_dir), iteration))
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete torch_dist checkpoint (no metadata.json)")
    return path


def model_config_of(path: Path) -> DSv3ModelConfig:
    common = load_common_state_dict(str(path))
    if "model_config" not in common:
        raise KeyError(f"{path / dist_ckpt_io.COMMON_FILE} has no 'model_config': not saved by pretrain_dsv3.py "
                       "or this converter")
    return DSv3ModelConfig(**common["model_config"])


_MODEL_PREFIXES = ("embedding.", "decoder.", "mtp.", "output_layer.")


def _check_megatron_keys(reader: dist_ckpt_io.DistCheckpointReader, cfg: DSv3ModelConfig) -> None:
    expected = {}
    for layer in _layers(cfg):
        for name in megatron_sources(layer, cfg):
            where = placement(name, expected_shape(name, cfg), cfg)
            expected[where.key] = where.global_shape
    present = {k for k in reader.tensors if k.startswith(_MODEL_PREFIXES)}
    unknown = sorted(present - set(expected))
    if unknown:
        raise KeyError(f"{reader.path}: tensor {unknown[0]!r} is not part of the model its model_config describes")
    for key, shape in sorted(expected.items()):
        if key not in present:
            raise KeyError(f"{reader.path}: tensor {key!r} is missing")
        if reader.shape(key) != shape:
            raise ValueError(f"{reader.path}: tensor {key!r} has shape {reader.shape(key)} but its model_config "
                             f"gives {shape}: the config does not match the checkpoint")


def check_has_ema(path: Path) -> None:
    if not load_common_state_dict(str(path)).get("has_ema"):
        raise ValueError(f"{path} holds no EMA (saved without --ema-decay): drop --ema")


def ema_or_live_key(reader, key: str) -> str:
    """The EMA of a parameter (`ema/<key>`, training/ema.py); buffers have none (the router's expert bias, set by
    the load-balancing rule, not by gradients) and stay live."""
    return EMA_KEY_PREFIX + key if EMA_KEY_PREFIX + key in reader.tensors else key


def _read_megatron(reader, names, cfg, ema: bool = False):
    """Megatron tensors by name (with `ema`, their EMA); a routed expert is its slice of the layer's stacked key."""
    wheres = {n: placement(n, expected_shape(n, cfg), cfg) for n in names}
    keys = {w.key: ema_or_live_key(reader, w.key) if ema else w.key for w in wheres.values()}
    stored = reader.read(set(keys.values()))
    out = {}
    for name, where in wheres.items():
        tensor = stored[keys[where.key]]
        lead = len(where.global_shape) - len(expected_shape(name, cfg))
        out[name] = tensor[where.offset[:lead]] if lead else tensor
    return out


def _load_tokenizer(tokenizer, cfg: DSv3ModelConfig) -> HuggingFaceTokenizer:
    if not Path(tokenizer).exists():
        raise FileNotFoundError(f"--tokenizer {tokenizer} does not exist")
    loaded = HuggingFaceTokenizer(str(tokenizer))
    if loaded.vocab_size > cfg.vocab_size:
        raise ValueError(f"--tokenizer {tokenizer} has {loaded.vocab_size} tokens but the checkpoint's vocabulary is "
                         f"{cfg.vocab_size}: give the tokenizer the model was trained with")
    return loaded


def _write_tokenizer(tokenizer: HuggingFaceTokenizer, writer: ShardedCheckpointWriter) -> dict:
    """The tokenizer files AutoTokenizer loads; returns the special token ids config.json and
    generation_config.json carry (`generate` stops at eos_token_id)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for file in sorted(Path(tmp).iterdir()):
            writer.add_file(file.name, file.read_bytes())
    ids = {"bos_token_id": tokenizer.bos, "eos_token_id": tokenizer.eod,
           "pad_token_id": None if tokenizer.pad == NO_PAD else tokenizer.pad}
    return {name: value for name, value in ids.items() if value is not None}


def _hf_bytes(reader: dist_ckpt_io.DistCheckpointReader, cfg: DSv3ModelConfig) -> int:
    """Bytes of the HF tensors `cfg` writes, as read: its stored Megatron tensors, plus each MTP layer's copies of
    the embedding and the output layer."""
    def nbytes(key):
        return torch.Size(reader.tensors[key].size).numel() * reader.tensors[key].properties.dtype.itemsize

    prefixes = _MODEL_PREFIXES if cfg.mtp_num_layers else tuple(p for p in _MODEL_PREFIXES if p != "mtp.")
    head = MEGATRON_HEAD if cfg.untie_embeddings_and_output_weights else MEGATRON_EMBEDDING
    copies = (cfg.mtp_num_layers or 0) * (nbytes(MEGATRON_EMBEDDING) + nbytes(head))
    return sum(nbytes(k) for k in reader.tensors if k.startswith(prefixes)) + copies


def mcore_to_hf(load_dir, out_dir, *, iteration: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                fp8: bool = False, tokenizer=None, no_mtp: bool = False, max_shard_bytes: int = 5 * 2**30,
                progress: bool = True, ema: bool = False) -> DSv3ModelConfig:
    """Writes sharded safetensors + index + config.json (+ tokenizer files and generation_config.json) loadable
    by transformers; returns the config written. The MTP layer j is stored as HF layer num_layers + j, as the
    DeepSeek-V3 release does; `no_mtp` leaves it out (transformers does not run it, and ignores its tensors
    only at the release's num_layers 61). `ema`: the parameters' EMA (--ema-decay, FP32) instead of the live
    weights."""
    _check_empty_output(Path(out_dir))
    path = resolve_checkpoint(load_dir, iteration)
    saved = model_config_of(path)
    if ema:
        check_has_ema(path)
    reader = dist_ckpt_io.DistCheckpointReader(path)
    reader.check_files()
    _check_megatron_keys(reader, saved)
    cfg = saved.replace(mtp_num_layers=None) if no_mtp else saved
    hf_tokenizer = _load_tokenizer(tokenizer, cfg) if tokenizer else None
    out_dtype = None
    with _progress(_hf_bytes(reader, cfg), "Megatron -> HF", progress) as bar, \
            ShardedCheckpointWriter(out_dir, max_shard_bytes) as writer:
        for layer in _layers(cfg):
            names = list(megatron_sources(layer, cfg))
            megatron = _read_megatron(reader, names, cfg, ema)
            if layer is None:
                hf = megatron_to_hf_global_tensors(megatron, cfg)
            else:
                main = (_read_megatron(reader, [MEGATRON_EMBEDDING, MEGATRON_HEAD], cfg, ema)
                        if is_mtp_layer(layer, cfg) else None)
                hf = megatron_to_hf_layer_tensors(layer, megatron, cfg, main=main)
            del megatron
            for name, tensor in sorted(hf.items()):
                bar.update(tensor.nbytes)
                if name.endswith(FP32_TENSORS):
                    tensor = tensor.float()
                else:
                    tensor = tensor.to(dtype) if dtype else tensor
                    out_dtype = out_dtype or tensor.dtype
                if fp8 and is_fp8_weight(name):
                    weight, scale_inv = quantize_fp8_block(tensor, DEFAULT_BLOCK)
                    writer.add(name, weight)
                    writer.add(name + SCALE_INV_SUFFIX, scale_inv)
                else:
                    writer.add(name, tensor)
            del hf
        hf_config = model_config_to_hf_config(cfg, HF_DTYPE_NAMES.get(out_dtype, "bfloat16"))
        if fp8:
            hf_config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                                "weight_block_size": list(DEFAULT_BLOCK)}
        if hf_tokenizer:
            token_ids = _write_tokenizer(hf_tokenizer, writer)
            hf_config.update(token_ids)
            writer.add_file("generation_config.json", json.dumps({"_from_model_config": True, **token_ids}, indent=2) + "\n")
        writer.add_file("config.json", json.dumps(hf_config, indent=2) + "\n")
    return cfg
