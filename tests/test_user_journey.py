"""The README's "From your text to a Hugging Face model", command by command: a text corpus and a BPE tokenizer
made offline -> tools/preprocess_data.py -> pretrain_dsv3.py on 2 ranks with the tokenizer and no --vocab-size ->
tools/convert_checkpoint.py mcore-to-hf --tokenizer -> transformers' AutoModelForCausalLM / AutoTokenizer.

References: transformers' own DeepseekV3 forward (logits against the Megatron model on the same text), a
greedy argmax loop over that forward (what `generate` must return, cut after the first end-of-text token),
and the tokenizer's length (the vocabulary the checkpoint and config.json must describe).
"""

import json
import logging
import os
import random
import re
import shlex
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import REPO, byte_level_bpe, read_metrics

from megatron_dsv3.conversion.verify import megatron_logits
from megatron_dsv3.third_party_warnings import absent_backends_line
from megatron_dsv3.training.run_summary import BANNER_HEAD, SUMMARY_HEAD

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
TOKENIZER_VOCAB = 400  # more ids than the tiny preset's 256: the model must take the tokenizer's vocabulary
SUBJECTS = ["the old miller", "a young fox", "the river", "my neighbour", "the small boat", "every teacher",
            "the north wind", "a quiet student", "the baker's daughter", "our garden"]
VERBS = ["watches", "carries", "finds", "remembers", "follows", "paints", "builds", "hears", "opens", "keeps"]
OBJECTS = ["the bright morning", "a heavy basket", "the long road", "an open window", "the silver lake",
           "a warm loaf of bread", "the broken fence", "seven white stones", "the evening bell", "a letter"]
ENDINGS = ["before the rain.", "after supper.", "near the bridge.", "with great care.", "every spring.",
           "in the dark.", "without a word.", "at the market.", "for the children.", "once again."]


def corpus_lines(count: int, seed: int = 0) -> list:
    """Sentences of a small grammar, one to three per document."""
    rng = random.Random(seed)

    def sentence():
        text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"
        return text[0].upper() + text[1:]

    return [" ".join(sentence() for _ in range(rng.randint(1, 3))) for _ in range(count)]


def make_tokenizer(lines, directory) -> None:
    """A byte-level BPE trained offline, saved as a Hugging Face tokenizer directory that adds a BOS."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = byte_level_bpe(lines, TOKENIZER_VOCAB, [BOS, EOS])
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS).save_pretrained(directory)


def readme_commands() -> list:
    """The shell commands of README.md's "From your text to a Hugging Face model", as argument lists."""
    with open(os.path.join(REPO, "README.md")) as f:
        section = f.read().split("## From your text to a Hugging Face model\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def run(command, cwd) -> str:
    """A README command in `cwd`: `python`/`torchrun` are this interpreter, scripts are the repository's."""
    launcher = {"python": [sys.executable], "torchrun": [sys.executable, "-m", "torch.distributed.run"]}
    argv = launcher[command[0]] + [os.path.join(REPO, a) if a.endswith(".py") else a for a in command[1:]]
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                            start_new_session=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)}:\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def journey(tmp_path_factory):
    """The README's commands in a fresh directory holding corpus.jsonl and tokenizer/; then the same checkpoint
    converted again keeping the MTP layer (hf_mtp)."""
    root = tmp_path_factory.mktemp("journey")
    lines = corpus_lines(400)
    with open(root / "corpus.jsonl", "w") as stream:
        for line in lines:
            stream.write(json.dumps({"text": line}) + "\n")
    make_tokenizer(lines, root / "tokenizer")
    commands = readme_commands()
    assert [c[:2] for c in commands] == [["python", "tools/preprocess_data.py"], ["torchrun", "--standalone"],
                                         ["python", "tools/convert_checkpoint.py"]]
    outputs = [run(command, root) for command in commands]
    with_mtp = [{"hf_model": "hf_mtp"}.get(a, a) for a in commands[-1] if a != "--no-mtp"]
    return root, {"train": outputs[1], "hf_model": outputs[2], "hf_mtp": run(with_mtp, root)}


def test_training_with_the_tokenizer_saves_its_vocabulary(journey):
    from transformers import AutoTokenizer

    from megatron_dsv3.training.arguments import parse_args
    from megatron_dsv3.training.input_checks import check_files_before_model

    root, _ = journey
    vocab = len(AutoTokenizer.from_pretrained(root / "tokenizer"))
    assert vocab > 256
    metrics = read_metrics(root / "metrics.jsonl")
    assert metrics[-1]["lm_loss"] < 0.5 * metrics[0]["lm_loss"]  # from ~ln(400) on a text the model can learn
    common = torch.load(root / "checkpoints" / "iter_0000040" / "common.pt", weights_only=False)
    assert common["model_config"]["vocab_size"] == vocab
    # resuming with the same flags (no --vocab-size): the architecture check sees the same vocabulary
    args = parse_args(["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(root / "tokenizer"),
                       "--data-path", str(root / "data" / "corpus_text_document"), "--load", str(root / "checkpoints")],
                      world_size=1)
    plan = check_files_before_model(args)
    assert plan["iteration"] == 40 and plan["differences"] == []
    config = json.loads((root / "hf_model" / "config.json").read_text())
    assert config["vocab_size"] == vocab


def without_run_report(output: str) -> list:
    """The printed lines less the start banner and the end summary (a head line, then its indented lines)."""
    lines, in_report = [], False
    for line in output.splitlines():
        in_report = line.startswith((BANNER_HEAD, SUMMARY_HEAD)) or (in_report and line.startswith("  "))
        if not in_report:
            lines.append(line)
    return lines


def test_training_and_help_print_no_warnings(journey):
    """What is absent (Transformer Engine, Apex) is said once, in one line; megatron-core's and torch's warnings
    that ask nothing of the user are not printed, on any rank."""
    _, outputs = journey
    lines = [line for line in without_run_report(outputs["train"]) if not line.startswith("iteration ")]
    assert not [line for line in lines if re.search(r"Warning|warn\(", line)], lines
    absent = absent_backends_line()
    assert [line for line in lines if "not installed" in line] == ([absent] if absent else [])
    assert len(lines) <= 3, lines
    result = subprocess.run([sys.executable, os.path.join(REPO, "pretrain_dsv3.py"), "--help"], capture_output=True,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert result.returncode == 0 and "--tokenizer-model" in result.stdout and result.stderr == "", result.stderr


def test_hf_directory_is_complete(journey):
    from transformers import AutoTokenizer

    root, outputs = journey
    tokenizer = AutoTokenizer.from_pretrained(root / "hf_model")
    assert tokenizer(corpus_lines(1)[0]).input_ids == AutoTokenizer.from_pretrained(root / "tokenizer")(
        corpus_lines(1)[0]).input_ids
    ids = {"bos_token_id": tokenizer.convert_tokens_to_ids(BOS), "eos_token_id": tokenizer.convert_tokens_to_ids(EOS)}
    for name in ("config.json", "generation_config.json"):
        written = json.loads((root / "hf_model" / name).read_text())
        assert {k: written.get(k) for k in ids} == ids, name
    assert json.loads((root / "hf_mtp" / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert json.loads((root / "hf_model" / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert "--no-mtp" in outputs["hf_mtp"] and "--no-mtp" not in outputs["hf_model"]  # the note on UNEXPECTED
    for name in ("hf_mtp", "hf_model"):  # the progress bar ends at its total
        done, total = re.findall(r"Megatron -> HF: 100%\|[^|]*\| (\S+)/(\S+) \[", outputs[name])[-1]
        assert done == total, name


def load_capturing_everything(capfd, directory):
    """The model, its loading info, and every line transformers logged, warned or printed while loading."""
    from transformers import AutoModelForCausalLM

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, info = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    out, err = capfd.readouterr()
    lines = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    lines += [str(w.message) for w in caught] + out.splitlines() + err.splitlines()
    return model.eval(), info, lines


def test_transformers_loads_it_without_a_warnings_table(journey, capfd):
    root, _ = journey
    _, info, lines = load_capturing_everything(capfd, root / "hf_model")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert not [line for line in lines if re.search(r"MISSING|UNEXPECTED|MISMATCH|newly initialized", line)], lines
    # with the MTP layer (the release's layout): transformers does not use it, and names only its tensors
    _, info, lines = load_capturing_everything(capfd, root / "hf_mtp")
    assert any("UNEXPECTED" in line for line in lines)  # the table the capture above would have seen
    config = json.loads((root / "hf_mtp" / "config.json").read_text())
    mtp = f"model.layers.{config['num_hidden_layers']}."
    assert info["unexpected_keys"] and all(k.startswith(mtp) for k in info["unexpected_keys"])
    assert not info["missing_keys"] and not info["mismatched_keys"]


@pytest.fixture(scope="module")
def hf_model(journey):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _ = journey
    model = AutoModelForCausalLM.from_pretrained(root / "hf_model", dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(root / "hf_model")


def test_hf_logits_match_the_megatron_model_on_text(journey, hf_model):
    root, _ = journey
    model, tokenizer = hf_model
    tokens = torch.tensor(tokenizer(" ".join(corpus_lines(20, seed=1))).input_ids[:4 * 24]).view(4, 24)
    with torch.no_grad():
        reference = model(tokens).logits
    ours = megatron_logits(root / "checkpoints", tokens)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def greedy(model, ids, steps):
    """The argmax continuation, step by step, ignoring any end-of-text."""
    ids = ids.clone()
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, -steps:].tolist()


def test_generate_stops_at_the_end_of_text_token(hf_model):
    model, tokenizer = hf_model
    eos, steps = tokenizer.convert_tokens_to_ids(EOS), 24
    assert model.generation_config.eos_token_id == eos
    stopped = 0
    for prompt in ["The river keeps a letter", "Our garden", "A young fox follows the long road near the bridge."]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        expected = greedy(model, ids, steps)
        if eos in expected:
            expected, stopped = expected[: expected.index(eos) + 1], stopped + 1
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False)
        assert generated[0, ids.shape[1]:].tolist() == expected, prompt
    assert stopped, "no prompt reached the end-of-text token: the stop was not exercised"
