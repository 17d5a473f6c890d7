"""Bad inputs and damaged files, table-driven: each stops with exit code ≠ 0 and one line starting
"error:" that names the flag or file, and leaves every checkpoint, marker and data file byte-identical.

Flags are checked by parse_args, files by check_files_before_model (both in process, as rank 0 runs them
before the model is built), the tools through their main(); one trained checkpoint and one tokenized
dataset are shared by the module.
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from megatron_dsv3 import platform
from megatron_dsv3.checkpointing.save_lock import LOCK_FILE
from megatron_dsv3.training import input_checks
from megatron_dsv3.training.arguments import parse_args
from megatron_dsv3.training.input_checks import check_files_before_model

sys.path.insert(0, os.path.join(REPO, "tools"))
import preprocess_data  # noqa: E402


def file_hashes(root) -> dict:
    out = {}
    for base, _, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    with socket.socket() as sock:  # a port of its own: other launches may hold MASTER_PORT's default
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1", "MASTER_PORT": port}
    env.pop("RANK", None)
    result = subprocess.run([sys.executable, os.path.join(REPO, "pretrain_dsv3.py"), "--train-iters", "2",
                             "--save", str(root / "ckpt"), "--save-interval", "1"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    _write_jsonl(root / "corpus.jsonl", [{"text": " ".join(str(i) for i in range(j, j + 40))} for j in range(0, 200, 5)])
    preprocess_data.main(["--input", str(root / "corpus.jsonl"), "--tokenizer-type", "NullTokenizer",
                          "--vocab-size", "256", "--output-prefix", str(root / "data" / "c")])
    return root


def expect_one_line_error(capsys, call, *needles):
    with pytest.raises(SystemExit) as info:
        call()
    code = info.value.code
    message = getattr(info.value, "message", None) or (code if isinstance(code, str) else "")
    err = capsys.readouterr().err
    assert code not in (0, None), message
    lines = [line for line in (message + "\n" + err).splitlines() if line.startswith("error:")]
    assert len(set(lines)) == 1 and "\n" not in message and "Traceback" not in err, (message, err)
    for needle in needles:
        assert needle in message, message
    return message


# ---------------------------------------------------------------- flags (before torch.distributed)

FLAG_CASES = [
    (["--lr", "0"], ["--lr"]), (["--lr", "-1"], ["--lr"]), (["--lr", "nan"], ["--lr"]), (["--lr", "inf"], ["--lr"]),
    (["--min-lr", "-1"], ["--min-lr"]), (["--adam-eps", "nan"], ["--adam-eps"]),
    (["--adam-beta1", "1.0"], ["--adam-beta1"]), (["--adam-beta2", "-0.1"], ["--adam-beta2"]),
    (["--weight-decay", "-1"], ["--weight-decay"]), (["--clip-grad", "nan"], ["--clip-grad"]),
    (["--micro-batch-size", "0"], ["--micro-batch-size"]), (["--global-batch-size", "0"], ["--global-batch-size"]),
    (["--seq-length", "0"], ["--seq-length"]), (["--train-iters", "0"], ["--train-iters"]),
    (["--log-interval", "0"], ["--log-interval"]), (["--save", "x", "--save-interval", "0"], ["--save-interval"]),
    (["--exit-interval", "0"], ["--exit-interval"]), (["--lr-decay-iters", "0"], ["--lr-decay-iters"]),
    (["--lr-warmup-iters", "-1"], ["--lr-warmup-iters"]),
    (["--max-skipped-nonfinite-steps", "-1"], ["--max-skipped-nonfinite-steps"]),
    (["--num-layers", "0"], ["--num-layers"]), (["--hidden-size", "0"], ["--hidden-size"]),
    (["--vocab-size", "0"], ["--vocab-size"]), (["--num-experts", "0"], ["--num-experts"]),
    (["--moe-layer-freq", "0"], ["--moe-layer-freq"]), (["--moe-layer-freq", "[0,1]"], ["--moe-layer-freq"]),
    (["--moe-router-topk", "0"], ["--moe-router-topk"]), (["--finetune"], ["--finetune", "--load"]),
    (["--allow-partial-load"], ["--allow-partial-load"]),
    (["--save-lock-stale-seconds", "0"], ["--save-lock-stale-seconds"]),
    (["--pipeline-model-parallel-size", "0"], ["--pipeline-model-parallel-size"]),
    (["--expert-model-parallel-size", "0"], ["--expert-model-parallel-size"]),
    (["--tensor-model-parallel-size", "0"], ["--tensor-model-parallel-size"]),
    (["--mock-data", "--data-path", "x"], ["--mock-data"]),
    (["--tokenizer-type", "HuggingFaceTokenizer"], ["--tokenizer-model"]),
    (["--seq-length", "100000"], ["--seq-length"]), (["--min-lr", "1", "--lr", "0.1"], ["--min-lr"]),
    (["--save-interval", "2"], ["--save"]),
    (["--ema-decay", "0"], ["--ema-decay"]), (["--ema-decay", "1.0"], ["--ema-decay"]),
    (["--ema-decay", "nan"], ["--ema-decay"]),
    (["--no-such-flag"], ["--no-such-flag", "--help"]), (["--lr", "abc"], ["--lr", "abc"]),
    (["--pipeline-schedule", "gpipe"], ["--pipeline-schedule", "gpipe"]),
    (["--fim-rate", "1.5"], ["--fim-rate", "[0, 1]"]), (["--fim-spm-rate", "-0.1"], ["--fim-spm-rate", "[0, 1]"]),
    (["--fim-split-sample", "x"], ["--fim-split-sample", "--fim-fragment-rate"]),
    (["--fim-data"], ["--fim-data", "--data-path"]),
    (["--fim-data", "--data-path", "x"], ["--fim-data", "NullTokenizer", "<|fim_begin|>"]),
    (["--rampup-batch-size", "2", "4", "64"], ["--rampup-batch-size 2 4 64", "INCREMENT 4 does not divide"]),
    (["--rampup-batch-size", "3", "5", "64"], ["--rampup-batch-size 3 5 64", "--micro-batch-size 2"]),
    (["--rampup-batch-size", "2", "2", "0"], ["--rampup-batch-size 2 2 0", "SAMPLES 0"]),
    (["--rampup-batch-size", "2", "2", "-8"], ["--rampup-batch-size 2 2 -8", "SAMPLES -8"]),
    (["--rampup-batch-size", "8", "2", "64"], ["--rampup-batch-size 8 2 64", "--global-batch-size 8"]),
    (["--rampup-batch-size", "0", "2", "64"], ["--rampup-batch-size 0 2 64", "START and INCREMENT"]),
    (["--mtp-loss-scaling-factor-phases", "10T"], ["--mtp-loss-scaling-factor-phases", "TOKENS:VALUE"]),
    (["--mtp-loss-scaling-factor-phases", "1x:0.1"], ["--mtp-loss-scaling-factor-phases", "'1x:0.1'"]),
    (["--mtp-loss-scaling-factor-phases", "1.5:0.1"], ["--mtp-loss-scaling-factor-phases", "'1.5:0.1'"]),
    (["--mtp-loss-scaling-factor-phases", "2K:0.1", "2K:0.2"], ["--mtp-loss-scaling-factor-phases", "increase"]),
    (["--moe-router-bias-update-rate-phases", "2K:0", "1K:0"], ["--moe-router-bias-update-rate-phases", "increase"]),
    (["--moe-router-bias-update-rate-phases", "1K:-1"], ["--moe-router-bias-update-rate-phases", "VALUE ≥ 0"]),
    (["--moe-router-bias-update-rate-phases", "0:0"], ["--moe-router-bias-update-rate-phases", "TOKENS ≥ 1"]),
    (["--mtp-num-layers", "none", "--mtp-loss-scaling-factor-phases", "1K:0.1"],
     ["--mtp-loss-scaling-factor-phases", "--mtp-num-layers"]),
    (["--use-precision-aware-optimizer", "--exp-avg-dtype", "bf16", "--exp-avg-sq-dtype", "bf16"],
     ["--use-precision-aware-optimizer needs --use-distributed-optimizer"]),
    (["--use-distributed-optimizer", "--exp-avg-dtype", "bf16"],
     ["--exp-avg-dtype bf16 needs --use-precision-aware-optimizer"]),
    (["--use-distributed-optimizer", "--main-params-dtype", "fp16"],
     ["--main-params-dtype fp16 needs --use-precision-aware-optimizer"]),
    (["--use-distributed-optimizer", "--use-precision-aware-optimizer", "--exp-avg-sq-dtype", "fp64"],
     ["--exp-avg-sq-dtype", "'fp64'"]),
    (["--use-distributed-optimizer", "--use-precision-aware-optimizer", "--main-grads-dtype", "bf16"],
     ["--main-grads-dtype bf16", "--main-grads-dtype fp32"]),
    *([(["--use-distributed-optimizer", "--use-precision-aware-optimizer", "--exp-avg-dtype", "fp8"],
        ["--exp-avg-dtype fp8", "Transformer Engine", "bf16"])] if not platform.have_te_fused_adam() else []),
    (["--no-fp8-activation-storage"], ["--no-fp8-activation-storage", "--fp8-format e4m3 --fp8-emulation"]),
    (["--no-share-mtp-embedding"], ["--no-share-mtp-embedding", "dualpipe"]),
    (["--no-deallocate-pipeline-outputs"], ["--no-deallocate-pipeline-outputs", "--pipeline-model-parallel-size"]),
]


@pytest.mark.parametrize("argv, needles", FLAG_CASES, ids=[" ".join(a) for a, _ in FLAG_CASES])
def test_bad_flag(argv, needles, capsys, world):
    before = file_hashes(world)
    expect_one_line_error(capsys, lambda: parse_args(argv, world_size=1), *needles)
    assert file_hashes(world) == before


# ---------------------------------------------------------------- files, checkpoints, save directory


def _copy_ckpt(world, tmp):
    shutil.copytree(world / "ckpt", tmp / "ckpt")
    return tmp / "ckpt"


def _damage(rel, how):
    def setup(world, tmp):
        ckpt = _copy_ckpt(world, tmp)
        path = ckpt / rel
        if how == "remove":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        elif how == "truncate":
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            path.write_bytes(how)
        return ["--load", str(ckpt)]
    return setup


def _load_iter(rel, how):
    def setup(world, tmp):
        argv = _damage(rel, how)(world, tmp)
        return ["--load", argv[1] + "/iter_0000002"]
    return setup


def _data(mutate=None, prefix_only=False):
    def setup(world, tmp):
        shutil.copytree(world / "data", tmp / "data")
        prefix = tmp / "data" / "c_text_document"
        if mutate:
            mutate(prefix)
        return ["--data-path", str(prefix)]
    return setup


def _bytes(suffix, transform):
    def mutate(prefix):
        path = prefix.with_name(prefix.name + suffix)
        path.write_bytes(transform(path.read_bytes()))
    return mutate


def _fim_tokenizer(tokens, *flags):
    def setup(world, tmp):
        from tokenizers import Tokenizer, models

        vocab = {token: i for i, token in enumerate(["<|endoftext|>", "a", *tokens])}
        Tokenizer(models.WordLevel(vocab, unk_token="a")).save(str(tmp / "tok.json"))
        return ["--fim-data", "--data-path", str(world / "data" / "c_text_document"), *flags,
                "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tmp / "tok.json")]
    return setup


def _lock_held(world, tmp):
    save = tmp / "save"
    save.mkdir()
    import socket
    import time
    (save / LOCK_FILE).write_text(json.dumps({"job_id": "4242", "host": socket.gethostname(), "pid": os.getpid(),
                                              "token": "other", "heartbeat": time.time()}))
    return ["--save", str(save)]


def _no_space(world, tmp, monkeypatch):
    monkeypatch.setattr(input_checks.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1024))
    return ["--save", str(tmp / "save")]


def _marker_only(world, tmp):
    (tmp / "empty").mkdir()
    (tmp / "empty" / "latest_checkpointed_iteration.txt").write_text("x")
    return ["--load", str(tmp / "empty")]


def _file(name):
    def setup(world, tmp):
        (tmp / name).write_text("not a directory")
        return (["--load", str(tmp / name)] if name == "loadfile" else ["--save", str(tmp / name / "sub")])
    return setup


FILE_CASES = {
    "marker missing": (_damage("latest_checkpointed_iteration.txt", "remove"), ["latest_checkpointed_iteration.txt", "iter_0000002"]),
    "marker corrupt": (_damage("latest_checkpointed_iteration.txt", b"abc"), ["corrupt", "--load", "iter_0000002"]),
    "marker names a missing iteration": (_damage("latest_checkpointed_iteration.txt", b"7"), ["iteration 7", "iter_0000002"]),
    "marker names an incomplete iteration": (_damage("iter_0000002/.metadata", "remove"), ["iteration 2", "iter_0000001"]),
    "marker corrupt, no checkpoint": (_marker_only, ["corrupt", "remove"]),
    "iter_N without .metadata": (_load_iter("iter_0000002/.metadata", "remove"), ["iter_0000002", ".metadata"]),
    "iter_N without common.pt": (_load_iter("iter_0000002/common.pt", "remove"), ["common.pt"]),
    "iter_N without metadata.json": (_load_iter("iter_0000002/metadata.json", "remove"), ["metadata.json"]),
    "shard missing": (_damage("iter_0000002/__0_1.distcp", "remove"), ["__0_1.distcp", "missing", "iter_0000002"]),
    "shard truncated": (_damage("iter_0000002/__0_0.distcp", "truncate"), ["__0_0.distcp", "truncated"]),
    "common.pt corrupt": (_damage("iter_0000002/common.pt", b"garbage"), ["common.pt", "iter_0000002"]),
    ".metadata corrupt": (_damage("iter_0000002/.metadata", b"garbage"), [".metadata", "iter_0000002"]),
    "fewer layers": (lambda w, t: ["--load", str(w / "ckpt"), "--num-layers", "2", "--moe-layer-freq", "[0,1]"], ["num_layers: 4 → 2", "--allow-partial-load"]),
    "other router top-k": (lambda w, t: ["--load", str(w / "ckpt"), "--moe-router-topk", "3"], ["moe_router_topk: 4 → 3"]),
    "MTP dropped": (lambda w, t: ["--load", str(w / "ckpt"), "--mtp-num-layers", "none"], ["mtp_num_layers: 1 → None"]),
    "--load is a file": (_file("loadfile"), ["--load", "loadfile"]),
    "--save under a file": (_file("savefile"), ["--save", "savefile"]),
    "--save out of space": (_no_space, ["--save", "GiB free"]),
    "--save holds a newer checkpoint (from scratch)": (lambda w, t: ["--save", str(_copy_ckpt(w, t))], ["iter_0000002", "iteration 0"]),
    "--save holds a newer checkpoint (--load iter_1)": (lambda w, t: ["--load", str(w / "ckpt" / "iter_0000001"), "--save", str(_copy_ckpt(w, t))], ["iter_0000002", "iteration 1"]),
    "--save locked by another job": (_lock_held, ["in use by job 4242", "pid"]),
    "--data-path missing": (lambda w, t: ["--data-path", str(t / "nothing")], ["--data-path", "nothing"]),
    "--data-path bad weights": (lambda w, t: ["--data-path", "-1", str(w / "data" / "c_text_document")], ["--data-path", "weights"]),
    "--data-path .idx bad magic": (_data(_bytes(".idx", lambda b: b"XXXXXXXXX" + b[9:])), [".idx", "bad header"]),
    "--data-path .idx truncated": (_data(_bytes(".idx", lambda b: b[:-5])), [".idx", "truncated"]),
    "--data-path .bin truncated": (_data(_bytes(".bin", lambda b: b[:-4])), [".bin", "bytes"]),
    "--data-path ids beyond --vocab-size": (lambda w, t: _data()(w, t) + ["--vocab-size", "128"], ["token id", "vocabulary size 128"]),
    "--fim-data, tokenizer without FIM tokens": (_fim_tokenizer(["<|fim_hole|>"]), ["--fim-data", "<|fim_begin|>"]),
    "--fim-split-sample not a token": (_fim_tokenizer(["<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>"],
                                                      "--fim-split-sample", "<sep>", "--fim-fragment-rate", "0.5"),
                                       ["--fim-split-sample", "<sep>"]),
    "--tokenizer-model missing": (lambda w, t: ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(t / "tok.json")], ["--tokenizer-model", "tok.json"]),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_bad_file(case, world, tmp_path, capsys, monkeypatch):
    setup, needles = FILE_CASES[case]
    argv = setup(world, tmp_path, monkeypatch) if setup is _no_space else setup(world, tmp_path)
    before, before_tmp = file_hashes(world), file_hashes(tmp_path)
    args = parse_args(argv, world_size=1)
    expect_one_line_error(capsys, lambda: check_files_before_model(args), *needles)
    assert file_hashes(world) == before and file_hashes(tmp_path) == before_tmp


def test_good_inputs_pass_the_checks(world, tmp_path):
    """The same checks accept the shared checkpoint and data (and take, then release, the save lock)."""
    args = parse_args(["--load", str(world / "ckpt"), "--save", str(tmp_path / "s"),
                       "--data-path", str(world / "data" / "c_text_document")], world_size=1)
    plan = check_files_before_model(args)
    assert plan["iteration"] == 2 and (tmp_path / "s" / LOCK_FILE).exists()
    args.save_lock.release()
    assert not (tmp_path / "s" / LOCK_FILE).exists()


# ---------------------------------------------------------------- tools/preprocess_data.py

PREPROCESS_CASES = {
    "id beyond the vocabulary": ([{"text": "1 2 3"}, {"text": "4 70000 5"}], ["corpus.jsonl:2", "70000"]),
    "negative id": ([{"text": "1 -3"}], ["corpus.jsonl:1", "-3"]),
    "word that is no id": ([{"text": "1 two"}], ["corpus.jsonl:1", "two"]),
    "non-string value": ([{"text": "1"}, {"text": 17}], ["corpus.jsonl:2", "int"]),
    "null value": ([{"text": None}], ["corpus.jsonl:1", "NoneType"]),
    "JSON list, not object": ([[1, 2]], ["corpus.jsonl:1", "list"]),
    "invalid JSON": (["{oops"], ["corpus.jsonl:1", "JSON"]),
    "missing key": ([{"body": "1"}], ["corpus.jsonl:1", "'text'"]),
    "empty input": ([], ["--input", "no documents"]),
    "blank input": (["   "], ["--input", "no documents"]),
}


@pytest.mark.parametrize("case", sorted(PREPROCESS_CASES))
def test_bad_corpus(case, tmp_path, capsys):
    rows, needles = PREPROCESS_CASES[case]
    _write_jsonl(tmp_path / "corpus.jsonl", rows)
    out = tmp_path / "out"
    out.mkdir()
    (out / "c_text_document.bin").write_bytes(b"earlier output")  # a failed run must not replace it
    before = file_hashes(tmp_path)
    expect_one_line_error(capsys, lambda: preprocess_data.main(
        ["--input", str(tmp_path / "corpus.jsonl"), "--tokenizer-type", "NullTokenizer", "--vocab-size", "256",
         "--output-prefix", str(out / "c")]), *needles)
    assert file_hashes(tmp_path) == before


# ---------------------------------------------------------------- tools/convert_checkpoint.py


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    from test_conversion_core import V3_STYLE, _add_mtp_layer, _save_hf

    path = _save_hf(V3_STYLE, tmp_path_factory.mktemp("hf") / "hf")
    _add_mtp_layer(path)
    return path


def _convert(argv):
    import convert_checkpoint

    code = convert_checkpoint.main(argv + ["--no-progress"])
    if code:
        raise SystemExit(code)


def test_convert_output_is_a_file(hf_checkpoint, world, tmp_path, capsys):
    (tmp_path / "out").write_text("x")
    before = file_hashes(tmp_path)
    for argv in (["hf-to-mcore", "--hf-dir", str(hf_checkpoint)], ["mcore-to-hf", "--load", str(world / "ckpt")]):
        with pytest.raises(SystemExit):
            _convert(argv + ["--output", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "--output" in err and "is a file" in err, err
    assert file_hashes(tmp_path) == before


def test_convert_ema_of_a_checkpoint_without_ema(world, tmp_path, capsys):
    before = file_hashes(world)
    with pytest.raises(SystemExit):
        _convert(["mcore-to-hf", "--load", str(world / "ckpt"), "--output", str(tmp_path / "out"), "--ema"])
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds no EMA" in err and "drop --ema" in err, err
    assert file_hashes(world) == before and not (tmp_path / "out").exists()


def test_convert_wrong_fp8_scale_shape_names_tensor_and_shard(hf_checkpoint, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from test_conversion_core import _make_fp8_checkpoint

    _make_fp8_checkpoint(hf_checkpoint, tmp_path / "fp8")
    name = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"
    shard = tmp_path / "fp8" / "model.safetensors"
    tensors = load_file(shard)
    tensors[name] = torch.ones(7, 7)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(SystemExit):
        _convert(["hf-to-mcore", "--hf-dir", str(tmp_path / "fp8"), "--output", str(tmp_path / "ckpt")])
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and name in err and str(shard) in err and "(7, 7)" in err, err
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.glob(".ckpt.partial-*"))


def test_convert_dtype_keeps_the_expert_bias_fp32(hf_checkpoint, tmp_path):
    from megatron_dsv3.conversion.convert import hf_to_mcore, mcore_to_hf
    from megatron_dsv3.conversion.dist_ckpt_io import DistCheckpointReader

    hf_to_mcore(hf_checkpoint, tmp_path / "ckpt", dtype=torch.bfloat16, progress=False)
    reader = DistCheckpointReader(tmp_path / "ckpt" / "iter_0000000")
    dtypes = {k: md.properties.dtype for k, md in reader.tensors.items()}
    assert {d for k, d in dtypes.items() if k.endswith("expert_bias")} == {torch.float32}
    assert dtypes["embedding.word_embeddings.weight"] == torch.bfloat16
    mcore_to_hf(tmp_path / "ckpt", tmp_path / "hf", dtype=torch.float16, progress=False)
    from safetensors import safe_open

    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
    for name, file in index.items():
        with safe_open(tmp_path / "hf" / file, "pt") as f:
            expected = torch.float32 if name.endswith("e_score_correction_bias") else torch.float16
            assert f.get_tensor(name).dtype == expected, name
