"""Checks of a job's inputs that run before the model is built, each failing with one line.

`fail` prints the line on rank 0 only (RANK of the launch) and exits non-zero on every rank, so a
bad input is reported once, not once per rank, and never as a traceback.
Flags: `validate_input_args` (before torch.distributed). Files: `check_files_before_model`
(rank 0 looks, every rank gets its verdict through one broadcast).
"""

import argparse
import math
import os
import shutil

import torch.distributed as dist

from megatron_dsv3.models.param_count import count_parameters

# Bytes per parameter of one checkpoint: fp32 weights + Adam's two fp32 moments (bf16 training: bf16
# weights + fp32 master copy + two moments). The free-space check asks for this times the parameter count.
CHECKPOINT_BYTES_PER_PARAM = {False: 4 + 8, True: 2 + 4 + 8}


class InputError(SystemExit):
    """A bad input; `message` is the one line (printed by rank 0 only)."""

    def __init__(self, message: str):
        self.message = f"error: {message}"
        super().__init__(self.message if _rank() == 0 else 1)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def fail(message: str):
    raise InputError(message)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a bad flag or value reported as one `error:` line (not the 100-line usage block),
    once per launch (rank 0); `--help` still prints the usage."""

    def error(self, message: str):
        fail(f"{message} (see {self.prog} --help)")


def add_safety_args(parser) -> None:
    g = parser.add_argument_group("run safety")
    g.add_argument("--finetune", action="store_true",
                   help="load the model weights only: start at iteration 0 with a fresh optimizer and RNG (Megatron-LM)")
    g.add_argument("--allow-partial-load", action="store_true",
                   help="load a checkpoint of a different architecture (e.g. without MTP or with fewer layers): "
                        "tensors of matching name and shape load, the rest is listed and left out")
    g.add_argument("--save-lock-stale-seconds", type=float, default=600.0,
                   help="a --save lock whose heartbeat is older than this belongs to a dead job and is taken over")


def validate_input_args(args) -> None:
    """Values no job can run with: non-positive or non-finite rates, batch sizes and intervals below 1."""
    for flag in ("lr", "min_lr", "adam_eps"):
        value = getattr(args, flag)
        if not math.isfinite(value) or value < 0 or (flag == "lr" and value == 0):
            fail(f"--{flag.replace('_', '-')} {value} must be finite and {'> 0' if flag == 'lr' else '≥ 0'}")
    for flag in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be in [0, 1)")
    for flag in ("weight_decay", "clip_grad"):
        if not math.isfinite(getattr(args, flag)) or getattr(args, flag) < 0:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be finite and ≥ 0")
    for flag in ("micro_batch_size", "global_batch_size", "seq_length", "train_iters", "log_interval"):
        if getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be ≥ 1")
    for flag in ("save_interval", "exit_interval", "lr_decay_iters", "num_layers_per_virtual_pipeline_stage"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be ≥ 1 (or left unset)")
    for flag in ("lr_warmup_iters", "max_skipped_nonfinite_steps"):
        if getattr(args, flag) < 0:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be ≥ 0")
    for flag in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"):
        if getattr(args, flag) < 1:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be ≥ 1")
    m = args.model_config
    for field in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size"):
        if getattr(m, field) is None or getattr(m, field) < 1:
            fail(f"--{field.replace('_', '-')} {getattr(m, field)} must be ≥ 1")
    if m.num_experts is not None and m.num_experts < 1:
        fail(f"--num-experts {m.num_experts} must be ≥ 1 (or none for a dense model)")
    if isinstance(m.moe_layer_freq, int) and m.moe_layer_freq < 1:
        fail(f"--moe-layer-freq {m.moe_layer_freq} must be ≥ 1 (every N-th layer is MoE) or a 0/1 list")
    if m.moe_router_topk < 1:
        fail(f"--moe-router-topk {m.moe_router_topk} must be ≥ 1")
    if args.finetune and not args.load:
        fail("--finetune needs --load DIR (the checkpoint whose weights to start from)")
    if args.allow_partial_load and not args.load:
        fail("--allow-partial-load needs --load DIR")
    if args.save_lock_stale_seconds <= 0:
        fail(f"--save-lock-stale-seconds {args.save_lock_stale_seconds} must be > 0")


def checkpoint_bytes(args) -> int:
    """One checkpoint's size, from the parameter count (MTP included) and CHECKPOINT_BYTES_PER_PARAM."""
    return count_parameters(args.model_config).total_with_mtp * CHECKPOINT_BYTES_PER_PARAM[bool(args.bf16)]


def _existing_parent(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_save_dir(args) -> None:
    """--save can be created, written, and has room for one checkpoint."""
    root = args.save
    parent = _existing_parent(root)
    if not os.path.isdir(parent):
        fail(f"--save {root}: {parent} is a file, not a directory; choose another --save")
    try:
        os.makedirs(root, exist_ok=True)
        probe = os.path.join(root, f".write-probe-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        fail(f"--save {root} is not writable ({e.strerror}); choose a writable directory")
    need, free = checkpoint_bytes(args), shutil.disk_usage(root).free
    if free < need:
        fail(f"--save {root}: {free / 2**30:.2f} GiB free but one checkpoint needs about {need / 2**30:.2f} GiB; "
             "free space or choose another --save")


def check_load_dir(args) -> None:
    if os.path.exists(args.load) and not (os.path.isdir(args.load) and os.access(args.load, os.R_OK | os.X_OK)):
        fail(f"--load {args.load} is not a readable directory; give a checkpoint directory or an iter_N inside it")


def rank0_verdict(check) -> object:
    """Runs `check` on rank 0; every rank returns its value or raises its InputError. An unexpected
    exception on rank 0 is re-raised there after the others were told to stop (they would wait forever)."""
    outcome, unexpected = [None, None], None
    if _rank() == 0:
        try:
            outcome = [check(), None]
        except InputError as e:
            outcome = [None, e.message[len("error: "):]]
        except Exception as e:  # noqa: BLE001 - re-raised below, after the broadcast
            unexpected, outcome = e, [None, f"rank 0 failed its checks ({type(e).__name__}); see its traceback"]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(outcome, src=0)
    if unexpected is not None:
        raise unexpected
    if outcome[1] is not None:
        fail(outcome[1])
    return outcome[0]


def check_files_before_model(args):
    """Tokenizer, data, --load (checkpoint discovery, files, architecture), --save (room, nothing newer, lock):
    rank 0 checks, every rank gets the load plan or stops with rank 0's line."""
    return rank0_verdict(lambda: _file_checks(args))


def _file_checks(args):
    from megatron_dsv3.checkpointing.checkpoint import prepare_load
    from megatron_dsv3.checkpointing.discovery import CheckpointError, check_nothing_newer
    from megatron_dsv3.checkpointing.save_lock import LockError, SaveLock
    from megatron_dsv3.data.dataset_checks import check_data_path
    from megatron_dsv3.data.fim import fim_settings
    from megatron_dsv3.data.tokenizer import build_tokenizer, fit_vocab

    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.model_config.vocab_size)
        fim_settings(args, tokenizer)  # the FIM sentinels (and --fim-split-sample) are tokens of it
    except (OSError, ValueError) as e:
        fail(str(e))
    # The --load architecture check compares the vocabulary the model will have (set on rank 0 here, on every
    # rank by _pretrain).
    args.model_config = fit_vocab(args.model_config, tokenizer)
    if args.data_path:
        try:
            check_data_path(args.data_path, args.model_config.vocab_size)
        except (OSError, ValueError) as e:
            fail(str(e))
    plan = None
    try:
        if args.load:
            check_load_dir(args)
            plan = prepare_load(args)
        if args.save:
            check_save_dir(args)
            check_nothing_newer(args.save, plan["iteration"] if plan and not args.finetune else 0)
            lock = SaveLock(args.save, args.save_lock_stale_seconds)
            note = lock.acquire()
            args.save_lock = lock
            if note:
                print(note, flush=True)
    except (CheckpointError, LockError) as e:
        fail(str(e))
    return plan
