import json
import os
import subprocess
import sys

import pytest

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(nproc: int, script: str, *args, timeout: int = 300, env=None, expect_exit: int = 0) -> str:
    """Run `script` on `nproc` CPU ranks (gloo) and return its combined output; fail with it unless
    it exits with `expect_exit` (torchrun reports a failed worker as 1)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        os.path.join(REPO, script), *map(str, args),
    ]
    run_env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(
        command, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=timeout,
        start_new_session=True,
    )
    output = result.stdout + result.stderr
    if result.returncode != expect_exit:
        pytest.fail(f"{' '.join(command)} exited {result.returncode}:\n{output[-6000:]}")
    return output


def autograd_node_names(grad_fn) -> set:
    """Names of the autograd nodes reachable from `grad_fn` (AccumulateGrad of the leaves included)."""
    names, todo, seen = set(), [grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


def read_metrics(path) -> list:
    """The rows of a `--metrics-jsonl` file, one dict per logged iteration."""
    with open(path) as f:
        return [json.loads(line) for line in f]


def hf_tensors_as_stored(path) -> dict:
    """Every tensor of a sharded HF checkpoint directory as stored (FP8 not dequantized)."""
    from safetensors import safe_open

    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name, file in index.items():
        with safe_open(path / file, "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def byte_level_bpe(texts, vocab_size: int, special_tokens):
    """A byte-level BPE `tokenizers.Tokenizer` trained offline on `texts` (special tokens get the first ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer
