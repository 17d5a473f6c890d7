"""Pretrain a DeepSeek-V3-class model on Megatron-Core.

    torchrun --nproc-per-node 4 pretrain_dsv3.py --pipeline-model-parallel-size 2 \\
        --expert-model-parallel-size 2          # tiny preset, mock data, CPU (gloo) or GPUs (nccl)

Flags follow Megatron-LM's names; `--help` lists them. `--model deepseek-v3` selects the 671B
architecture; every preset field can be overridden by its flag.
"""

from megatron_dsv3.training.arguments import parse_args
from megatron_dsv3.training.train import pretrain


def main(argv=None):
    pretrain(parse_args(argv))


if __name__ == "__main__":
    main()
