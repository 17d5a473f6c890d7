"""Inconsistent flags stop before any process-group work, naming the flags."""

import pytest

from megatron_dsv3.training.arguments import parse_args


def fails(argv, world_size, *needles):
    with pytest.raises(SystemExit) as error:
        parse_args(argv, world_size=world_size)
    message = str(error.value)
    for needle in needles:
        assert needle in message, message


def test_defaults_are_the_tiny_job():
    args = parse_args([], world_size=1)
    assert args.model_config.hidden_size == 64 and args.mock_data and args.num_microbatches == 4


def test_overrides_apply_to_the_preset():
    args = parse_args(["--model", "deepseek-v3", "--num-layers", "8", "--moe-layer-freq", "([0]*1+[1]*7)",
                       "--q-lora-rank", "none", "--seq-length", "128"], world_size=1)
    m = args.model_config
    assert (m.num_layers, m.q_lora_rank, m.moe_layer_pattern[:2], m.hidden_size) == (8, None, [0, 1], 7168)


@pytest.mark.parametrize(
    "argv, world, needles",
    [
        (["--pipeline-model-parallel-size", "3"], 4, ["WORLD_SIZE 4", "--pipeline-model-parallel-size 3"]),
        (["--expert-model-parallel-size", "3"], 3, ["--num-experts 8", "--expert-model-parallel-size 3"]),
        (["--expert-model-parallel-size", "4", "--pipeline-model-parallel-size", "2"], 4,
         ["--expert-model-parallel-size 4"]),
        (["--pipeline-model-parallel-size", "3", "--num-layers", "4"], 3, ["--num-layers 4", "--decoder-first"]),
        (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, ["--global-batch-size 6"]),
        (["--moe-router-num-groups", "3"], 1, ["--moe-router-num-groups 3"]),
        (["--moe-router-group-topk", "5"], 1, ["--moe-router-group-topk"]),
        (["--moe-router-topk", "8", "--moe-router-group-topk", "1"], 1, ["--moe-router-topk 8"]),
        (["--tensor-model-parallel-size", "2"], 2, ["--tensor-model-parallel-size", "EP and PP"]),
        (["--seq-length", "1024"], 1, ["--max-position-embeddings"]),
        (["--save-interval", "5"], 1, ["--save DIR"]),
        (["--tokenizer-type", "HuggingFaceTokenizer"], 1, ["--tokenizer-model"]),
        (["--moe-layer-freq", "[0,1]"], 1, ["--moe-layer-freq", "--num-layers 4"]),
        (["--pipeline-schedule", "interleaved", "--pipeline-model-parallel-size", "2"], 2,
         ["--num-layers-per-virtual-pipeline-stage"]),
        (["--num-layers-per-virtual-pipeline-stage", "1", "--pipeline-model-parallel-size", "4", "--num-layers", "8",
          "--moe-layer-freq", "([0]+[1]*7)", "--global-batch-size", "6", "--micro-batch-size", "1"], 4,
         ["multiple of", "--pipeline-model-parallel-size 4"]),
        (["--num-layers-per-virtual-pipeline-stage", "1", "--pipeline-model-parallel-size", "2"], 2, ["gloo", "PP ≥ 3"]),
        (["--decoder-first-pipeline-num-layers", "1"], 1, ["--pipeline-model-parallel-size > 1"]),
        (["--overlap-moe-expert-parallel-comm", "--expert-model-parallel-size", "2"], 2,
         ["--overlap-moe-expert-parallel-comm", "dualpipe or dualpipev, not 1f1b"]),
        (["--overlap-moe-expert-parallel-comm", "--pipeline-schedule", "dualpipev", "--pipeline-model-parallel-size",
          "2", "--global-batch-size", "16"], 2, ["--expert-model-parallel-size > 1"]),
        (["--min-lr", "1", "--lr", "0.1"], 1, ["--min-lr"]),
        (["--pipeline-schedule", "dualpipev", "--pipeline-model-parallel-size", "2", "--global-batch-size", "8",
          "--micro-batch-size", "1", "--rampup-batch-size", "2", "2", "64"], 2,
         ["--rampup-batch-size 2 2 64: at its global batch size 2", "micro-batches >= 2 x"]),
        (["--pipeline-schedule", "dualpipe", "--pipeline-model-parallel-size", "2", "--global-batch-size", "8",
          "--micro-batch-size", "1", "--rampup-batch-size", "4", "1", "64"], 2,
         ["--rampup-batch-size 4 1 64: at its global batch size 5", "an even number"]),
        (["--num-layers-per-virtual-pipeline-stage", "1", "--pipeline-model-parallel-size", "4", "--num-layers", "8",
          "--moe-layer-freq", "([0]+[1]*7)", "--global-batch-size", "8", "--micro-batch-size", "1",
          "--rampup-batch-size", "2", "2", "64"], 4, ["--rampup-batch-size 2 2 64: at its global batch size 2",
                                                       "multiple of --pipeline-model-parallel-size 4"]),
        (["--recompute-granularity", "full"], 1, ["--recompute-method"]),
        (["--recompute-granularity", "selective", "--recompute-modules", "moe_act"], 1,
         ["megatron-core rejects these flags", "moe_act"]),
    ],
)
def test_inconsistent_flags(argv, world, needles):
    fails(argv, world, *needles)


def test_uneven_pipeline_split_for_61_layers():
    args = parse_args(["--model", "deepseek-v3", "--pipeline-model-parallel-size", "16",
                       "--expert-model-parallel-size", "8", "--decoder-first-pipeline-num-layers", "3",
                       "--decoder-last-pipeline-num-layers", "2", "--global-batch-size", "16",
                       "--micro-batch-size", "1", "--seq-length", "4096"], world_size=128)
    assert args.data_parallel_size == 8
    fails(["--model", "deepseek-v3", "--pipeline-model-parallel-size", "16", "--seq-length", "64"], 16,
          "--num-layers 61")


HIERARCHICAL = ["--moe-token-dispatcher-type", "hierarchical", "--global-batch-size", "16", "--micro-batch-size", "1"]


@pytest.mark.parametrize(
    "argv, world, needles",
    [
        (["--expert-model-parallel-size", "8", "--simulated-gpus-per-node", "4", "--moe-router-group-topk", "4"], 8,
         ["(M) exceeds the 2 node(s)"]),
        (["--expert-model-parallel-size", "4", "--simulated-gpus-per-node", "3"], 4, ["not aligned with nodes of 3"]),
        (["--expert-model-parallel-size", "8", "--simulated-gpus-per-node", "4", "--moe-router-num-groups", "8"], 8,
         ["must equal the 2 node(s)"]),
    ],
)
def test_node_limited_routing_errors(argv, world, needles):
    fails(HIERARCHICAL + argv, world, *needles)


def test_node_limited_routing_derives_groups_from_nodes():
    args = parse_args(HIERARCHICAL + ["--expert-model-parallel-size", "8", "--simulated-gpus-per-node", "2"], world_size=8)
    assert (args.model_config.moe_router_num_groups, args.model_config.moe_router_group_topk) == (4, 2)
