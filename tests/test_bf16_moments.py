"""BF16 Adam moments with FP32 master weights (DeepSeek-V3 §3.3.3; issue 13 item 2).

Unit: PrecisionAwareAdam's step is torch.optim.AdamW's FP32 step with the moments rounded to BF16 after each step
(bit for bit), and with FP32 moments it is torch's AdamW/Adam. Trainer (2 CPU ranks, distributed optimizer): the
moments are BF16 in memory and in the checkpoint, take half the bytes of FP32 moments, and a resume from a
checkpoint in the middle gives the uninterrupted run's losses bit for bit.
"""

import json

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from conftest import read_metrics, torchrun
from megatron_dsv3.training.precision_aware_adam import PrecisionAwareAdam

HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
BF16_MOMENTS = ["--use-distributed-optimizer", "--use-precision-aware-optimizer", "--exp-avg-dtype", "bf16",
                "--exp-avg-sq-dtype", "bf16", "--main-params-dtype", "fp32"]
RUN = ["--train-iters", "5", "--global-batch-size", "4", "--micro-batch-size", "2", "--lr", "3e-3"]


def _grads(steps, shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) * 10 ** torch.empty(()).uniform_(-3, 0, generator=generator)
            for _ in range(steps)]


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_bf16_moments_are_fp32_adamw_rounded_to_bf16_after_each_step(param_dtype):
    """Reference: torch.optim.AdamW on an FP32 copy, its moments rounded to BF16 (nearest even) after every step.
    A BF16 parameter (GPU --bf16) is updated through its FP32 master weight; gradients come as .decoupled_grad."""
    start = torch.randn(257, generator=torch.Generator().manual_seed(1))
    param = torch.nn.Parameter(start.to(param_dtype))
    ours = PrecisionAwareAdam([param], **HYPER, master_weights=True, exp_avg_dtype=torch.bfloat16,
                              exp_avg_sq_dtype=torch.bfloat16, use_decoupled_grad=True)
    reference_param = torch.nn.Parameter(start.to(param_dtype).float())
    reference = torch.optim.AdamW([reference_param], **HYPER, foreach=False)
    for grad in _grads(6, start.shape):
        param.decoupled_grad = grad.to(param_dtype)
        ours.step()
        reference_param.grad = grad.to(param_dtype).float()
        reference.step()
        for name in ("exp_avg", "exp_avg_sq"):
            moment = reference.state[reference_param][name]
            moment.copy_(moment.bfloat16())
        state = ours.state[param]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
        assert state["master_param"].dtype == torch.float32
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[name].float(), reference.state[reference_param][name])
        assert torch.equal(state["master_param"], reference_param.detach())
        assert torch.equal(param.detach(), reference_param.detach().to(param_dtype))


@pytest.mark.parametrize("adam_w_mode, torch_adam", [(True, torch.optim.AdamW), (False, torch.optim.Adam)])
def test_fp32_moments_are_torch_adam(adam_w_mode, torch_adam):
    start = torch.randn(64, 33, generator=torch.Generator().manual_seed(2))
    param, reference_param = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours = PrecisionAwareAdam([param], **HYPER, adam_w_mode=adam_w_mode)
    reference = torch_adam([reference_param], **HYPER)
    for grad in _grads(5, start.shape, seed=3):
        param.grad, reference_param.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
    assert ours.state[param]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(param.detach(), reference_param.detach(), rtol=1e-6, atol=1e-7)
    for name in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(ours.state[param][name], reference.state[reference_param][name],
                                   rtol=1e-6, atol=1e-12)


def test_state_dict_round_trip_keeps_bf16_moments_and_continues_identically():
    grads = _grads(4, (50,), seed=4)
    start = torch.randn(50, generator=torch.Generator().manual_seed(5))

    def make():
        param = torch.nn.Parameter(start.clone())
        return param, PrecisionAwareAdam([param], **HYPER, master_weights=True, exp_avg_dtype=torch.bfloat16,
                                         exp_avg_sq_dtype=torch.bfloat16)

    def train(param, optimizer, steps):
        for grad in steps:
            param.grad = grad.clone()
            optimizer.step()

    full_param, full = make()
    train(full_param, full, grads)
    param, optimizer = make()
    train(param, optimizer, grads[:2])
    resumed_param, resumed = make()
    resumed.load_state_dict(optimizer.state_dict())
    state = resumed.state[resumed_param]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
    assert state["master_param"] is resumed_param  # an FP32 parameter is its own master weight, restored by the load
    train(resumed_param, resumed, grads[2:])
    assert torch.equal(resumed_param.detach(), full_param.detach())
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(resumed.state[resumed_param][name], full.state[full_param][name])


# ---------------------------------------------------------------- the trainer, 2 CPU ranks, distributed optimizer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16_moments")
    torchrun(2, "tests/scripts/optimizer_state.py", root / "bf16", *RUN, *BF16_MOMENTS, "--save", root / "ckpt",
             "--save-interval", "2", "--metrics-jsonl", root / "full.jsonl")
    torchrun(2, "pretrain_dsv3.py", *RUN, *BF16_MOMENTS, "--load", root / "ckpt" / "iter_0000002",
             "--metrics-jsonl", root / "resumed.jsonl")
    torchrun(2, "tests/scripts/optimizer_state.py", root / "fp32", *RUN, "--train-iters", "1",
             "--use-distributed-optimizer")
    state = {kind: [json.loads((root / f"{kind}.rank{rank}.json").read_text()) for rank in (0, 1)]
             for kind in ("bf16", "fp32")}
    return root, state


def test_moments_are_bf16_in_memory_and_take_half_the_bytes_of_fp32_moments(runs):
    _, state = runs
    for rank in (0, 1):
        bf16, fp32 = state["bf16"][rank], state["fp32"][rank]
        for name in ("exp_avg", "exp_avg_sq"):
            assert bf16[name]["dtypes"] == ["torch.bfloat16"] and fp32[name]["dtypes"] == ["torch.float32"]
            assert bf16[name]["bytes"] > 0 and 2 * bf16[name]["bytes"] == fp32[name]["bytes"], (rank, name)
        assert bf16["master_param"]["dtypes"] == ["torch.float32"]


def test_checkpoint_stores_the_moments_in_bf16(runs):
    root, _ = runs
    metadata = FileSystemReader(str(root / "ckpt" / "iter_0000002")).read_metadata().state_dict_metadata
    dtypes = {key.rsplit(".", 1)[1]: meta.properties.dtype for key, meta in metadata.items()
              if key.startswith("optimizer.") and hasattr(meta, "properties")}
    assert dtypes == {"exp_avg": torch.bfloat16, "exp_avg_sq": torch.bfloat16, "param": torch.float32}


def test_resume_from_the_middle_gives_the_uninterrupted_losses_bit_for_bit(runs):
    root, _ = runs
    full, resumed = read_metrics(root / "full.jsonl"), read_metrics(root / "resumed.jsonl")
    assert [r["iteration"] for r in full] == [1, 2, 3, 4, 5] and [r["iteration"] for r in resumed] == [3, 4, 5]
    # iteration 3's loss comes from the restored weights; 4 and 5 also from the restored moments and step count
    for key in ("lm_loss", "mtp_loss", "grad_norm"):
        assert [r[key] for r in resumed] == [r[key] for r in full[2:]], key
