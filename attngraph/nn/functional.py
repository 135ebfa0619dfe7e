"""Functions over traced tensors (``import attngraph.nn.functional as F``)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..ir.dims import Dim
from .tensor import Tensor, as_tensor, current_tracer


def _emit(op, operands, **attrs) -> Tensor:
    ts = [as_tensor(o) for o in operands]
    return current_tracer().emit(op, ts, attrs)


def softmax(x, axis: int = -1) -> Tensor:
    return _emit("softmax", [x], axis=axis)


def log_softmax(x, axis: int = -1) -> Tensor:
    return _emit("log_softmax", [x], axis=axis)


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
