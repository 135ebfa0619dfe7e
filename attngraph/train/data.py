"""Data for training a translation model: parallel text, a vocabulary, batches of similar length.

- Parallel text: a file of ``source<TAB>target`` lines (``read_pairs``: a malformed line is an error naming
  the file and line), or a built-in task made on the fly (``TASKS``: ``numbers``, digits to English words).
- The vocabulary is one vocabulary for source and target alike (the paper shares one between them),
  word-level or byte-pair (BPE), built with the ``tokenizers`` library and saved as its ``tokenizer.json``;
  ids 0-3 are the specials ``<pad>`` (0: the models' ``pad_id``), ``<s>``, ``</s>`` and ``<unk>``.
- ``length_batches``: teacher forcing's arrays (``src``; ``tgt`` = ``<s> y``; ``labels`` = ``y </s>``), the
  pairs grouped by length so a batch holds about ``batch_tokens`` tokens with little padding, as the paper
  batches by approximate length.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)


class DataError(ValueError):
    """Training data that cannot be used as given: the message names the file and line, or the task."""


# ------------------------------------------------------------------------------------------------
# Parallel text.

def read_pairs(path: str) -> list[tuple[str, str]]:
    """The ``(source, target)`` pairs of a file of ``source<TAB>target`` lines (blank lines skipped; words
    separated by spaces)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    pairs = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\n").rstrip("\r")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                f"convert the file to UTF-8 (iconv -t UTF-8)") from None
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise DataError(f"{path}:{lineno}: expected 'source<TAB>target', got {len(fields)} tab-separated "
                                f"field(s): {line[:60]!r}")
            src, tgt = (" ".join(x.split()) for x in fields)
            if not src or not tgt:
                raise DataError(f"{path}:{lineno}: the {'source' if not src else 'target'} is empty")
            pairs.append((src, tgt))
    if not pairs:
        raise DataError(f"{path}: no pairs (the file is empty)")
    return pairs


# ------------------------------------------------------------------------------------------------
# Built-in tasks.

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _below_thousand(n: int) -> list[str]:
    hundreds, rest = divmod(n, 100)
    out = [_ONES[hundreds], "hundred"] if hundreds else []
    if rest >= 20:
        out += [_TENS[rest // 10]] + ([_ONES[rest % 10]] if rest % 10 else [])
    elif rest:
        out.append(_ONES[rest])
    return out


def number_words(n: int) -> str:
    """``n`` (0 <= n < 1,000,000) in English words: lowercase, no "and", no hyphens (4096 -> "four thousand
    ninety six", 700010 -> "seven hundred thousand ten")."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"numbers are 0 <= n < 1000000, got {n}")
    if n == 0:
        return "zero"
    thousands, rest = divmod(n, 1000)
    return " ".join((_below_thousand(thousands) + ["thousand"] if thousands else []) + _below_thousand(rest))


class NumbersTask:
    """``numbers``: the source an integer 0 <= n < 1,000,000 in digits separated by spaces ("4 0 9 6"), the
    target its words.  Training draws numbers at random; the validation set is a fixed seeded sample of
    ``valid_size`` numbers that training never draws."""

    name = "numbers"
    LIMIT = 1_000_000

    def __init__(self, valid_size: int = 1000, valid_seed: int = 20261204):
        rng = np.random.default_rng(valid_seed)
        self.valid_numbers = [int(v) for v in rng.choice(self.LIMIT, size=valid_size, replace=False)]
        self._held_out = set(self.valid_numbers)

    @staticmethod
    def pair(n: int) -> tuple[str, str]:
        return " ".join(str(n)), number_words(n)

    def valid(self) -> list[tuple[str, str]]:
        return [self.pair(n) for n in self.valid_numbers]

    def draw(self, count: int, rng: np.random.Generator) -> list[tuple[str, str]]:
        """``count`` training pairs, none from the validation set.  Lengths vary as the digits do: n is
        drawn with a uniform number of digits (1-6), so short numbers are seen as often as long ones."""
        out = []
        while len(out) < count:
            digits = int(rng.integers(1, 7))
            n = int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits))
            if n not in self._held_out:
                out.append(self.pair(n))
        return out

    def vocabulary_text(self) -> list[str]:
        """Text holding every word the task uses (for the vocabulary)."""
        return [" ".join(str(d) for d in range(10))] + [number_words(n) for n in (*range(100), 100, 1000)]


TASKS = {"numbers": NumbersTask}


def get_task(name: str):
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]()


# ------------------------------------------------------------------------------------------------
# The vocabulary.

TOKENIZERS = ("word", "bpe")


def build_tokenizer(texts: Iterable[str], kind: str = "word", vocab_size: int = 8000):
    """A ``tokenizers.Tokenizer`` trained on ``texts``, the specials first (``<pad>`` 0, ``<s>`` 1, ``</s>`` 2,
    ``<unk>`` 3).  ``word``: every whitespace-separated word of the texts, an unknown word is ``<unk>``.
    ``bpe``: byte-pair merges learned from the texts' words up to ``vocab_size`` tokens (a word's last piece
    ends in ``</w>``, which decoding turns back into a space); a character the texts never hold is ``<unk>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if kind == "word":
        words = sorted({w for t in texts for w in t.split()} - set(SPECIALS))
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIALS + tuple(words))}, unk_token=UNK))
    elif kind == "bpe":
        if vocab_size <= len(SPECIALS):
            raise DataError(f"a BPE vocabulary needs more than the {len(SPECIALS)} specials, got {vocab_size}")
        tok = Tokenizer(models.BPE(unk_token=UNK, end_of_word_suffix="</w>"))
        tok.decoder = decoders.BPEDecoder(suffix="</w>")
    else:
        raise DataError(f"unknown tokenizer {kind!r} (known: {', '.join(TOKENIZERS)})")
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "bpe":
        tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                                           end_of_word_suffix="</w>", show_progress=False))
    return tok


def load_tokenizer(path: str):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(path)


def tokenizer_from_json(text: str, where: str):
    """The tokenizer saved as ``text`` (a ``tokenizer.json``); a malformed one is a ``DataError`` naming ``where``."""
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - the library's parse errors have no common class
        raise DataError(f"{where}: cannot read its tokenizer.json ({e})") from None


def encode(tok, text: str) -> list[int]:
    return tok.encode(text).ids


def decode(tok, ids: Sequence[int]) -> str:
    """The text of ``ids`` up to the first ``</s>``, specials left out."""
    ids = [int(i) for i in ids]
    ids = ids[:ids.index(EOS_ID)] if EOS_ID in ids else ids
    return tok.decode([i for i in ids if i >= len(SPECIALS)])


def unknown_words(tok, text: str) -> list[str]:
    """The words of ``text`` that the vocabulary cannot spell (they would be ``<unk>``, in part or whole)."""
    return [w for w in text.split() if UNK_ID in encode(tok, w)]


def unknown_words_note(tok, pairs, what: str, vocabulary: str = "the vocabulary") -> str | None:
    """What to tell a user whose pairs (``what``) hold words ``vocabulary`` lacks (read as ``<unk>``), or None."""
    from ..files import listing
    unknown = sorted({w for pair in pairs for side in pair for w in unknown_words(tok, side)})
    if not unknown:
        return None
    return (f"{what}: {len(unknown)} word(s) outside {vocabulary}, read as <unk>: "
            f"{listing(map(repr, unknown), most=8)}")


# ------------------------------------------------------------------------------------------------
# Batches.

def pad(rows: Sequence[Sequence[int]], length: int | None = None) -> np.ndarray:
    length = max(len(r) for r in rows) if length is None else length
    out = np.full((len(rows), length), PAD_ID, np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def teacher_forcing(sources: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """``src``; ``tgt`` = ``<s> y``; ``labels`` = ``y </s>`` (padded with ``<pad>``, which the loss ignores)."""
    return {"src": pad(sources), "tgt": pad([[BOS_ID, *t] for t in targets]),
            "labels": pad([[*t, EOS_ID] for t in targets])}


def length_batches(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_tokens: int,
                   rng: np.random.Generator) -> Iterator[dict[str, np.ndarray]]:
    """Teacher-forcing batches of ``pairs`` (token ids) grouped by length: sorted by their longer side (ties
    at random), cut so that a batch's rows times its longest side stay within ``batch_tokens``, yielded in
    random order."""
    if not pairs:
        return
    order = sorted(range(len(pairs)), key=lambda i: (max(len(pairs[i][0]), len(pairs[i][1]) + 1), rng.random()))
    batches, current, longest = [], [], 0
    for i in order:
        size = max(len(pairs[i][0]), len(pairs[i][1]) + 1)
        if current and max(longest, size) * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, size)
    batches.append(current)
    for b in rng.permutation(len(batches)):
        rows = batches[b]
        yield teacher_forcing([pairs[i][0] for i in rows], [pairs[i][1] for i in rows])


__all__ = ["BOS_ID", "DataError", "EOS_ID", "NumbersTask", "PAD_ID", "TASKS", "TOKENIZERS", "UNK_ID", "build_tokenizer",
           "decode", "encode", "get_task", "length_batches", "load_tokenizer", "number_words", "read_pairs",
           "teacher_forcing", "tokenizer_from_json", "unknown_words",
           "unknown_words_note"]
