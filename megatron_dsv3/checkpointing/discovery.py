"""Which checkpoint `--load` resumes, decided so that a job never silently starts over.

States of a `--load DIR` (README "What a requeued job does"):
  - absent, or no `iter_*` in it (or only interrupted `iter_*.tmp` saves): training from scratch, said so;
  - `latest_checkpointed_iteration.txt` names a complete `iter_N`: resume N;
  - complete `iter_*` but the marker is missing, unreadable, or names an incomplete/absent directory:
    stop, naming the newest complete iteration and `--load DIR/iter_N` to resume it. Stopping (not
    resuming the newest) is the choice: a missing marker means someone or something removed it, and
    which checkpoint to trust is the user's call;
  - `--load DIR/iter_N` (a checkpoint directory itself): that checkpoint.
A checkpoint is complete when torch_dist's `.metadata`, `metadata.json` and `common.pt` are all there
(`iter_N` appears by rename only after all ranks wrote it). Saves never go behind a newer checkpoint:
`check_nothing_newer` stops a job whose `--save` holds a complete checkpoint newer than the one it starts from.
"""

import os
import re

TRACKER_FILE = "latest_checkpointed_iteration.txt"
COMPLETE_FILES = (".metadata", "metadata.json", "common.pt")
_ITER_DIR = re.compile(r"^iter_(\d+)$")


class CheckpointError(ValueError):
    """One line naming the checkpoint (directory or file) and what to do."""


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def is_complete(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, name)) for name in COMPLETE_FILES)


def complete_iterations(root: str) -> list:
    """Iterations of the complete `iter_N` directories in `root`, ascending."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _ITER_DIR.match(name)
        if match and is_complete(os.path.join(root, name)):
            found.append(int(match.group(1)))
    return sorted(found)


def read_marker(root: str):
    """(iteration or None, why it is unusable or None)."""
    marker = os.path.join(root, TRACKER_FILE)
    try:
        with open(marker) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None, f"{marker} is missing"
    except OSError as e:
        return None, f"{marker} is unreadable ({e.strerror})"
    if not text.isdigit():
        return None, f"{marker} is corrupt ({text[:40]!r})"
    return int(text), None


def _iteration_of(path: str) -> int:
    match = _ITER_DIR.match(os.path.basename(os.path.normpath(path)))
    if match:
        return int(match.group(1))
    from megatron.core.dist_checkpointing import load_common_state_dict

    return int(load_common_state_dict(path)["iteration"])


def resolve_load(load: str):
    """(checkpoint path, iteration) to resume, or None to train from scratch; CheckpointError otherwise."""
    if os.path.isfile(os.path.join(load, "metadata.json")) or _ITER_DIR.match(os.path.basename(os.path.normpath(load))):
        if not is_complete(load):
            missing = [n for n in COMPLETE_FILES if not os.path.isfile(os.path.join(load, n))]
            raise CheckpointError(f"--load {load} is not a complete checkpoint ({', '.join(missing)} missing)")
        return load, _iteration_of(load)
    complete = complete_iterations(load)
    iteration, problem = read_marker(load)
    if iteration is not None and iteration in complete:
        return checkpoint_dir(load, iteration), iteration
    if iteration is not None:
        problem = f"{os.path.join(load, TRACKER_FILE)} names iteration {iteration} but " \
                  f"{checkpoint_dir(load, iteration)} is missing or incomplete"
    if complete:
        newest = checkpoint_dir(load, complete[-1])
        raise CheckpointError(f"{problem}, yet {load} holds complete checkpoints (newest {newest}): resume it with "
                              f"--load {newest}, or write {complete[-1]} into {os.path.join(load, TRACKER_FILE)}")
    if os.path.exists(os.path.join(load, TRACKER_FILE)) or iteration is not None:
        raise CheckpointError(f"{problem} and {load} holds no complete checkpoint; "
                              f"remove {os.path.join(load, TRACKER_FILE)} to train from scratch")
    return None


def check_nothing_newer(save: str, start_iteration: int) -> None:
    """A job starting at `start_iteration` would save behind (and move the marker back from) a newer checkpoint."""
    newer = [i for i in complete_iterations(save) if i > start_iteration]
    if newer:
        raise CheckpointError(
            f"--save {save} holds {checkpoint_dir(save, newer[-1])}, newer than iteration {start_iteration} this job "
            f"starts from; its saves would go behind it: resume it (--load {checkpoint_dir(save, newer[-1])}) or "
            "choose another --save")
