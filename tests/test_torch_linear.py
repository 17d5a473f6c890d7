"""The model path's local shortcuts without tensor parallelism, against megatron-core's own code on the same
weights and inputs: models.torch_linear's parallel linears (one torch GEMM node instead of megatron's Python
autograd functions) and DSv3GPTModel's cross-entropy (torch's instead of the vocab-parallel one). One process."""

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from conftest import autograd_node_names
from megatron_dsv3.models.gpt_builder import build_model
from megatron_dsv3.models.presets import get_preset
from megatron_dsv3.models.torch_linear import TorchColumnParallelLinear, TorchRowParallelLinear
from megatron_dsv3.models.transformer_config import build_transformer_config
from megatron_dsv3.training.initialize import initialize_single_process


@pytest.fixture(scope="module", autouse=True)
def single_process():
    initialize_single_process()


def build(cls, config, bias, skip_bias_add):
    torch.manual_seed(0)
    kwargs = dict(config=config, init_method=torch.nn.init.normal_, bias=bias, skip_bias_add=skip_bias_add)
    if issubclass(cls, ColumnParallelLinear):
        return cls(48, 40, gather_output=False, **kwargs)
    return cls(48, 40, input_is_parallel=True, **kwargs)


def step(layer, x, dy):
    x = x.clone().requires_grad_()
    out, out_bias = layer(x)
    y = out if out_bias is None else out + out_bias
    y.backward(dy)
    return y, x.grad, {n: p.grad for n, p in layer.named_parameters()}, out.grad_fn


@pytest.mark.parametrize("bias, skip_bias_add", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("ours, megatron", [(TorchColumnParallelLinear, ColumnParallelLinear),
                                            (TorchRowParallelLinear, RowParallelLinear)], ids=["column", "row"])
def test_local_linear_is_megatrons_linear_in_one_node(ours, megatron, bias, skip_bias_add):
    config = build_transformer_config(get_preset("tiny"))
    x, dy = torch.randn(6, 2, 48), torch.randn(6, 2, 40)
    got = step(build(ours, config, bias, skip_bias_add), x, dy)
    want = step(build(megatron, config, bias, skip_bias_add), x, dy)
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert got[2].keys() == want[2].keys()
    for name in got[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-6, atol=1e-6, msg=name)
    # megatron's GEMM and its TP-region functions are Python autograd nodes; the local one is torch's own
    python_nodes = ("LinearWithGradAccumulation", "ModelParallelRegion")
    want_nodes, got_nodes = autograd_node_names(want[3]), autograd_node_names(got[3])
    assert any(s in name for name in want_nodes for s in python_nodes), want_nodes
    assert not any(s in name for name in got_nodes for s in python_nodes), got_nodes


def test_sequence_parallel_layer_keeps_megatrons_forward(monkeypatch):
    """Any communication of its own (here sequence parallelism) sends the layer through megatron-core's forward."""
    layer = build(TorchColumnParallelLinear, build_transformer_config(get_preset("tiny")), False, False)
    assert layer._runs_locally()
    monkeypatch.setattr(layer, "sequence_parallel", True)
    assert not layer._runs_locally()


def test_loss_is_megatrons_vocab_parallel_cross_entropy():
    """DSv3GPTModel's LM loss per token (torch's cross-entropy over FP32 logits) against megatron-core's
    vocab-parallel one on the same logits and labels; and the output head computes locally."""
    cfg = get_preset("tiny").replace(mtp_num_layers=None)
    model = build_model(build_transformer_config(cfg), cfg.vocab_size, 16, pre_process=True, post_process=True,
                        pp_rank=0)
    assert type(model.output_layer) is TorchColumnParallelLinear
    logits = torch.randn(16, 3, cfg.vocab_size, requires_grad=True)  # [s, b, V]
    labels = torch.randint(0, cfg.vocab_size, (3, 16))  # [b, s]
    ours = model.compute_language_model_loss(labels, logits)
    megatrons = GPTModel.compute_language_model_loss(model, labels, logits.detach().clone().requires_grad_())
    assert ours.shape == megatrons.shape == (3, 16)
    torch.testing.assert_close(ours, megatrons, rtol=1e-6, atol=1e-6)
