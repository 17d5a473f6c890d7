"""--ema-decay (DeepSeek-V3 §3.2.3): the EMA against the recurrence ema_k = d·ema_{k-1} + (1 − d)·w_k computed
here in float64 from the weight history; a PP2 × EP2 run resumed in the middle against the uninterrupted one
(losses and EMA bit-identical); `convert_checkpoint.py mcore-to-hf --ema` against the checkpoint's EMA."""

import threading

import pytest
import torch
from megatron.core.dist_checkpointing import ShardedTensor

from conftest import hf_tensors_as_stored, read_metrics, torchrun
from megatron_dsv3.conversion.convert import mcore_to_hf
from megatron_dsv3.conversion.verify import compare_logits
from megatron_dsv3.conversion.dist_ckpt_io import DistCheckpointReader
from megatron_dsv3.training import ema as ema_module
from megatron_dsv3.training.ema import EMA_KEY_PREFIX, HostEMA, ema_sharded_state_dict

DECAY = 0.9
MODEL_KEYS = ("embedding.", "decoder.", "mtp.", "output_layer.")


def reference_ema(history, decay):
    """float64 recurrence from the initial weights history[0]."""
    ema = history[0].double()
    for weights in history[1:]:
        ema = decay * ema + (1 - decay) * weights.double()
    return ema


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_bytes", [ema_module.WIDEN_GROUP_BYTES, 64])
def test_ema_follows_the_recurrence_while_the_weights_change_under_the_background_update(dtype, group_bytes,
                                                                                        monkeypatch):
    monkeypatch.setattr(ema_module, "WIDEN_GROUP_BYTES", group_bytes)  # 64: each tensor widened alone
    generator = torch.Generator().manual_seed(0)
    shapes = {"a": (5, 3), "b": (7,)}
    history = {n: [torch.randn(s, generator=generator).to(dtype) for _ in range(21)] for n, s in shapes.items()}
    params = {n: torch.nn.Parameter(h[0].clone()) for n, h in history.items()}
    ema = HostEMA(params.items(), DECAY)
    assert len(ema._groups) == (1 if group_bytes > 64 else 2)
    for step in range(1, 21):
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(history[name][step])
        ema.update()
        assert any(t.name.startswith("ema") for t in threading.enumerate())  # the update runs in its own thread
        with torch.no_grad():  # the next step rewrites the weights while the update may still run
            for p in params.values():
                p.fill_(float("nan"))
    state = ema.state_dict()
    for name, tensor in state.items():
        assert tensor.device.type == "cpu" and tensor.dtype == torch.float32
        assert tensor.data_ptr() != params[name].data_ptr()
        torch.testing.assert_close(tensor.double(), reference_ema(history[name], DECAY), rtol=1e-6, atol=1e-6)
        assert not torch.equal(tensor, history[name][-1].float())
    ema.close()


def test_load_state_dict_replaces_the_average_and_rejects_other_parameters():
    ema = HostEMA([("w", torch.nn.Parameter(torch.zeros(3)))], DECAY)
    ema.load_state_dict({"w": torch.arange(3.0)})
    assert torch.equal(ema.state_dict()["w"], torch.arange(3.0))
    with pytest.raises(ValueError, match="does not match"):
        ema.load_state_dict({"v": torch.zeros(3)})
    ema.close()


def test_checkpoint_entry_is_the_weight_entry_with_the_ema_key_and_fp32_data():
    weight = torch.nn.Parameter(torch.randn(4, 6).bfloat16())
    ema = HostEMA([("0/decoder.w", weight)], DECAY)
    entry = ShardedTensor.from_rank_offsets("decoder.w", weight.detach(), (0, 1, 2), replica_id=1)
    state = ema_sharded_state_dict(ema, {0: {"decoder.w": entry}})
    saved = state["0/decoder.w"]
    assert saved.key == EMA_KEY_PREFIX + "decoder.w" and saved.dtype == saved.data.dtype == torch.float32
    assert (saved.global_shape, saved.global_offset, saved.replica_id) == ((8, 6), (4, 0), 1)
    with pytest.raises(RuntimeError, match="without a checkpoint entry"):
        ema_sharded_state_dict(ema, {0: {}})
    ema.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_ema_of_gpu_parameters_holds_no_accelerator_memory():
    params = [("w", torch.nn.Parameter(torch.randn(1024, 1024, device="cuda")))]
    before = torch.cuda.memory_allocated()
    ema = HostEMA(params, DECAY)
    ema.update()
    state = ema.state_dict()
    assert torch.cuda.memory_allocated() == before and state["w"].device.type == "cpu"
    ema.close()


# ---------------------------------------------------------------- training runs (4 CPU ranks)

TRAIN = ["--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--train-iters", "4",
         "--ema-decay", str(DECAY), "--eval-interval", "2", "--eval-iters", "1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """4 iterations saved after each; then iterations 3-4 again from the checkpoint of iteration 2."""
    root = tmp_path_factory.mktemp("ema")
    torchrun(4, "pretrain_dsv3.py", *TRAIN, "--save", root / "full", "--save-interval", "1",
             "--metrics-jsonl", root / "full.jsonl")
    torchrun(4, "pretrain_dsv3.py", *TRAIN, "--load", root / "full" / "iter_0000002", "--save", root / "resumed",
             "--metrics-jsonl", root / "resumed.jsonl")
    return root


def checkpoint_tensors(path, prefix):
    reader = DistCheckpointReader(path)
    keys = [k for k in reader.tensors if k.startswith(prefix)]
    return {k[len(EMA_KEY_PREFIX):] if prefix == EMA_KEY_PREFIX else k: t for k, t in reader.read(keys).items()}


def test_resumed_run_has_the_uninterrupted_losses_and_ema(runs):
    full, resumed = ([r for r in read_metrics(runs / f"{name}.jsonl") if "split" not in r]
                     for name in ("full", "resumed"))
    assert [r["iteration"] for r in full] == [1, 2, 3, 4] and [r["iteration"] for r in resumed] == [3, 4]
    assert [r["lm_loss"] for r in resumed] == [r["lm_loss"] for r in full[2:]]
    want = checkpoint_tensors(runs / "full" / "iter_0000004", EMA_KEY_PREFIX)
    got = checkpoint_tensors(runs / "resumed" / "iter_0000004", EMA_KEY_PREFIX)
    assert set(got) == set(want) and len(want) > 50
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_evaluations_report_the_ema_beside_the_live_weights(runs):
    """Every evaluation also runs with the EMA swapped in (the same samples): at iteration 2 and 4, equal in the
    resumed run (the EMA came back from the checkpoint), and the live weights are back afterwards (the
    resumed losses above equal the uninterrupted ones)."""
    def evals(name):
        rows = read_metrics(runs / f"{name}.jsonl")
        return {(r["split"], r["iteration"]): r["lm_loss"] for r in rows if "split" in r}

    full, resumed = evals("full"), evals("resumed")
    assert {("validation", 2), ("validation-ema", 2), ("validation", 4), ("validation-ema", 4)} <= set(full)
    assert full[("validation-ema", 4)] != full[("validation", 4)]  # the average of the weights, not the weights
    assert resumed[("validation-ema", 4)] == full[("validation-ema", 4)]
    assert resumed[("validation", 4)] == full[("validation", 4)]


def test_checkpointed_ema_follows_the_recurrence_over_the_saved_weights(runs):
    """ema_4 = d·ema_3 + (1 − d)·w_4 for every parameter of every rank; every parameter has an EMA, the router's
    expert bias (a buffer) has none."""
    ema3 = checkpoint_tensors(runs / "full" / "iter_0000003", EMA_KEY_PREFIX)
    ema4 = checkpoint_tensors(runs / "full" / "iter_0000004", EMA_KEY_PREFIX)
    weights4 = checkpoint_tensors(runs / "full" / "iter_0000004", MODEL_KEYS)
    assert {k for k in weights4 if k not in ema4} == {k for k in weights4 if k.endswith("router.expert_bias")}
    for key, ema in ema4.items():
        assert ema.dtype == torch.float32
        want = DECAY * ema3[key].double() + (1 - DECAY) * weights4[key].double()
        torch.testing.assert_close(ema.double(), want, rtol=1e-6, atol=1e-7, msg=key)
        assert not torch.equal(ema, weights4[key]), key


# ---------------------------------------------------------------- mcore-to-hf --ema


@pytest.fixture(scope="module")
def exported(runs):
    out = runs / "hf"
    mcore_to_hf(runs / "full", out / "ema4", ema=True, progress=False)
    mcore_to_hf(runs / "full", out / "ema3", iteration=3, ema=True, progress=False)
    mcore_to_hf(runs / "full", out / "live4", progress=False)
    return {name: hf_tensors_as_stored(out / name) for name in ("ema3", "ema4", "live4")}


def test_export_with_ema_writes_the_checkpoints_ema(runs, exported):
    ema = checkpoint_tensors(runs / "full" / "iter_0000004", EMA_KEY_PREFIX)
    live = checkpoint_tensors(runs / "full" / "iter_0000004", MODEL_KEYS)
    one_to_one = {"model.embed_tokens.weight": "embedding.word_embeddings.weight",
                  "model.norm.weight": "decoder.final_layernorm.weight", "lm_head.weight": "output_layer.weight",
                  "model.layers.0.input_layernorm.weight": "decoder.layers.0.input_layernorm.weight",
                  "model.layers.1.mlp.gate.weight": "decoder.layers.1.mlp.router.weight",
                  "model.layers.1.mlp.gate.e_score_correction_bias": "decoder.layers.1.mlp.router.expert_bias"}
    for hf, megatron in one_to_one.items():
        assert torch.equal(exported["ema4"][hf], ema.get(megatron, live[megatron])), hf
        assert torch.equal(exported["live4"][hf], live[megatron]), hf


def test_every_exported_tensor_is_the_ema_and_only_the_expert_bias_is_live(exported):
    """HF(ema_4) = d·HF(ema_3) + (1 − d)·HF(w_4) tensor by tensor: the export only moves and splits entries."""
    ema3, ema4, live4 = exported["ema3"], exported["ema4"], exported["live4"]
    assert set(ema4) == set(live4) == set(ema3)
    for name, tensor in ema4.items():
        if name.endswith("e_score_correction_bias"):
            assert torch.equal(tensor, live4[name]), name
            continue
        assert not torch.equal(tensor, live4[name]), name
        want = DECAY * ema3[name].double() + (1 - DECAY) * live4[name].double()
        torch.testing.assert_close(tensor.double(), want, rtol=1e-6, atol=1e-7, msg=name)


def test_verify_compares_the_ema_export_with_the_checkpoints_ema(runs, exported):
    """transformers loads the EMA export; its logits are the Megatron model's with the EMA loaded, not the live."""
    ema_diff, _ = compare_logits(runs / "hf" / "ema4", runs / "full", ema=True)
    live_diff, _ = compare_logits(runs / "hf" / "ema4", runs / "full")
    assert ema_diff < 1e-4 < live_diff, (ema_diff, live_diff)
