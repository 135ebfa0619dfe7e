"""Transformer layers, written as a user would: plain ops, no fusion by hand.

Conventions: ``Linear.weight`` is stored ``(in_features, out_features)`` so ``y = x @ W + b``
(PyTorch stores the transpose; ``attngraph.weights.import_state_dict`` maps between the two, and
``attngraph.weights.from_torch_transformer`` loads a ``torch.nn.Transformer`` state dict into
``Transformer`` below).  The layers take PyTorch's mask arguments with PyTorch's meaning: a bool
``src_mask`` / ``tgt_mask`` / ``memory_mask`` or key padding mask is True where attention is *not*
allowed (``torch.nn.MultiheadAttention``), a float one is added to the scores.  Attention writes the
scale the plain way, ``(q @ k^T) * (1/sqrt(d_k))`` then the mask then softmax, and the head split as
``reshape -> transpose``: recognizing and fusing those is the passes' work, not the model author's.
"""

from __future__ import annotations

import math

import numpy as np

from . import functional as F
from .functional import causal_mask
from .module import Module, ModuleList, Parameter
from .tensor import TensorOps

NEG_INF = float("-inf")


class Linear(Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter((in_features, out_features), init=("xavier_uniform",))
        if bias:
            self.bias = Parameter((out_features,), init=("uniform", 1.0 / math.sqrt(in_features)))
        else:
            self.bias = None

    def forward(self, x):
        y = x @ self.weight
        return y + self.bias if self.bias is not None else y


class Embedding(Module):
    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.num_embeddings, self.dim = num_embeddings, dim
        self.weight = Parameter((num_embeddings, dim), init=("normal", dim ** -0.5))

    def forward(self, ids):
        return F.gather(self.weight, ids)


class LayerNorm(Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = Parameter((dim,), init=("ones",))
        self.bias = Parameter((dim,), init=("zeros",))

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)


class RMSNorm(Module):
    """Root-mean-square norm with a learned scale (LLaMA, T5), as ``torch.nn.RMSNorm``."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = Parameter((dim,), init=("ones",))

    def forward(self, x):
        return F.rms_norm(x, self.weight, self.eps)


class CrossEntropyLoss(Module):
    """``torch.nn.CrossEntropyLoss``: ``F.cross_entropy`` with its options fixed (classes along axis 1)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0):
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing = ignore_index, reduction, label_smoothing

    def forward(self, input, target):
        return F.cross_entropy(input, target, label_smoothing=self.label_smoothing, ignore_index=self.ignore_index,
                               reduction=self.reduction)


def sinusoidal_table(max_len: int, d_model: int) -> np.ndarray:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...), in float64 (the test oracle)."""
    pos = np.arange(max_len, dtype=np.float64)[:, None]
    inv = np.power(10000.0, -np.arange(0, d_model, 2, dtype=np.float64) / d_model)
    pe = np.zeros((max_len, d_model))
    pe[:, 0::2] = np.sin(pos * inv)
    pe[:, 1::2] = np.cos(pos * inv)
    return pe


class SinusoidalPositionalEncoding(Module):
    """The paper's fixed encoding.  The table is built in the graph from constants (positions times
    inverse frequencies, sin and cos interleaved), so constant folding has something real to fold."""

    def __init__(self, d_model: int, max_len: int = 1024):
        super().__init__()
        if d_model % 2:
            raise ValueError(f"sinusoidal positions need an even d_model, got {d_model}")
        self.d_model, self.max_len = d_model, max_len

    def table(self):
        d, n = self.d_model, self.max_len
        pos = F.const(np.arange(n, dtype=np.float32)[:, None], name="positions")
        inv = F.const(np.power(10000.0, -np.arange(0, d, 2) / d), name="inv_freq")
        angles = pos * inv                                            # (max_len, d/2)
        pairs = F.concat([F.sin(angles).reshape(n, d // 2, 1), F.cos(angles).reshape(n, d // 2, 1)], axis=2)
        return pairs.reshape(n, d)

    def forward(self, seq_len, offset=None):
        """The rows for positions ``offset .. offset+seq_len-1`` (``offset`` an int64 tensor of shape (1,))."""
        positions = F.arange(seq_len)
        if offset is not None:
            positions = positions + offset
        return F.gather(self.table(), positions)


class LearnedPositionalEmbedding(Module):
    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.max_len = max_len
        self.weight = Parameter((max_len, dim), init=("normal", 0.02))

    def forward(self, seq_len, offset=None):
        positions = F.arange(seq_len)
        if offset is not None:
            positions = positions + offset
        return F.gather(self.weight, positions)


class MultiHeadAttention(Module):
    """Scaled dot-product attention over ``num_heads`` heads (self or cross)."""

    def __init__(self, d_model: int, num_heads: int, bias: bool = True, kv_dim: int | None = None):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, d_model // num_heads
        kv_dim = kv_dim or d_model
        self.q_proj = Linear(d_model, d_model, bias)
        self.k_proj = Linear(kv_dim, d_model, bias)
        self.v_proj = Linear(kv_dim, d_model, bias)
        self.out_proj = Linear(d_model, d_model, bias)

    def split_heads(self, x):
        b, length, _ = x.shape
        return x.reshape(b, length, self.num_heads, self.head_dim).permute(0, 2, 1, 3)

    def forward(self, query, key, value, key_padding_mask=None, causal=False, attn_mask=None,
                causal_offset=None):
        """``key_padding_mask``: bool (batch, k_len), True at padding (as PyTorch).  ``attn_mask``: as in
        ``F.scaled_dot_product_attention``, a bool mask True where a query may attend, or a float mask
        added to the scores; either broadcasts to (batch, heads, q_len, k_len)."""
        b, q_len, _ = query.shape
        k_len = key.shape[1]
        q = self.split_heads(self.q_proj(query))
        k = self.split_heads(self.k_proj(key))
        v = self.split_heads(self.v_proj(value))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        if attn_mask is not None:
            scores = F.where(attn_mask, scores, NEG_INF) if attn_mask.dtype == "bool" else scores + attn_mask
        if causal:
            scores = F.where(causal_mask(q_len, k_len, causal_offset), scores, NEG_INF)
        if key_padding_mask is not None:
            scores = F.where(key_padding_mask[:, None, None, :], NEG_INF, scores)
        attn = F.softmax(scores, axis=-1)
        out = (attn @ v).permute(0, 2, 1, 3).reshape(b, q_len, self.d_model)
        return self.out_proj(out)


def _torch_mask(mask):
    """A ``torch.nn`` attention mask (bool True = not allowed, float added) as ``MultiHeadAttention``'s
    ``attn_mask`` (bool True = allowed, float added)."""
    return ~mask if mask is not None and mask.dtype == "bool" else mask


class Dropout(Module):
    """``torch.nn.Dropout``: ``F.dropout`` in training (``train()``), nothing in eval mode."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)


class FeedForward(Module):
    """linear2(dropout(activation(linear1(x)))), as the feed-forward of PyTorch's Transformer layers."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        if activation not in ("relu", "gelu", "gelu_tanh"):
            raise ValueError(f"activation must be relu, gelu or gelu_tanh, got {activation!r}")
        self.activation = activation
        self.linear1 = Linear(d_model, d_ff)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(d_ff, d_model)

    def forward(self, x):
        h = self.linear1(x)
        if self.activation == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h, "tanh" if self.activation == "gelu_tanh" else "none")
        return self.linear2(self.dropout(h))


class SwiGLU(Module):
    """LLaMA's feed-forward: ``w2(silu(w1(x)) * w3(x))``, projections without bias by default (Shazeer's GLU
    variants; ``d_ff`` is the hidden width, 8/3 of d_model in LLaMA)."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.w1 = Linear(d_model, d_ff, bias=bias)
        self.w3 = Linear(d_model, d_ff, bias=bias)
        self.w2 = Linear(d_ff, d_model, bias=bias)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class EncoderLayer(Module):
    """Self-attention and feed-forward, each with a residual; post-LN (the paper) or pre-LN.
    ``forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False)``: the arguments of
    ``torch.nn.TransformerEncoderLayer``, with their meaning (the module docstring).  ``dropout`` (in
    training) on each sub-layer's output before its residual and inside the feed-forward, as PyTorch's
    layer; not on the attention probabilities (PyTorch's attention dropout)."""

    def __init__(self, d_model, num_heads, d_ff, activation="relu", norm_first=False, eps=1e-5, dropout=0.0):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads)
        self.ffn = FeedForward(d_model, d_ff, activation, dropout)
        self.norm1 = LayerNorm(d_model, eps)
        self.norm2 = LayerNorm(d_model, eps)
        self.dropout1, self.dropout2 = Dropout(dropout), Dropout(dropout)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        def attend(h):
            return self.dropout1(self.self_attn(h, h, h, src_key_padding_mask, causal=is_causal,
                                                attn_mask=_torch_mask(src_mask)))

        def feed(h):
            return self.dropout2(self.ffn(h))
        x = src
        if self.norm_first:
            x = x + attend(self.norm1(x))
            return x + feed(self.norm2(x))
        x = self.norm1(x + attend(x))
        return self.norm2(x + feed(x))


class DecoderLayer(Module):
    """Self-attention, cross-attention over the encoder memory, feed-forward.  ``forward(tgt, memory,
    tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None, memory_key_padding_mask=None,
    tgt_is_causal=False, memory_is_causal=False)``: the arguments of ``torch.nn.TransformerDecoderLayer``
    (the self-attention is causal where ``tgt_is_causal`` or a causal ``tgt_mask`` says so)."""

    def __init__(self, d_model, num_heads, d_ff, activation="relu", norm_first=False, eps=1e-5, dropout=0.0):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads)
        self.cross_attn = MultiHeadAttention(d_model, num_heads)
        self.ffn = FeedForward(d_model, d_ff, activation, dropout)
        self.norm1 = LayerNorm(d_model, eps)
        self.norm2 = LayerNorm(d_model, eps)
        self.norm3 = LayerNorm(d_model, eps)
        self.dropout1, self.dropout2, self.dropout3 = Dropout(dropout), Dropout(dropout), Dropout(dropout)

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
        def self_attend(h):
            return self.dropout1(self.self_attn(h, h, h, tgt_key_padding_mask, causal=tgt_is_causal,
                                                attn_mask=_torch_mask(tgt_mask)))

        def cross_attend(h):
            return self.dropout2(self.cross_attn(h, memory, memory, memory_key_padding_mask, causal=memory_is_causal,
                                                 attn_mask=_torch_mask(memory_mask)))

        def feed(h):
            return self.dropout3(self.ffn(h))
        x = tgt
        if self.norm_first:
            x = x + self_attend(self.norm1(x))
            x = x + cross_attend(self.norm2(x))
            return x + feed(self.norm3(x))
        x = self.norm1(x + self_attend(x))
        x = self.norm2(x + cross_attend(x))
        return self.norm3(x + feed(x))


class Encoder(Module):
    """``num_layers`` encoder layers, and a last norm where asked (``final_norm``; by default pre-LN
    stacks have one, post-LN ones, the paper's, end normalized already).  ``forward`` takes the
    arguments of ``torch.nn.TransformerEncoder``."""

    def __init__(self, num_layers, d_model, num_heads, d_ff, activation="relu", norm_first=False,
                 eps=1e-5, final_norm: bool | None = None, dropout=0.0):
        super().__init__()
        self.layers = ModuleList(EncoderLayer(d_model, num_heads, d_ff, activation, norm_first, eps, dropout)
                                 for _ in range(num_layers))
        self.norm = LayerNorm(d_model, eps) if (norm_first if final_norm is None else final_norm) else None

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=False):
        x = src
        for layer in self.layers:
            x = layer(x, mask, src_key_padding_mask, is_causal)
        return self.norm(x) if self.norm is not None else x


class Decoder(Module):
    """``num_layers`` decoder layers and a last norm (as ``Encoder``); ``forward`` takes the arguments of
    ``torch.nn.TransformerDecoder``."""

    def __init__(self, num_layers, d_model, num_heads, d_ff, activation="relu", norm_first=False,
                 eps=1e-5, final_norm: bool | None = None, dropout=0.0):
        super().__init__()
        self.layers = ModuleList(DecoderLayer(d_model, num_heads, d_ff, activation, norm_first, eps, dropout)
                                 for _ in range(num_layers))
        self.norm = LayerNorm(d_model, eps) if (norm_first if final_norm is None else final_norm) else None

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
        x = tgt
        for layer in self.layers:
            x = layer(x, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                      tgt_is_causal, memory_is_causal)
        return self.norm(x) if self.norm is not None else x


class Transformer(Module):
    """``torch.nn.Transformer`` in the DSL: the same arguments, the same meaning, the same parameters
    (``attngraph.weights.from_torch_transformer`` loads its state dict).  As PyTorch's, both stacks end
    in a layer norm (also post-LN ones), ``batch_first=False`` means (seq, batch, d_model) inputs and
    output, and a bool mask is True where attention is not allowed.  ``dropout`` applies in training
    (``train()``) where PyTorch's layers apply it, but for the attention probabilities."""

    def __init__(self, d_model=512, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=2048,
                 dropout=0.1, activation="relu", layer_norm_eps=1e-5, batch_first=False, norm_first=False):
        super().__init__()
        self.d_model, self.nhead, self.batch_first = d_model, nhead, batch_first
        self.encoder = Encoder(num_encoder_layers, d_model, nhead, dim_feedforward, activation, norm_first,
                               layer_norm_eps, final_norm=True, dropout=dropout)
        self.decoder = Decoder(num_decoder_layers, d_model, nhead, dim_feedforward, activation, norm_first,
                               layer_norm_eps, final_norm=True, dropout=dropout)

    def forward(self, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, src_key_padding_mask=None,
                tgt_key_padding_mask=None, memory_key_padding_mask=None, src_is_causal=False, tgt_is_causal=False,
                memory_is_causal=False):
        if not self.batch_first:  # (seq, batch, d) as PyTorch's default
            src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
        memory = self.encoder(src, src_mask, src_key_padding_mask, src_is_causal)
        out = self.decoder(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                           tgt_is_causal, memory_is_causal)
        return out if self.batch_first else out.transpose(0, 1)

    @staticmethod
    def generate_square_subsequent_mask(sz):
        """The causal mask of ``sz`` positions as PyTorch's: 0.0 where allowed, -inf above the diagonal
        (``sz`` may be a symbolic dim)."""
        return F.where(causal_mask(sz, sz), 0.0, NEG_INF)


__all__ = ["Linear", "Embedding", "LayerNorm", "RMSNorm", "SinusoidalPositionalEncoding", "LearnedPositionalEmbedding",
           "MultiHeadAttention", "FeedForward", "EncoderLayer", "DecoderLayer", "Encoder", "Decoder", "Transformer",
           "causal_mask", "sinusoidal_table", "TensorOps"]
