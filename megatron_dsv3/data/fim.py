"""Fill-in-Middle (DeepSeek-V3 report §4.1; Bavarian et al. 2022, "Efficient Training of Language
Models to Fill in the Middle"), applied to each document before packing.

A document f (its trailing EOD, and a leading BOS, stay where they are) is, with probability
--fim-rate, cut at two points drawn uniformly from its token boundaries, f = f_pre f_middle f_suf, and
rearranged as

    PSM:  <|fim_begin|> f_pre <|fim_hole|> f_suf <|fim_end|> f_middle <|eos_token|>
    SPM:  <|fim_begin|> <|fim_hole|> f_suf <|fim_end|> f_pre f_middle <|eos_token|>   (--fim-spm-rate)

(DeepSeek-V3: rate 0.1, PSM; SPM is the FIM paper's variant 2, as in Megatron-LM's GPTFIMDataset).
The cuts are between tokens, so a document keeps its tokens: only the three sentinels are added.
With --fim-split-sample TOKEN, a document holding TOKEN (e.g. a repository whose files it separates)
is FIM'd with probability --fim-rate as a whole, and then each fragment between TOKENs with
probability --fim-fragment-rate. --fim-no-prefix STR leaves a (fragment of a) document whose text
starts with STR unchanged. Megatron-LM's flags; unlike its GPTFIMDataset, which rearranges the
EOD-separated pieces of an already packed sample (and pads or truncates it back to the sample's length),
here whole documents are rearranged and the packing index is built over their new lengths.

Determinism: the draws for the document at position i of a dataset's document index (which lists the
documents of all epochs in order) come from a generator seeded with (--seed, the data file, the split,
i), so every rank, reading any samples in any order, sees the same data.
"""

import dataclasses
import os
import zlib

import numpy
from megatron.core.datasets import helpers
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, _build_shuffle_index
from megatron.core.datasets.utils import Split

# Spellings of each sentinel, tried in order: this project's, DeepSeek-V3's tokenizer's, StarCoder's
# (the names Megatron-LM's --fim-prefix/suffix/middle-token default to).
SENTINEL_NAMES = {
    "begin": ("<|fim_begin|>", "<｜fim▁begin｜>", "<fim_prefix>"),
    "hole": ("<|fim_hole|>", "<｜fim▁hole｜>", "<fim_suffix>"),
    "end": ("<|fim_end|>", "<｜fim▁end｜>", "<fim_middle>"),
}


@dataclasses.dataclass(frozen=True)
class FIMSentinels:
    begin: int  # before f_pre (Megatron-LM's prefix token)
    hole: int  # before f_suf (its suffix token)
    end: int  # before f_middle (its middle token)


def add_fim_args(parser) -> None:
    g = parser.add_argument_group("fill-in-middle (DeepSeek-V3 §4.1: --fim-data --fim-rate 0.1 --fim-spm-rate 0)")
    g.add_argument("--fim-data", action="store_true",
                   help="rearrange documents as <|fim_begin|> pre <|fim_hole|> suf <|fim_end|> middle "
                        "(needs a HuggingFaceTokenizer holding those tokens)")
    g.add_argument("--fim-rate", type=float, default=0.5, help="probability that a document is rearranged")
    g.add_argument("--fim-spm-rate", type=float, default=0.5,
                   help="probability that a rearranged document takes the SPM layout instead of PSM")
    g.add_argument("--fim-split-sample", default=None,
                   help="a single token: rearrange the fragments of a document between its occurrences")
    g.add_argument("--fim-fragment-rate", type=float, default=None,
                   help="with --fim-split-sample: probability that each fragment is rearranged")
    g.add_argument("--fim-no-prefix", default=None,
                   help="leave (fragments of) documents whose text starts with this string unchanged")


def validate_fim_args(args) -> str | None:
    """The one-line problem with the FIM flags, or None; `args.mock_data` is already resolved."""
    for flag in ("fim_rate", "fim_spm_rate", "fim_fragment_rate"):
        value = getattr(args, flag)
        if value is not None and not 0 <= value <= 1:
            return f"--{flag.replace('_', '-')} {value} must be a probability in [0, 1]"
    if (args.fim_split_sample is None) != (args.fim_fragment_rate is None):
        return "--fim-split-sample and --fim-fragment-rate go together: give both or neither"
    if not args.fim_data:
        return None
    if args.mock_data:
        return "--fim-data rearranges the documents of --data-path; mock data has none (give --data-path)"
    if args.tokenizer_type != "HuggingFaceTokenizer":
        return (f"--fim-data needs --tokenizer-type HuggingFaceTokenizer whose vocabulary holds "
                f"{', '.join(n[0] for n in SENTINEL_NAMES.values())}; {args.tokenizer_type} has no FIM tokens")
    return None


def fim_sentinels(tokenizer) -> FIMSentinels:
    """The tokenizer's sentinel ids, or ValueError naming the missing token."""
    token_to_id = getattr(tokenizer, "token_to_id", None)
    ids = {}
    for role, names in SENTINEL_NAMES.items():
        found = [token_to_id(name) for name in names] if token_to_id else []
        ids[role] = next((i for i in found if i is not None), None)
        if ids[role] is None:
            raise ValueError(
                f"--fim-data: the tokenizer has no {names[0]} token (nor {' / '.join(names[1:])}); add "
                f"{', '.join(n[0] for n in SENTINEL_NAMES.values())} to --tokenizer-model as special tokens"
            )
    return FIMSentinels(**ids)


@dataclasses.dataclass(frozen=True)
class FIMSettings:
    """Everything the dataset needs: rates, sentinel and split ids, the tokenizer's EOD and BOS."""

    rate: float
    spm_rate: float
    sentinels: FIMSentinels
    eod: int
    bos: int | None = None
    split_id: int | None = None
    fragment_rate: float | None = None
    no_prefix: str | None = None

    @property
    def unique_identifiers(self) -> dict:  # megatron-core hashes this into the index cache names
        return dataclasses.asdict(self)


def fim_settings(args, tokenizer) -> FIMSettings | None:
    """None without --fim-data; ValueError when the tokenizer lacks a sentinel or the split token."""
    if not args.fim_data:
        return None
    split_id = None
    if args.fim_split_sample is not None:
        split_id = tokenizer.token_to_id(args.fim_split_sample)
        if split_id is None:
            raise ValueError(f"--fim-split-sample {args.fim_split_sample!r} is not a single token of the tokenizer")
    return FIMSettings(
        rate=args.fim_rate, spm_rate=args.fim_spm_rate, sentinels=fim_sentinels(tokenizer), eod=tokenizer.eod,
        bos=getattr(tokenizer, "bos", None), split_id=split_id, fragment_rate=args.fim_fragment_rate,
        no_prefix=args.fim_no_prefix,
    )


def fim_document(tokens, rng: numpy.random.Generator, settings: FIMSettings, detokenize=None) -> numpy.ndarray:
    """One document after FIM (see the module docstring); `detokenize` is needed for --fim-no-prefix."""
    tokens = numpy.asarray(tokens, dtype=numpy.int64)
    head = 1 if settings.bos is not None and len(tokens) and tokens[0] == settings.bos else 0
    tail = 1 if len(tokens) > head and tokens[-1] == settings.eod else 0
    body = tokens[head:len(tokens) - tail]
    split = settings.split_id
    if split is None or not (body == split).any():
        body = _permute(body, settings.rate, rng, settings, detokenize)
    elif rng.random() < settings.rate:
        cuts = numpy.flatnonzero(body == split)
        starts, stops = numpy.concatenate([[0], cuts + 1]), numpy.concatenate([cuts, [len(body)]])
        pieces = []
        for start, stop in zip(starts, stops):  # the fragments, each followed by its split token
            pieces += [_permute(body[start:stop], settings.fragment_rate, rng, settings, detokenize), body[stop:stop + 1]]
        body = numpy.concatenate(pieces)
    return numpy.concatenate([tokens[:head], body, tokens[len(tokens) - tail:]])


def _permute(seq, rate, rng, settings, detokenize):
    if len(seq) == 0 or not rng.random() < rate:
        return seq
    if settings.no_prefix is not None and detokenize(seq).startswith(settings.no_prefix):
        return seq
    lo, hi = sorted(rng.integers(0, len(seq) + 1, size=2))
    pre, middle, suf = seq[:lo], seq[lo:hi], seq[hi:]
    s = settings.sentinels
    if rng.random() < settings.spm_rate:
        parts = [[s.begin, s.hole], suf, [s.end], pre, middle]
    else:
        parts = [[s.begin], pre, [s.hole], suf, [s.end], middle]
    return numpy.concatenate([numpy.asarray(p, dtype=numpy.int64) for p in parts])


@dataclasses.dataclass
class FIMGPTDatasetConfig(GPTDatasetConfig):
    fim: FIMSettings = None


class FIMGPTDataset(GPTDataset):
    """GPTDataset whose documents pass through `fim_document` before they are packed into samples:
    the sample index is megatron-core's (helpers.build_sample_idx) over the rearranged lengths of the
    document index's entries, the shuffle index a permutation of those samples drawn from --seed."""

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return GPTDataset._key_config_attributes() + ["fim"]

    def _build_document_sample_shuffle_indices(self):
        document_index, _, _ = super()._build_document_sample_shuffle_indices()
        lengths = self._cached("fim_lengths.npy", lambda: numpy.array(
            [len(self._document(i, document_index)) for i in range(len(document_index))], dtype=numpy.int32))
        drop_last = self.index_split != Split.valid or self.config.drop_last_partial_validation_sequence
        sample_index = helpers.build_sample_idx(
            lengths, numpy.arange(len(lengths), dtype=numpy.int32), self.config.sequence_length, 1,
            int(lengths.sum(dtype=numpy.int64)), drop_last, self.config.add_extra_token_to_sequence,
        )
        samples = sample_index.shape[0] - 1
        shuffle_index = _build_shuffle_index(samples, samples, numpy.random.RandomState(self.config.random_seed))
        return document_index, sample_index, shuffle_index

    def _cached(self, affix, compute):
        """`compute()`, kept beside megatron-core's indices (and read from there once a rank wrote it)."""
        cache = self.config.path_to_cache or os.path.join(self.dataset.path_prefix, "cache", f"{type(self).__name__}_indices")
        path = os.path.join(cache, f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}-{affix}")
        if os.path.isfile(path):
            return numpy.load(path)
        value = compute()
        os.makedirs(cache, exist_ok=True)
        partial = f"{path}.{os.getpid()}.npy"
        numpy.save(partial, value)
        os.replace(partial, path)
        return value

    def _document(self, position: int, document_index=None) -> numpy.ndarray:
        """The rearranged document at `position` of the document index."""
        document_index = self.document_index if document_index is None else document_index
        key = [self.config.random_seed, zlib.crc32(os.path.basename(self.dataset.path_prefix).encode()),
               self.index_split.value, position]
        return fim_document(self.dataset.get(int(document_index[position])), numpy.random.default_rng(key),
                            self.config.fim, self.config.tokenizer.detokenize)

    def _query_document_sample_shuffle_indices(self, idx: int):
        """Tokens [offset, offset + seq_length + 1) of the rearranged document stream, and the ids of the
        documents they come from (megatron-core's semantics, padded at the end of a partial sample)."""
        idx = self.shuffle_index[idx]
        (first, first_offset), (last, last_offset) = self.sample_index[idx], self.sample_index[idx + 1]
        extra = self.config.add_extra_token_to_sequence
        parts = []
        for position in range(first, last + 1):
            document = self._document(position)
            begin = first_offset if position == first else 0
            parts.append(document[begin:last_offset + extra] if position == last else document[begin:])
        length = sum(map(len, parts))
        want = self.config.sequence_length + extra
        if length < want:
            parts.append(numpy.full(want - length, self._pad_token_id, dtype=numpy.int64))
        return (numpy.concatenate(parts).astype(numpy.int64),
                numpy.array([self.document_index[p] for p in range(first, last + 1)], dtype=numpy.int64))
