"""pretrain_dsv3.py that afterwards writes what each rank's optimizer holds: per state ('exp_avg', 'exp_avg_sq',
'master_param', ...) its dtypes and bytes over the rank's shards, measured from the tensors.

    torchrun --nproc-per-node N tests/scripts/optimizer_state.py OUT_PREFIX [pretrain flags]  → OUT_PREFIX.rank{R}.json
"""

import json
import os
import sys

from megatron_dsv3.training import train
from megatron_dsv3.training.arguments import parse_args


def main():
    out, argv = sys.argv[1], sys.argv[2:]
    optimizers = []
    setup = train.setup_model_and_optimizer

    def setup_and_keep(args, config):
        chunks, optimizer, scheduler = setup(args, config)
        optimizers.append(optimizer)
        return chunks, optimizer, scheduler

    train.setup_model_and_optimizer = setup_and_keep
    train.pretrain(parse_args(argv))
    states = {}
    for sub in getattr(optimizers[0], "chained_optimizers", optimizers):
        for state in sub.optimizer.state.values():
            for name, tensor in state.items():
                entry = states.setdefault(name, {"dtypes": [], "bytes": 0})
                entry["dtypes"] = sorted(set(entry["dtypes"]) | {str(tensor.dtype)})
                entry["bytes"] += tensor.numel() * tensor.element_size()
    with open(f"{out}.rank{os.environ['RANK']}.json", "w") as f:
        json.dump(states, f)


if __name__ == "__main__":
    main()
