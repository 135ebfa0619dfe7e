"""Transformer layers, written as a user would: plain ops, no fusion by hand.

Conventions: ``Linear.weight`` is stored ``(in_features, out_features)`` so ``y = x @ W + b``
(PyTorch stores the transpose; ``attngraph.weights`` maps between the two).  Attention writes the
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
        inv = F.const(np.power(10000.0, -np.arange(0, d, 2) / d).astype(np.float32), name="inv_freq")
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
        """``key_padding_mask``: bool (batch, k_len), True at padding (as PyTorch).  ``attn_mask``:
        an additive float mask broadcastable to (batch, heads, q_len, k_len)."""
        b, q_len, _ = query.shape
        k_len = key.shape[1]
        q = self.split_heads(self.q_proj(query))
        k = self.split_heads(self.k_proj(key))
        v = self.split_heads(self.v_proj(value))
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        if attn_mask is not None:
            scores = scores + attn_mask
        if causal:
            scores = F.where(causal_mask(q_len, k_len, causal_offset), scores, NEG_INF)
        if key_padding_mask is not None:
            scores = F.where(key_padding_mask[:, None, None, :], NEG_INF, scores)
        attn = F.softmax(scores, axis=-1)
        out = (attn @ v).permute(0, 2, 1, 3).reshape(b, q_len, self.d_model)
        return self.out_proj(out)


class FeedForward(Module):
    def __init__(self, d_model: int, d_ff: int, activation: str = "relu"):
        super().__init__()
        if activation not in ("relu", "gelu", "gelu_tanh"):
            raise ValueError(f"activation must be relu, gelu or gelu_tanh, got {activation!r}")
        self.activation = activation
        self.linear1 = Linear(d_model, d_ff)
        self.linear2 = Linear(d_ff, d_model)

    def forward(self, x):
        h = self.linear1(x)
        if self.activation == "relu":
            h = F.relu(h)
        else:
            h = F.gelu(h, "tanh" if self.activation == "gelu_tanh" else "none")
        return self.linear2(h)


class EncoderLayer(Module):
    """Self-attention and feed-forward, each with a residual; post-LN (the paper) or pre-LN."""

    def __init__(self, d_model, num_heads, d_ff, activation="relu", norm_first=False, eps=1e-5):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads)
        self.ffn = FeedForward(d_model, d_ff, activation)
        self.norm1 = LayerNorm(d_model, eps)
        self.norm2 = LayerNorm(d_model, eps)

    def forward(self, x, key_padding_mask=None):
        if self.norm_first:
            h = self.norm1(x)
            x = x + self.self_attn(h, h, h, key_padding_mask)
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.self_attn(x, x, x, key_padding_mask))
        return self.norm2(x + self.ffn(x))


class DecoderLayer(Module):
    """Causal self-attention, cross-attention over the encoder memory, feed-forward."""

    def __init__(self, d_model, num_heads, d_ff, activation="relu", norm_first=False, eps=1e-5):
        super().__init__()
        self.norm_first = norm_first
        self.self_attn = MultiHeadAttention(d_model, num_heads)
        self.cross_attn = MultiHeadAttention(d_model, num_heads)
        self.ffn = FeedForward(d_model, d_ff, activation)
        self.norm1 = LayerNorm(d_model, eps)
        self.norm2 = LayerNorm(d_model, eps)
        self.norm3 = LayerNorm(d_model, eps)

    def forward(self, x, memory, memory_key_padding_mask=None, tgt_key_padding_mask=None):
        if self.norm_first:
            h = self.norm1(x)
            x = x + self.self_attn(h, h, h, tgt_key_padding_mask, causal=True)
            x = x + self.cross_attn(self.norm2(x), memory, memory, memory_key_padding_mask)
            return x + self.ffn(self.norm3(x))
        x = self.norm1(x + self.self_attn(x, x, x, tgt_key_padding_mask, causal=True))
        x = self.norm2(x + self.cross_attn(x, memory, memory, memory_key_padding_mask))
        return self.norm3(x + self.ffn(x))


class Encoder(Module):
    def __init__(self, num_layers, d_model, num_heads, d_ff, activation="relu", norm_first=False,
                 eps=1e-5, final_norm: bool | None = None):
        super().__init__()
        self.layers = ModuleList(EncoderLayer(d_model, num_heads, d_ff, activation, norm_first, eps)
                                 for _ in range(num_layers))
        # Pre-LN stacks need a last norm; post-LN ones (the paper) end normalized already.
        self.norm = LayerNorm(d_model, eps) if (norm_first if final_norm is None else final_norm) else None

    def forward(self, x, key_padding_mask=None):
        for layer in self.layers:
            x = layer(x, key_padding_mask)
        return self.norm(x) if self.norm is not None else x


class Decoder(Module):
    def __init__(self, num_layers, d_model, num_heads, d_ff, activation="relu", norm_first=False,
                 eps=1e-5, final_norm: bool | None = None):
        super().__init__()
        self.layers = ModuleList(DecoderLayer(d_model, num_heads, d_ff, activation, norm_first, eps)
                                 for _ in range(num_layers))
        self.norm = LayerNorm(d_model, eps) if (norm_first if final_norm is None else final_norm) else None

    def forward(self, x, memory, memory_key_padding_mask=None, tgt_key_padding_mask=None):
        for layer in self.layers:
            x = layer(x, memory, memory_key_padding_mask, tgt_key_padding_mask)
        return self.norm(x) if self.norm is not None else x


__all__ = ["Linear", "Embedding", "LayerNorm", "SinusoidalPositionalEncoding", "LearnedPositionalEmbedding",
           "MultiHeadAttention", "FeedForward", "EncoderLayer", "DecoderLayer", "Encoder", "Decoder",
           "causal_mask", "sinusoidal_table", "TensorOps"]
