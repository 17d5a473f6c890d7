"""The saved model config against the one this job builds, field by field, before any tensor is read."""

import dataclasses
import re


def config_differences(saved: dict, now) -> list:
    """'field: saved → now' for every field of DSv3ModelConfig `now` whose saved value differs."""
    current = dataclasses.asdict(now)
    return [f"{name}: {saved.get(name, '(absent)')} → {value}"
            for name, value in current.items() if saved.get(name, "(absent)") != value]


def check_architecture(path: str, common: dict, args) -> list:
    """The differences, when --allow-partial-load accepts them; raises ValueError (one line) otherwise."""
    if "model_config" not in common:
        raise ValueError(f"{path}/common.pt has no model_config: not saved by pretrain_dsv3.py or its converter")
    differences = config_differences(common["model_config"], args.model_config)
    if differences and not args.allow_partial_load:
        raise ValueError(f"{path} was saved with another model ({'; '.join(differences)}): launch with the saved "
                         "model flags, or pass --allow-partial-load to load only the tensors that match")
    return differences


def describe_left_out(keys, limit: int = 24) -> str:
    """Tensor names, a whole layer as `decoder.layers.N.*`."""
    groups = sorted({re.sub(r"^(.*?layers\.\d+)\..*$", r"\1.*", key) for key in keys})
    shown = ", ".join(groups[:limit])
    return shown + (f" and {len(groups) - limit} more" if len(groups) > limit else "")
