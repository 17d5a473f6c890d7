"""The CPU shim patches exactly the symbols it lists, fails loudly when one moves, and maps CUDA
calls onto the CPU."""

import importlib

import pytest
import torch

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
