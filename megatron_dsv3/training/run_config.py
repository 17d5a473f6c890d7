"""The run's full configuration as JSON-safe values: every flag (after validation fills the derived ones,
e.g. data_parallel_size, num_microbatches) with `model_config` expanded field by field. TensorBoard gets it
as text, wandb as its run config."""

import dataclasses


def _plain(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)  # paths, enums, objects such as the save lock


def run_config(args) -> dict:
    return {key: _plain(value) for key, value in sorted(vars(args).items())}
