"""Megatron distributed checkpoints (torch_dist) that are never half-written.

Layout of `--save DIR`:
    DIR/iter_0000100/                  a complete checkpoint (model, optimizer, scheduler, RNG, data position)
    DIR/latest_checkpointed_iteration.txt   the newest complete one; written last, atomically

A save goes to `iter_N.tmp`, which becomes `iter_N` only after every rank has finished; the marker
is replaced (write + rename) after that. A crash at any point leaves the previous checkpoint and
marker untouched. Model and optimizer are sharded by global keys, so a checkpoint loads into any
TP/PP/EP/DP layout; RNG states are restored only into the same layout.
"""

import dataclasses
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import StrictHandling
from megatron.core.optimizer import distrib_optimizer
from torch.distributed.checkpoint.api import CheckpointException

from megatron_dsv3.checkpointing.arch_check import check_architecture, describe_left_out
from megatron_dsv3.checkpointing.discovery import (
    TRACKER_FILE, CheckpointError, check_nothing_newer, checkpoint_dir, read_marker, resolve_load,
)
from megatron_dsv3.training.input_checks import fail, rank0_verdict

from megatron_dsv3.training.ema import ema_sharded_state_dict

# megatron-core 0.16.1 cannot load 'fully_reshardable' distributed-optimizer state into torch's Adam
# (its per-parameter "step" breaks the copy); with Apex/TE's fused Adam it reshards over any layout.
OPTIMIZER_SHARDING = {
    "distrib_optim_sharding_type": "fully_reshardable" if distrib_optimizer.HAVE_APEX_OR_TE else "dp_reshardable"
}


def sharded_metadata() -> dict:
    """What megatron-core's sharded_state_dict needs to know about the layout (MTP with PP needs it)."""
    return {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}


def read_latest_iteration(root: str):
    """The iteration the marker names, or None when it is missing or unusable (see discovery.resolve_load)."""
    return read_marker(root)[0]


def _layout() -> dict:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "ep": parallel_state.get_expert_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(),
    }


def _rng_state() -> ShardedObject:
    state = {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": {k: v.clone() for k, v in _tracker().get_states().items()},
    }
    return ShardedObject("rng_state", state, (dist.get_world_size(),), (dist.get_rank(),), replica_id=0)


def _tracker():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


def _sharded_state_dict(chunks, optimizer, scheduler, is_loading: bool, with_optimizer=True, with_rng=True,
                        ema=None):
    metadata = sharded_metadata()
    state = {}
    if len(chunks) == 1:
        state["model"] = chunks[0].module.sharded_state_dict(metadata=metadata)
        model_state = state["model"]
    else:
        model_state = {}  # per chunk: two chunks of one rank may hold the same key (DualPipeV's tied embedding)
        for index, chunk in enumerate(chunks):
            state[f"model{index}"] = chunk.module.sharded_state_dict(metadata=metadata)
            model_state[index] = state[f"model{index}"]
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata=OPTIMIZER_SHARDING
        )
        state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_state()
    if ema is not None:
        states = {0: state["model"]} if len(chunks) == 1 else model_state
        state["ema"] = ema_sharded_state_dict(ema, states)
    return state


def save_checkpoint(args, iteration, consumed_samples, chunks, optimizer, scheduler, ema=None) -> None:
    root = args.save
    final = checkpoint_dir(root, iteration)
    if read_latest_iteration(root) == iteration and os.path.isdir(final):
        return  # this exact state is already saved
    try:
        check_nothing_newer(root, iteration)
    except CheckpointError as e:
        fail(str(e))
    rank0_verdict(lambda: _check_lock(args))
    staging = final + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted save
        os.makedirs(staging)
    dist.barrier()
    state = _sharded_state_dict(chunks, optimizer, scheduler, is_loading=False, ema=ema)
    state.update(
        iteration=iteration,
        consumed_samples=consumed_samples,
        layout=_layout(),
        use_distributed_optimizer=args.use_distributed_optimizer,
        optimizer_sharding=OPTIMIZER_SHARDING["distrib_optim_sharding_type"],
        model_config=dataclasses.asdict(args.model_config),
        has_ema=ema is not None,
    )
    try:
        dist_checkpointing.save(state, staging)
        dist.barrier()
        if dist.get_rank() == 0:
            _publish(root, staging, final, iteration)
    except (OSError, CheckpointException) as e:
        if dist.get_rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        latest = read_latest_iteration(root)
        kept = f"the last checkpoint {checkpoint_dir(root, latest)} is intact" if latest is not None else "no checkpoint"
        fail(f"saving {final} failed ({_os_error(e)}); removed {staging}, {kept}; free space on --save or fix it")
    dist.barrier()


def _check_lock(args) -> None:
    from megatron_dsv3.checkpointing.save_lock import LockError

    try:
        if getattr(args, "save_lock", None):
            args.save_lock.check_owned()
    except LockError as e:
        fail(str(e))


def _publish(root, staging, final, iteration) -> None:
    """Rank 0: the staged checkpoint becomes iter_N, then the marker names it (write + rename)."""
    shutil.rmtree(final, ignore_errors=True)  # the same iteration, left complete without a marker update
    os.replace(staging, final)
    marker = os.path.join(root, TRACKER_FILE)
    with open(marker + ".tmp", "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(marker + ".tmp", marker)
    print(f"saved checkpoint {final}", flush=True)


def _os_error(error) -> str:
    """The OSError behind a failed save (torch DCP wraps each rank's failure in a CheckpointException)."""
    causes = [error] + list(getattr(error, "failures", {}).values())
    for cause in causes:
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            return f"{cause.strerror or cause}: {cause.filename}" if cause.filename else str(cause.strerror or cause)
    return type(error).__name__


def _materialize_optimizer_state(optimizer) -> None:
    """The distributed optimizer describes its checkpoint from its Adam state, which a fresh optimizer
    lacks: megatron-core fills it with placeholders (a zero-gradient step) that the load then replaces.
    Runs before the model is loaded, so the step cannot touch the restored weights."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(sub, "_init_optimizer_states_with_dummy_values") and not sub.optimizer.state:
            sub._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer) -> None:
    """Without Apex/TE, megatron-core 0.16.1's distributed optimizer restores torch Adam's per-parameter `step`
    from the placeholder state (1) into one tensor shared by all parameters (which Adam then increments once per
    parameter). Give each parameter its own step, the one saved with its param group."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in sub.optimizer.param_groups:
            if group.get("step") is None:
                continue
            for param in group["params"]:
                state = sub.optimizer.state.get(param, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype)


_MODEL_PREFIXES = ("embedding.", "decoder.", "mtp.", "output_layer.")


def prepare_load(args):
    """Before the model is built: which checkpoint `--load` resumes (None: from scratch), its common state, and
    the architecture differences --allow-partial-load accepted. Raises CheckpointError (one line)."""
    from megatron_dsv3.conversion.dist_ckpt_io import DistCheckpointReader

    resolved = resolve_load(args.load)
    if resolved is None:
        return None
    path, iteration = resolved
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as e:  # a truncated or foreign common.pt: pickle/zip errors of any kind
        raise CheckpointError(f"{path}/common.pt of checkpoint {path} is unreadable ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); resume an older iter_* with --load") from None
    try:
        DistCheckpointReader(path).check_files()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: {e}; resume an older iter_* with --load DIR/iter_N") from None
    except Exception as e:
        raise CheckpointError(f"{path}/.metadata of checkpoint {path} is unreadable ({type(e).__name__}); "
                              "resume an older iter_* with --load DIR/iter_N") from None
    try:
        differences = check_architecture(path, common, args)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return {"path": path, "iteration": iteration, "common": common, "differences": differences}


def load_checkpoint(args, chunks, optimizer, scheduler, plan=None, ema=None):
    """Resume from `plan` (prepare_load's, or found now); returns (iteration, consumed_samples)."""
    if plan is None:
        plan = rank0_verdict(lambda: _checked(prepare_load, args))
    if plan is None:
        if dist.get_rank() == 0:
            print(f"no checkpoint in {args.load}: training from scratch", flush=True)
        return 0, 0
    path, iteration, common = plan["path"], plan["iteration"], plan["common"]
    same_layout = common.get("layout") == _layout()
    load_optim = not (args.no_load_optim or getattr(args, "finetune", False))
    if load_optim and common.get("use_distributed_optimizer") != args.use_distributed_optimizer:
        fail(f"{path} was saved {'with' if common.get('use_distributed_optimizer') else 'without'} "
             "--use-distributed-optimizer; launch the same way, or pass --no-load-optim")
    saved, now = common.get("layout", {}), _layout()
    if load_optim and any(saved.get(k) != now[k] for k in ("tp", "pp", "ep")):
        fail(f"the optimizer state in {path} was saved at layout {saved} and reshards over data "
             f"parallelism only (now {now}); pass --no-load-optim to load the weights into this layout")
    load_rng = same_layout and not args.no_load_rng and not getattr(args, "finetune", False)
    if load_optim:
        _materialize_optimizer_state(optimizer)
    if ema is not None and not common.get("has_ema"):
        fail(f"{path} holds no EMA (saved without --ema-decay); resume without --ema-decay")
    state = _sharded_state_dict(chunks, optimizer, scheduler, True, with_optimizer=load_optim, with_rng=load_rng,
                                ema=ema)
    partial = getattr(args, "allow_partial_load", False)
    try:
        loaded, in_checkpoint_only, in_model_only = dist_checkpointing.load(
            state, path, strict=StrictHandling.RETURN_ALL)
    except Exception as e:  # e.g. a tensor whose shape changed: DCP reports it per rank
        fail(f"loading {path} failed: {str(e).strip().splitlines()[-1][:300]}")
    left_out = sorted(k for k in in_checkpoint_only if k.startswith(_MODEL_PREFIXES))
    not_found = sorted(k for k in in_model_only if k.startswith(_MODEL_PREFIXES))
    if (left_out or not_found) and not partial:
        fail(f"{path} does not match this model (in the checkpoint only: {describe_left_out(left_out) or '-'}; "
             f"in the model only: {describe_left_out(not_found) or '-'}); pass --allow-partial-load to load the rest")
    for index, chunk in enumerate(chunks):
        chunk.module.load_state_dict(loaded["model"] if len(chunks) == 1 else loaded[f"model{index}"],
                                     strict=not partial)
    if load_optim:
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if ema is not None:
        ema.load_state_dict(loaded["ema"])
    if load_rng:
        rng = loaded["rng_state"]
        random.setstate(rng["random"])
        np.random.set_state(rng["np"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        _tracker().set_states(rng["tracker"])
    if dist.get_rank() == 0:
        note = "" if same_layout else f" (saved at layout {common.get('layout')}; RNG state not restored)"
        print(f"loaded checkpoint {path} at iteration {iteration}{note}", flush=True)
        if partial:
            print(f"partial load of {path} (--allow-partial-load): config differences: "
                  f"{'; '.join(plan['differences']) or 'none'}; left out of the checkpoint: "
                  f"{describe_left_out(left_out) or 'nothing'}; not in the checkpoint (kept as initialized): "
                  f"{describe_left_out(not_found) or 'nothing'}", flush=True)
    if getattr(args, "finetune", False):
        if dist.get_rank() == 0:
            print("--finetune: starting at iteration 0 with a fresh optimizer", flush=True)
        return 0, 0
    return iteration, common["consumed_samples"]


def _checked(prepare, args):
    try:
        return prepare(args)
    except CheckpointError as e:
        fail(str(e))
