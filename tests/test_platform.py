"""The CPU shim patches exactly the symbols it lists, fails loudly when one moves, and maps CUDA
calls onto the CPU."""

import importlib

import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_dsv3 import platform


@pytest.mark.parametrize("path", platform.PATCHED_SYMBOLS + platform.TORCH_ADAM_PATCHED_SYMBOLS
                         + platform.MLA_ROPE_PATCHED_SYMBOLS)
def test_patched_symbol_exists(path):
    module_path, _, attr = path.rpartition(".")
    assert hasattr(importlib.import_module(module_path), attr), f"{path} moved: update megatron_dsv3/platform.py"


def test_missing_symbol_fails_loudly():
    with pytest.raises(RuntimeError, match="update megatron_dsv3/platform.py"):
        platform._patch("megatron.core.tensor_parallel.random._no_such_function", None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is only applied without CUDA")
def test_cuda_calls_run_on_cpu():
    assert platform.enable_cpu_execution()
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(1, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu"
    assert torch.ones(1).to("cuda").device.type == "cpu"
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    torch.cuda.synchronize()

    # the RNG tracker forks the CPU generator: draws inside fork() are reproducible and do not
    # disturb the default stream
    tracker = get_cuda_rng_tracker()

    def seeded_draws():
        tracker.reset()
        tracker.add("stream", 7)
        torch.manual_seed(0)
        with tracker.fork("stream"):
            inside = torch.rand(3)
        return inside, torch.rand(3)

    first, after_fork = seeded_draws()
    again, _ = seeded_draws()
    assert torch.equal(first, again)
    torch.manual_seed(0)
    assert torch.equal(after_fork, torch.rand(3))


class CountCalls(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is only applied without CUDA")
def test_suspended_mapping_lifts_only_the_platform_mode():
    assert platform.enable_cpu_execution()
    counter = CountCalls()
    with counter:
        before = torch.overrides._get_current_function_mode_stack()
        with platform.cpu_mapping_suspended():
            assert torch.overrides._get_current_function_mode_stack() == [m for m in before if m is not platform._mode]
            with pytest.raises((AssertionError, RuntimeError)):  # CPU-only torch: no CUDA device
                torch.zeros(1, device="cuda")
            torch.ones(2).add(1)
        assert torch.overrides._get_current_function_mode_stack() == before
    assert counter.calls >= 2  # other modes (a test's counters) still see the calls inside


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is only applied without CUDA")
def test_model_forward_runs_outside_the_platform_mode(monkeypatch):
    from megatron_dsv3.models.gpt_builder import build_model
    from megatron_dsv3.models.presets import get_preset
    from megatron_dsv3.models.transformer_config import build_transformer_config
    from megatron_dsv3.training.initialize import initialize_single_process

    initialize_single_process()
    mapped = []
    mapping = platform._CudaToCpuMode.__torch_function__
    monkeypatch.setattr(platform._CudaToCpuMode, "__torch_function__",
                        lambda self, func, *rest: mapped.append(func) or mapping(self, func, *rest))
    cfg = get_preset("tiny")
    model = build_model(build_transformer_config(cfg), cfg.vocab_size, 8, pre_process=True, post_process=True,
                        pp_rank=0)
    tokens, positions = torch.randint(0, cfg.vocab_size, (2, 8)), torch.arange(8).expand(2, 8)
    mapped.clear()
    per_token_loss = model(tokens, positions, None, labels=tokens)
    assert mapped == []
    per_token_loss.sum().backward()
    assert mapped  # outside the forward the mode maps again: our Python autograd nodes' calls pass through it


@pytest.mark.skipif(platform.have_te_fused_adam(), reason="with TE's FusedAdam megatron-core builds the config itself")
def test_precision_aware_config_without_te_has_megatron_cores_fields(monkeypatch):
    for path in platform.TORCH_ADAM_PATCHED_SYMBOLS:  # restored after the test
        module, attr = platform._resolve(path)
        monkeypatch.setattr(module, attr, getattr(module, attr))
    fields = dict(optimizer="adam", lr=1e-3, use_distributed_optimizer=True)
    precision = dict(use_precision_aware_optimizer=True, main_grads_dtype=torch.float32,
                     main_params_dtype=torch.float32, exp_avg_dtype=torch.bfloat16, exp_avg_sq_dtype=torch.bfloat16)
    config = platform.precision_aware_optimizer_config(precision, **fields)
    assert config.use_precision_aware_optimizer and config.exp_avg_dtype == config.exp_avg_sq_dtype == torch.bfloat16
    assert config.use_precision_aware_optimizer_no_fp8_or_ds_fp8 and not config.store_param_remainders
    import megatron.core.optimizer as mcore_optimizer
    from megatron_dsv3.training.precision_aware_adam import PrecisionAwareAdam

    assert mcore_optimizer.Adam is PrecisionAwareAdam and not mcore_optimizer.USING_PYTORCH_OPTIMIZER
