"""Functions over traced tensors (``import attngraph.nn.functional as F``)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..ir.dims import Dim
from .tensor import Tensor, as_tensor, current_tracer


def _emit(op, operands, **attrs) -> Tensor:
    ts = [as_tensor(o) for o in operands]
    return current_tracer().emit(op, ts, attrs)


def softmax(x, axis: int = -1, *, dim: int | None = None) -> Tensor:
    """Softmax along ``axis`` (``dim=``, PyTorch's spelling, works too)."""
    return _emit("softmax", [x], axis=axis if dim is None else dim)


def log_softmax(x, axis: int = -1, *, dim: int | None = None) -> Tensor:
    return _emit("log_softmax", [x], axis=axis if dim is None else dim)


def layer_norm(x, weight, bias, eps: float = 1e-5) -> Tensor:
    return _emit("layer_norm", [x, weight, bias], eps=float(eps))


def gelu(x, approximate: str = "none") -> Tensor:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    return _emit("gelu", [x], approximate=approximate)


def relu(x) -> Tensor: return _emit("relu", [x])
def erf(x) -> Tensor: return _emit("erf", [x])
def tanh(x) -> Tensor: return _emit("tanh", [x])
def exp(x) -> Tensor: return _emit("exp", [x])
def sqrt(x) -> Tensor: return _emit("sqrt", [x])
def rsqrt(x) -> Tensor: return _emit("rsqrt", [x])
def sin(x) -> Tensor: return _emit("sin", [x])
def cos(x) -> Tensor: return _emit("cos", [x])


def matmul(a, b) -> Tensor:
    return _emit("matmul", [a, b])


def where(cond, a, b) -> Tensor:
    """``cond ? a : b``; a Python scalar takes the other branch's dtype."""
    if isinstance(a, (int, float)) and not isinstance(b, (int, float)):
        a = as_tensor(a, like=as_tensor(b))
    if isinstance(b, (int, float)) and not isinstance(a, (int, float)):
        b = as_tensor(b, like=as_tensor(a))
    return _emit("where", [cond, a, b])


def concat(xs: Sequence, axis: int) -> Tensor:
    return _emit("concat", list(xs), axis=axis)


def gather(table, indices) -> Tensor:
    """``table[indices]`` along axis 0 (an embedding lookup)."""
    return _emit("gather", [table, indices])


def cast(x, dtype: str) -> Tensor:
    return _emit("cast", [x], dtype=dtype)


def arange(n: Dim, dtype: str = "int64") -> Tensor:
    """0..n-1; ``n`` may be a symbolic dim such as ``x.shape[1]``."""
    return current_tracer().emit("arange", (), {"n": n, "dtype": dtype})


def const(value, dtype: str | None = None, name: str | None = None) -> Tensor:
    value = np.asarray(value)
    if dtype is not None:
        value = value.astype(dtype)
    return current_tracer().emit("const", (), {"value": value}, name=name)


def update_slice(cache, value, offset, axis: int) -> Tensor:
    """``cache`` with ``value`` written at ``offset`` (an int64 scalar tensor) along ``axis``."""
    return _emit("update_slice", [cache, value, offset], axis=axis)


def causal_mask(q_len, k_len, offset=None) -> Tensor:
    """True where query i may attend key j: j <= i (+ offset, the number of earlier positions)."""
    q = arange(q_len)
    if offset is not None:
        q = q + offset
    return arange(k_len)[None, :] <= q[:, None]


def scaled_dot_product_attention(query, key, value, attn_mask=None, is_causal: bool = False,
                                 scale: float | None = None) -> Tensor:
    """``softmax(query @ keyᵀ · scale + mask) @ value`` over the last two axes, as PyTorch's
    ``torch.nn.functional.scaled_dot_product_attention`` (without dropout): ``scale`` defaults to
    1/sqrt(head dim); a bool ``attn_mask`` is True where a query may attend a key, a float one is
    added to the scores; ``is_causal``: query i attends keys 0..i.  Written as the plain ops, which
    the optimizer fuses (``-O3``: one ``fused_attention``)."""
    query, key, value = as_tensor(query), as_tensor(key), as_tensor(value)
    head_dim = query.shape[-1]
    if scale is None:
        if not isinstance(head_dim, int):
            raise ValueError(f"scaled_dot_product_attention: the head dim {head_dim!r} is symbolic; give scale=")
        scale = 1.0 / math.sqrt(head_dim)
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: give attn_mask or is_causal, not both (as PyTorch)")
    scores = (query @ key.transpose(-2, -1)) * float(scale)
    if attn_mask is not None:
        mask = as_tensor(attn_mask)
        scores = where(mask, scores, float("-inf")) if mask.dtype == "bool" else scores + mask
    if is_causal:
        scores = where(causal_mask(query.shape[-2], key.shape[-2]), scores, float("-inf"))
    return softmax(scores, axis=-1) @ value
