"""Tokenizers with the interface megatron-core's GPT datasets read: `vocab_size`, `eod`, `pad`,
`tokenize`, `detokenize` and `unique_identifiers` (hashed into the dataset index cache names).

`NullTokenizer`: ids are the text's whitespace-separated integers. Here `vocab_size` is the whole
vocabulary, EOD included (eod = vocab_size - 1), so the tokenizer fits the model's embedding as is;
Megatron-LM's `--vocab-size V` instead means V ids plus an EOD at id V (V + 1 in all).
`HuggingFaceTokenizer`: a local `tokenizer.json` or a local directory; never contacts a hub.
"""

import os
from collections import OrderedDict

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "NullTokenizer")

# Names an end-of-text token goes by, tried when a bare tokenizer.json declares no eos_token.
_EOD_TOKEN_NAMES = ("<|endoftext|>", "<｜end▁of▁sentence｜>", "</s>", "<|end_of_text|>", "<eos>")

# megatron-core's "no pad id" (megatron_dataset._PAD_TOKEN_ID): never equals a real token id.
NO_PAD = -1


class NullTokenizer:
    def __init__(self, vocab_size: int):
        if vocab_size is None or int(vocab_size) < 2:
            raise ValueError(
                f"NullTokenizer needs --vocab-size >= 2 (the whole vocabulary, EOD = vocab_size-1 included), "
                f"got {vocab_size}"
            )
        self.vocab_size = int(vocab_size)
        self.eod = self.vocab_size - 1
        self.pad = NO_PAD
        self.unique_identifiers = OrderedDict([("class", type(self).__name__), ("vocab_size", self.vocab_size)])

    def tokenize(self, text: str) -> list[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids) -> str:
        return " ".join(str(int(x)) for x in ids)


class HuggingFaceTokenizer:
    """`tokenize` returns what `tokenizer(text).input_ids` gives (special tokens, e.g. a BOS, included),
    as Megatron-LM's HuggingFaceTokenizer does; `vocab_size` counts added tokens."""

    def __init__(self, tokenizer_model: str):
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if not tokenizer_model or not os.path.exists(tokenizer_model):
            raise FileNotFoundError(
                f"--tokenizer-model {tokenizer_model!r} not found: "
                "give a local tokenizer.json or a directory holding one"
            )
        if os.path.isdir(tokenizer_model):
            self._tokenizer = AutoTokenizer.from_pretrained(tokenizer_model, local_files_only=True)
        else:
            self._tokenizer = PreTrainedTokenizerFast(tokenizer_file=tokenizer_model)
        self.vocab_size = len(self._tokenizer)
        self.eod = self._find_eod(tokenizer_model)
        pad = self._tokenizer.pad_token_id
        self.pad = NO_PAD if pad in (None, self.eod) else pad  # megatron-core would drop a pad equal to EOD
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("path", os.path.abspath(tokenizer_model))]
        )

    def _find_eod(self, tokenizer_model: str) -> int:
        if self._tokenizer.eos_token_id is not None:
            return self._tokenizer.eos_token_id
        vocab = self._tokenizer.get_vocab()
        for name in _EOD_TOKEN_NAMES:
            if name in vocab:
                return vocab[name]
        raise ValueError(
            f"--tokenizer-model {tokenizer_model}: no end-of-document token (no eos_token and none of "
            f"{', '.join(_EOD_TOKEN_NAMES)}); add one, or an eos_token to a tokenizer_config.json beside it"
        )

    @property
    def bos(self):
        """The beginning-of-text id, None if the tokenizer has none."""
        return self._tokenizer.bos_token_id

    def save_pretrained(self, directory) -> None:
        """A directory AutoTokenizer loads, whose eos_token is the EOD (a bare tokenizer.json may name none)."""
        if self._tokenizer.eos_token_id is None:
            self._tokenizer.eos_token = self._tokenizer.convert_ids_to_tokens(self.eod)
        self._tokenizer.save_pretrained(directory)

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer(text).input_ids

    def token_to_id(self, token: str) -> int | None:
        """The id of one vocabulary entry (e.g. a special token), or None."""
        return self._tokenizer.get_vocab().get(token)

    def detokenize(self, ids) -> str:
        return self._tokenizer.decode(list(ids))


def fit_vocab(model_config, tokenizer):
    """`model_config` with vocab_size = the embedding's and output layer's rows: --vocab-size (the preset's), or
    the tokenizer's size when it has more ids. The model is built and its checkpoint's model_config saved with it."""
    return model_config.replace(vocab_size=max(model_config.vocab_size, tokenizer.vocab_size))


def build_tokenizer(tokenizer_type: str, tokenizer_model: str = None, vocab_size: int = None):
    """`vocab_size` is read by NullTokenizer only; `tokenizer_model` by HuggingFaceTokenizer only."""
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model)
    raise ValueError(f"--tokenizer-type {tokenizer_type!r} unknown: choose one of {', '.join(TOKENIZER_TYPES)}")
