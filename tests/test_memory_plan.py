"""The memory savings' off-switches (issue 13; benchmarks/memory_plan.py runs the trainer with each): the flags
parse, reach the TransformerConfig, and change what the model holds: DualPipe's MTP chunk shares stage 0's word
embedding or keeps an equal copy whose gradient is summed with stage 0's, the emulated FP8 linears save the FP8
tiles of their input or the high-precision input (with bit-equal outputs and gradients); and selective recompute
frees what the planner says it frees. In process, one rank; the bad flag combinations are in
tests/test_bad_inputs.py's table."""

import pytest
import torch

from test_fp8_storage import saved_tensors
from megatron_dsv3.fp8.blockwise import FP8_DTYPE, fp8_blockwise_linear
from megatron_dsv3.models.transformer_config import transformer_config_from_args
from megatron_dsv3.pipeline import dualpipe
from megatron_dsv3.pipeline.placement import build_dual_chunks, embedding_copies
from megatron_dsv3.training.arguments import parse_args
from megatron_dsv3.training.init_weights import init_weights_layout_independent
from megatron_dsv3.training.initialize import initialize_single_process

DUALPIPE = ["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "dualpipe", "--micro-batch-size", "1",
            "--global-batch-size", "4", "--seq-length", "16"]
FP8 = ["--fp8-format", "e4m3", "--fp8-recipe", "blockwise", "--fp8-emulation"]
OFF = ["--no-deallocate-pipeline-outputs", "--no-share-mtp-embedding", "--no-fp8-activation-storage"]


def config_of(*flags):
    return transformer_config_from_args(parse_args([*DUALPIPE, *FP8, *flags], world_size=2))


def test_flags_reach_the_config():
    on, off = config_of(), config_of(*OFF)
    fields = ("deallocate_pipeline_outputs", "share_mtp_embedding", "fp8_activation_storage")
    assert [getattr(on, f) for f in fields] == [True, True, True]
    assert [getattr(off, f) for f in fields] == [False, False, False]


@pytest.fixture(scope="module")
def single_process():
    initialize_single_process()


@pytest.fixture(scope="module")
def chunks(single_process):
    """Rank 0 of DualPipe at PP=2 (stage 0 and the MTP stage), FP8-emulated, with each switch on and off."""
    built = {}
    for name, flags in (("on", []), ("off", OFF)):
        config = config_of(*flags)
        pair = build_dual_chunks(config, 256, 16, "dualpipe", pp_rank=0, pp_size=2)
        init_weights_layout_independent(pair, std=config.init_method_std, seed=1)
        built[name] = pair
    return built


def test_mtp_shares_the_stage_0_embedding_or_keeps_an_equal_copy(chunks):
    stage0, mtp_stage = chunks["on"]
    assert mtp_stage.mtp_process and mtp_stage.embedding is stage0.embedding
    assert "embedding" not in mtp_stage._modules  # registered once: one parameter, gradient and optimizer state
    assert len(embedding_copies(chunks["on"])) == 1
    copies = embedding_copies(chunks["off"])
    assert len(copies) == 2 and copies[0] is not copies[1]
    assert torch.equal(copies[0], copies[1])  # initialized from the same checkpoint key
    params = lambda pair: sum(p.numel() for c in pair for p in c.parameters())  # noqa: E731
    assert params(chunks["off"]) - params(chunks["on"]) == copies[0].numel()


def test_unshared_copies_get_the_sum_of_their_gradients(chunks):
    copies = embedding_copies(chunks["off"])
    grads = [torch.randn_like(w) for w in copies]
    for w, g in zip(copies, grads):
        w.grad = g.clone()
    dualpipe._sum_embedding_copies(chunks["off"])
    assert all(torch.equal(w.grad, grads[0] + grads[1]) for w in copies)
    for w in copies:
        w.grad = None


@pytest.mark.parametrize("storage", [True, False], ids=["fp8_storage", "high_precision_storage"])
def test_fp8_linear_of_the_model_saves_what_the_switch_says(chunks, storage):
    """The model's FP8 linear (the spec's, with the config the flags built): its saved activations are the FP8
    xᵀ tiles and their scales, or x itself."""
    linear = chunks["on" if storage else "off"][0].decoder.layers[0].self_attention.linear_q_down_proj
    assert linear.config.fp8_activation_storage is storage
    x = torch.randn(16, 1, linear.weight.shape[1], requires_grad=True)
    packed, _ = saved_tensors(lambda: linear(x))
    activations = [t for t in packed if t is not linear.weight]
    if storage:
        assert [t.dtype for t in activations] == [FP8_DTYPE, torch.float32]
        assert activations[0].shape == (x.shape[-1], 16)
    else:
        assert len(activations) == 1 and activations[0].dtype == torch.float32
        assert torch.equal(activations[0], x.detach().reshape(16, -1))


def test_high_precision_storage_gives_bit_equal_outputs_and_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 96, generator=g) * torch.exp(torch.randn(200, 1, generator=g))
    w, dy = 0.05 * torch.randn(80, 96, generator=g), torch.randn(200, 80, generator=g)
    results = []
    for storage in (True, False):
        xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_blockwise_linear(xl, wl, power_of_two_scales=True, fp8_activation_storage=storage)
        y.backward(dy)
        results.append((y, xl.grad, wl.grad))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_recompute_saving_per_layer_is_the_planners(single_process):
    """Selective recompute of the norms and MLA up-projections (megatron's CheckpointWithoutOutput frees their
    outputs after the forward): the bytes held for backward after one forward of the tiny model's first two layers
    (a dense and an MoE layer; SavedActivationMeter.resident_bytes) drop by what the planner's
    layer_activation_bytes says for torch's composite CPU kernels, within 10%."""
    from dataclasses import replace

    from megatron_dsv3.models.gpt_builder import build_model
    from megatron_dsv3.models.presets import get_preset
    from megatron_dsv3.models.transformer_config import build_transformer_config
    from megatron_dsv3.pipeline.recording import SavedActivationMeter
    from megatron_dsv3.training.planner import Layout, layer_activation_bytes

    seq = 64
    model_config = get_preset("tiny").replace(mtp_num_layers=None, num_layers=2, moe_layer_freq=[0, 1])
    tokens = torch.randint(0, model_config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    held = {}
    for name, extra in (("none", {}), ("norm_and_up_proj", dict(recompute_granularity="selective",
                                                               recompute_modules=["layernorm", "mla_up_proj"]))):
        torch.manual_seed(0)
        model = build_model(build_transformer_config(model_config, **extra), model_config.vocab_size, seq,
                            pre_process=True, post_process=True, pp_rank=0)
        with SavedActivationMeter(list(model.parameters())) as meter:
            loss = model(tokens, torch.arange(seq)[None], None, labels=torch.roll(tokens, -1, 1))
        held[name] = meter.resident_bytes()
        loss.float().sum().backward()
    lay = Layout(seq_length=seq, bf16=False, composite_kernels=True)
    planned = {r: seq * sum(layer_activation_bytes(model_config, replace(lay, recompute=r), moe) for moe in (False, True))
               for r in held}
    saved, planned_saving = held["none"] - held["norm_and_up_proj"], planned["none"] - planned["norm_and_up_proj"]
    assert saved == pytest.approx(planned_saving, rel=0.1), (saved, planned_saving)
