"""WeightGradStore: a B op leaves the linears' weight-gradients to its W op, and B then W gives the gradients of
a full backward (high-precision and emulated-FP8 linears)."""

import math

import pytest
import torch

from megatron_dsv3.fp8.linear import Fp8EmulatedMatmul
from megatron_dsv3.pipeline.weight_grad_store import SplitBackwardMatmul, WeightGradStore, weight_grad

MATMULS = {"high_precision": SplitBackwardMatmul(), "fp8_emulated": Fp8EmulatedMatmul()}


class TinyModel(torch.nn.Module):
    """linear (with bias) -> tanh -> RMS-style scale -> linear, through a split-backward GEMM."""

    def __init__(self, matmul):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.matmul = matmul
        self.w1 = torch.nn.Parameter(torch.randn(48, 32, generator=generator) / 8)
        self.b1 = torch.nn.Parameter(torch.randn(48, generator=generator))
        self.scale = torch.nn.Parameter(torch.rand(48, generator=generator) + 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(16, 48, generator=generator) / 8)

    def linear(self, x, weight, bias=None):
        return self.matmul._forward_impl(input=x, weight=weight, bias=bias, allreduce_dgrad=False,
                                         sequence_parallel=False, tp_group=None)

    def forward(self, x):
        return self.linear(torch.tanh(self.linear(x, self.w1, self.b1)) * self.scale, self.w2).square().sum()


def micro_batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(6, 2, 32, generator=generator, requires_grad=True) for _ in range(2)]


def grads(model):
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("kind", MATMULS)
def test_b_then_w_equals_full_backward(kind):
    full, split = TinyModel(MATMULS[kind]), TinyModel(MATMULS[kind])
    full_inputs, split_inputs = micro_batches(), micro_batches()
    for x in full_inputs:
        full(x).backward()
    store = WeightGradStore()
    for mb, x in enumerate(split_inputs):  # two Bs, then their Ws: W runs the oldest B first
        with store.input_grad_only((0, mb)):
            split(x).backward()
    after_b = grads(split)
    assert after_b["w1"] is None and after_b["w2"] is None  # B alone leaves the weights untouched ...
    for name in ("b1", "scale"):  # ... and gives every other parameter its full gradient
        assert torch.equal(after_b[name], full.get_parameter(name).grad), name
    for x, ref in zip(split_inputs, full_inputs):
        assert torch.equal(x.grad, ref.grad)  # dL/dx is all B sends back
    with pytest.raises(RuntimeError, match=r"W\(0, 1\) runs while the oldest deferred B is \(0, 0\)"):
        store.flush((0, 1))
    store.flush((0, 0))
    store.flush((0, 1))
    store.check_empty()
    for name, grad in grads(split).items():
        assert torch.equal(grad, full.get_parameter(name).grad) and not grad.requires_grad, name


def test_high_precision_matches_torch_linear():
    model = TinyModel(MATMULS["high_precision"])
    (x,) = micro_batches()[:1]
    model(x).backward()
    ref = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    x_ref = x.detach().clone().requires_grad_()
    h = torch.tanh(torch.nn.functional.linear(x_ref, ref["w1"], ref["b1"])) * ref["scale"]
    torch.nn.functional.linear(h, ref["w2"]).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name].grad, msg=name)
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_w_accumulates_into_megatron_main_grad():
    """With megatron's DDP the weight-gradient goes where its grad hook puts `param.grad`: into main_grad."""
    full, split = TinyModel(MATMULS["high_precision"]), TinyModel(MATMULS["high_precision"])
    (x,) = micro_batches()[:1]
    full(x.detach().requires_grad_()).backward()
    split.w1.main_grad = torch.ones_like(split.w1)
    store = WeightGradStore()
    with store.input_grad_only("mb"):
        split(x).backward()
    assert torch.equal(split.w1.main_grad, torch.ones_like(split.w1))
    store.flush("mb")
    assert split.w1.grad is None and torch.equal(split.w1.main_grad, 1 + full.w1.grad)
    assert torch.equal(split.w2.grad, full.w2.grad)


def test_unflushed_store_and_nested_b_are_errors():
    store = WeightGradStore()
    with store.input_grad_only((1, 3)):
        with pytest.raises(RuntimeError, match="already deferring"):
            with WeightGradStore().input_grad_only((0, 0)):
                pass
    with pytest.raises(RuntimeError, match=r"B ops \[\(1, 3\)\] never ran"):
        store.check_empty()
    with pytest.raises(RuntimeError, match=r"W\(0, 0\) runs while the oldest deferred B is None"):
        WeightGradStore().flush((0, 0))


@pytest.mark.parametrize("kind", MATMULS)
def test_store_counts_the_bytes_its_closures_hold(kind):
    """After B the store holds, per micro-batch and linear, dL/dy and x (tokens x features each); W frees them.
    The FP8 linears hold x as FP8 xᵀ (1 byte per element) plus one FP32 scale per feature and 128 tokens."""
    model, store = TinyModel(MATMULS[kind]), WeightGradStore()
    tokens, fp32 = 6 * 2, torch.finfo(torch.float32).bits // 8
    x_bytes = {"high_precision": tokens * fp32, "fp8_emulated": tokens + math.ceil(tokens / 128) * fp32}[kind]
    # w2 [16, 48]: dL/dy [tokens, 16] and x [tokens, 48]; w1 [48, 32]: dL/dy [tokens, 48] and x [tokens, 32]
    per_b = tokens * (16 + 48) * fp32 + (48 + 32) * x_bytes
    assert per_b == {"high_precision": 6912, "fp8_emulated": 4352}[kind]
    for mb, x in enumerate(micro_batches()):
        with store.input_grad_only((0, mb)):
            model(x).backward()
        assert store.live_bytes == store.peak_bytes == (mb + 1) * per_b
    store.flush((0, 0))
    assert (store.live_bytes, store.peak_bytes) == (per_b, 2 * per_b)
    store.flush((0, 1))
    assert (store.live_bytes, store.peak_bytes) == (0, 2 * per_b)


def test_a_storage_held_by_several_closures_is_counted_once():
    weight = torch.nn.Parameter(torch.zeros(4, 4))
    shared, own0, own1 = torch.ones(10, 8), torch.ones(3, 5), torch.ones(7)  # 320, 60, 28 bytes
    store = WeightGradStore()
    with store.input_grad_only("b0"):
        # the weight is not declared and so not counted; two views of one storage count it once
        assert weight_grad(weight, lambda: torch.ones(4, 4), holds=(shared, shared.t(), own0)) is None
    assert store.live_bytes == 320 + 60
    with store.input_grad_only("b1"):
        weight_grad(weight, lambda: torch.ones(4, 4), holds=(shared[2:], own1))  # a view: the same storage
    assert store.live_bytes == store.peak_bytes == 320 + 60 + 28
    store.flush("b0")
    assert store.live_bytes == 320 + 28  # b1's closure still holds `shared`
    store.flush("b1")
    assert (store.live_bytes, store.peak_bytes) == (0, 320 + 60 + 28)
    assert torch.equal(weight.grad, torch.full((4, 4), 2.0))
    assert weight_grad(weight, lambda: torch.ones(4, 4), holds=(shared,)) is not None  # no B open: computed now
    assert store.live_bytes == 0
