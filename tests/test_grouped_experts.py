"""--moe-grouped-gemm: the routed experts as grouped GEMMs (moe/grouped_experts.py) against megatron-core's
SequentialMLP loop on CPU (torch._grouped_mm runs on CPU too): same outputs and gradients, same checkpoint keys,
weight-gradients deferred under a DualPipe B op, and the spec's choice of module. One process, no launch."""

import pytest
import torch
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.spec_utils import build_module

from megatron_dsv3.models import spec
from megatron_dsv3.models.gpt_builder import build_model
from megatron_dsv3.models.presets import get_preset
from megatron_dsv3.models.transformer_config import build_transformer_config
from megatron_dsv3.moe.grouped_experts import GroupedExperts, grouped_mm_supported
from megatron_dsv3.pipeline.weight_grad_store import WeightGradStore
from megatron_dsv3.training.init_weights import init_weights_layout_independent
from megatron_dsv3.training.initialize import initialize_single_process

NUM_EXPERTS = 8


@pytest.fixture(scope="module", autouse=True)
def single_process():
    initialize_single_process()


def config(**overrides):
    return build_transformer_config(get_preset("tiny"), moe_grouped_gemm=True, **overrides)


def experts_pair(cfg):
    groups = get_default_pg_collection()
    loop = build_module(spec.ModuleSpec(module=SequentialMLP, submodules=spec._swiglu_mlp(spec.HIGH_PRECISION)),
                        NUM_EXPERTS, cfg, pg_collection=groups)
    grouped = build_module(spec.experts_spec(cfg, spec.HIGH_PRECISION), NUM_EXPERTS, cfg, pg_collection=groups)
    assert type(grouped) is GroupedExperts
    init_weights_layout_independent([loop], std=0.2, seed=3)
    grouped.load_state_dict(loop.state_dict())
    return loop, grouped


def run(experts, x, tokens_per_expert, probs, grad):
    x, probs = x.clone().requires_grad_(), probs.clone().requires_grad_()
    out, bias = experts(x, tokens_per_expert, probs)
    assert bias is None
    out.backward(grad)
    weights = {n: p.grad.clone() for n, p in experts.named_parameters()}
    return out.detach(), x.grad, probs.grad, weights


@pytest.mark.parametrize("counts", [[5, 0, 3, 7, 1, 0, 2, 6], [0] * 8, [24, 0, 0, 0, 0, 0, 0, 0]],
                         ids=["mixed", "no-rows", "one-expert"])
def test_same_outputs_and_gradients_as_sequential_mlp(counts):
    cfg = config()
    loop, grouped = experts_pair(cfg)
    tokens_per_expert = torch.tensor(counts)
    rows = sum(counts)
    torch.manual_seed(0)
    x, probs, grad = torch.randn(rows, cfg.hidden_size), torch.rand(rows), torch.randn(rows, cfg.hidden_size)
    expected, got = run(loop, x, tokens_per_expert, probs, grad), run(grouped, x, tokens_per_expert, probs, grad)
    for name, a, b in zip(("output", "dx", "dprobs"), expected[:3], got[:3]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)
    assert expected[3].keys() == got[3].keys() and len(got[3]) == 2 * NUM_EXPERTS
    for name, grad_loop in expected[3].items():
        torch.testing.assert_close(got[3][name], grad_loop, rtol=1e-6, atol=1e-6, msg=name)
    if rows:
        assert any(g.abs().sum() > 0 for g in got[3].values())


def test_same_checkpoint_keys_as_sequential_mlp():
    loop, grouped = experts_pair(config())
    keys = [sorted(m.sharded_state_dict(prefix="mlp.experts.").keys()) for m in (loop, grouped)]
    assert keys[0] == keys[1] and len(keys[0]) >= 2 * NUM_EXPERTS
    assert all(key.startswith("mlp.experts.local_experts.") for key in keys[0]), keys[0]


def test_weight_gradients_wait_for_the_w_op_under_a_b_op():
    cfg = config()
    _, grouped = experts_pair(cfg)
    tokens_per_expert = torch.tensor([3, 1, 0, 2, 4, 1, 1, 2])
    x, probs = torch.randn(14, cfg.hidden_size), torch.rand(14)
    immediate = run(grouped, x, tokens_per_expert, probs, torch.ones(14, cfg.hidden_size))
    grouped.zero_grad(set_to_none=True)
    store = WeightGradStore()
    x_leaf = x.clone().requires_grad_()
    with store.input_grad_only("b0"):
        out, _ = grouped(x_leaf, tokens_per_expert, probs)
        out.backward(torch.ones_like(out))
    assert all(p.grad is None for p in grouped.parameters())  # B: dL/dx only
    torch.testing.assert_close(x_leaf.grad, immediate[1], rtol=0, atol=0)
    store.flush("b0")
    store.check_empty()
    for name, p in grouped.named_parameters():
        torch.testing.assert_close(p.grad, immediate[3][name], rtol=0, atol=0, msg=name)


def test_whole_model_step_matches_the_loop():
    """The tiny model (MoE layers and MTP) with and without --moe-grouped-gemm: the same loss and gradients."""
    results = []
    for grouped in (False, True):
        cfg = build_transformer_config(get_preset("tiny"), moe_grouped_gemm=grouped)
        model = build_model(cfg, 256, 32)
        init_weights_layout_independent([model], std=0.02, seed=5)
        kinds = {type(m) for m in model.modules()}
        assert (GroupedExperts in kinds) == grouped and (SequentialMLP in kinds) != grouped
        torch.manual_seed(1)
        tokens = torch.randint(0, 256, (2, 32))
        labels = torch.roll(tokens, -1, 1)
        position_ids = torch.arange(32).expand_as(tokens)
        loss = model(tokens, position_ids, None, labels=labels, loss_mask=torch.ones_like(tokens).float()).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_loop, grads_loop), (loss_grouped, grads_grouped) = results
    torch.testing.assert_close(loss_grouped, loss_loop, rtol=1e-6, atol=1e-6)
    assert grads_loop.keys() == grads_grouped.keys() and any("local_experts.7" in n for n in grads_loop)
    for name, grad in grads_loop.items():
        torch.testing.assert_close(grads_grouped[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_the_spec_keeps_the_loop_where_grouped_gemm_cannot_run():
    assert spec.experts_spec(build_transformer_config(get_preset("tiny")), spec.HIGH_PRECISION).module is SequentialMLP
    assert spec.experts_spec(config(), spec.EMULATED_FP8).module is SequentialMLP  # emulated FP8 experts loop
    assert spec.experts_spec(config(), spec.SPLIT_BACKWARD).module is GroupedExperts  # DualPipe chunks group too
    odd = build_transformer_config(get_preset("tiny").replace(moe_ffn_hidden_size=30), moe_grouped_gemm=True)
    assert not grouped_mm_supported(odd, torch.device("cpu"))  # 30 fp32 = 120 B rows: not 16-byte aligned
    assert spec.experts_spec(odd, spec.HIGH_PRECISION).module is SequentialMLP
