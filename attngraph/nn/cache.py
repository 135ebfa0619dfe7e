"""Attention over a key/value cache: the pieces of a decode step.

A decode step feeds a few new tokens (usually one) through a decoder whose earlier keys and values
are kept in a cache of ``CACHE`` positions (a symbolic size: the caller allocates as many as it needs,
and grows them as decoding goes on), laid out ``(batch, CACHE, heads, head_dim)``: the layout the K/V
projections produce with a reshape alone, so writing the new entries is a contiguous ``update_slice``
along axis 1 and the fused attention reads the cache directly (``layout='bshd'``, no transpose).  The
query attends over the whole cache with a keep mask ``key_position <= pos + query_index``, so a step
costs what its cache holds, not the longest length the model allows.  Entries not yet written are
masked out; they must hold finite numbers (zeros) because ``0 * NaN`` would still be NaN.

The functions here take the model's own ``MultiHeadAttention`` / ``DecoderLayer`` modules and
call their projections, so a cached decoder has exactly the parameter names of the full model and
the same weights serve both.  They are written the way ``MultiHeadAttention.forward`` writes
attention (head split by reshape -> transpose, ``(q @ k^T) * (1/sqrt(d))``, mask, softmax), so
the passes fuse them the same way.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

from ..ir import TensorType
from . import functional as F
from .layers import NEG_INF, DecoderLayer, MultiHeadAttention, causal_mask
from .module import Module
from .spec import InputSpec
from .tensor import current_tracer


@contextmanager
def _scope(module: Module):
    """Record the ops emitted inside as belonging to ``module`` (as its ``__call__`` would), so the
    printed graph and the passes that group by module (projection merging) see the same scopes
    as in the full model."""
    tracer = current_tracer()
    tracer.scope.append(tracer.module_names.get(id(module), ""))
    try:
        yield
    finally:
        tracer.scope.pop()


#: The symbolic number of positions a self-attention cache holds (the decode step's key length).
CACHE = "cache"


def cache_type(attn: MultiHeadAttention, length=CACHE, batch="batch", dtype: str = "float32") -> TensorType:
    """The type of one K (or V) cache of ``attn``: ``(batch, length, heads, head_dim)``."""
    return TensorType((batch, length, attn.num_heads, attn.head_dim), dtype)


def project_kv(attn: MultiHeadAttention, x):
    """``attn``'s keys and values of ``x`` (batch, len, d) in the cache layout (batch, len, heads, head_dim)."""
    with _scope(attn):
        b, length, _ = x.shape
        shape = (b, length, attn.num_heads, attn.head_dim)
        return attn.k_proj(x).reshape(shape), attn.v_proj(x).reshape(shape)


def attend(attn: MultiHeadAttention, query, keys, values, keep_mask=None, key_padding_mask=None):
    """``attn`` with its query projection on ``query`` (batch, q_len, d) against keys and values already
    projected, in the cache layout (batch, k_len, heads, head_dim).  ``keep_mask`` (bool, broadcast to
    (q_len, k_len)) is True where a query may attend; ``key_padding_mask`` (batch, k_len) True at padding."""
    with _scope(attn):
        b, q_len, _ = query.shape
        q = attn.split_heads(attn.q_proj(query))
        k = keys.permute(0, 2, 1, 3)
        v = values.permute(0, 2, 1, 3)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(attn.head_dim))
        if keep_mask is not None:
            scores = F.where(keep_mask, scores, NEG_INF)
        if key_padding_mask is not None:
            scores = F.where(key_padding_mask[:, None, None, :], NEG_INF, scores)
        weights = F.softmax(scores, axis=-1)
        out = (weights @ v).permute(0, 2, 1, 3).reshape(b, q_len, attn.d_model)
        return attn.out_proj(out)


def self_attention_step(attn: MultiHeadAttention, x, pos, k_cache, v_cache):
    """Causal self-attention of the new positions ``x`` (batch, t, d), at positions ``pos .. pos+t-1``
    (``pos`` an int64 scalar tensor), over the cache.  Returns (output, updated K cache, updated V cache)."""
    k, v = project_kv(attn, x)
    k_cache = F.update_slice(k_cache, k, pos, axis=1)
    v_cache = F.update_slice(v_cache, v, pos, axis=1)
    keep = causal_mask(x.shape[1], k_cache.shape[1], pos)
    return attend(attn, x, k_cache, v_cache, keep_mask=keep), k_cache, v_cache


def decoder_layer_step(layer: DecoderLayer, x, pos, k_cache, v_cache, cross_k, cross_v, memory_padding=None):
    """``DecoderLayer.forward`` for the new positions ``x`` with the self-attention cache and the
    cross-attention keys/values precomputed from the memory.  Returns (x, K cache, V cache)."""
    with _scope(layer):
        if layer.norm_first:
            a, k_cache, v_cache = self_attention_step(layer.self_attn, layer.norm1(x), pos, k_cache, v_cache)
            x = x + a
            x = x + attend(layer.cross_attn, layer.norm2(x), cross_k, cross_v, key_padding_mask=memory_padding)
            return x + layer.ffn(layer.norm3(x)), k_cache, v_cache
        a, k_cache, v_cache = self_attention_step(layer.self_attn, x, pos, k_cache, v_cache)
        x = layer.norm1(x + a)
        x = layer.norm2(x + attend(layer.cross_attn, x, cross_k, cross_v, key_padding_mask=memory_padding))
        return layer.norm3(x + layer.ffn(x)), k_cache, v_cache


def cache_names(num_layers: int) -> list[tuple[str, str]]:
    """The (K, V) input/output names of each layer's self-attention cache: ``cache.0.k``, ``cache.0.v``, ..."""
    return [(f"cache.{i}.k", f"cache.{i}.v") for i in range(num_layers)]


class Reorder(Module):
    """The entry that reorders (or repeats) rows of state tensors along the batch axis:
    ``out[name] = state[name][indices]``.  Beam search uses it to follow the surviving beams, and
    to repeat each source's state once per beam, where the state lives (on the device when compiled)."""

    def __init__(self, types: dict[str, TensorType], name: str = "reorder"):
        super().__init__()
        if not types:
            raise ValueError("Reorder needs at least one state tensor")
        self.types, self.name = dict(types), name

    def input_specs(self):
        specs = {"indices": InputSpec(("rows",), "int64", kind="indices")}
        specs.update({n: InputSpec(t.shape, t.dtype) for n, t in self.types.items()})
        return specs

    def default_dims(self):
        symbols = {d for t in self.types.values() for d in t.shape if isinstance(d, str)}
        return {"rows": 2, **{d: 2 for d in symbols}}

    def forward(self, indices, **state):
        return {n: F.gather(state[n], indices) for n in self.types}


__all__ = ["CACHE", "cache_type", "project_kv", "attend", "self_attention_step", "decoder_layer_step", "cache_names", "Reorder"]
