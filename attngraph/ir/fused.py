"""Fused ops: created only by passes, each with reference semantics so the interpreter runs the
graph at every stage of the pipeline.  Backends lower them to single kernels.

Masks (``mask_kinds``, one per mask operand, applied in order to the scaled scores ``s``):
``additive``: ``s + m`` (float); ``keep``: ``where(m, s, -inf)`` (bool, True = attend);
``drop``: ``where(m, -inf, s)`` (bool, True = masked out, as PyTorch's key_padding_mask).
Every mask broadcasts against the scores, shape (batch, heads, q_len, k_len).
"""

from __future__ import annotations

import numpy as np

from . import ops as O
from .ops import FUSED, ShapeError, broadcast_shapes, op
from .types import TensorType

MASK_KINDS = ("additive", "keep", "drop")
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh")


def _activate(y, activation):
    if activation == "relu":
        return np.maximum(y, 0).astype(y.dtype)
    if activation in ("gelu", "gelu_tanh"):
        return O.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
    return y


def _infer_linear(types, attrs):
    if len(types) not in (2, 3):
        raise ShapeError(f"linear takes x, weight and an optional bias, got {len(types)} operands")
    x, w = types[0], types[1]
    if attrs.get("activation", "none") not in ACTIVATIONS:
        raise ShapeError(f"unknown activation {attrs['activation']!r}")
    if w.rank != 2 or x.rank < 1 or x.shape[-1] != w.shape[0]:
        raise ShapeError(f"linear needs x (..., K) and weight (K, N), got {x} and {w}")
    if len(types) == 3 and types[2].shape != (w.shape[1],):
        raise ShapeError(f"linear bias must have shape ({w.shape[1]},), got {types[2]}")
    return TensorType(x.shape[:-1] + (w.shape[1],), O._same_dtype(types))


@op("linear", FUSED, None, _infer_linear, activation="none")
def linear(x, w, b=None, *, activation="none"):
    """activation(x @ w + b): a matmul with its bias and activation as epilogue."""
    y = np.matmul(x, w)
    if b is not None:
        y = y + b
    return _activate(y, activation)


def _infer_linear_packed(types, attrs):
    if len(types) not in (2, 3):
        raise ShapeError(f"linear_packed takes x, packed weight and an optional bias, got {len(types)} operands")
    x, w = types[0], types[1]
    n = attrs["n"]
    if attrs.get("activation", "none") not in ACTIVATIONS:
        raise ShapeError(f"unknown activation {attrs['activation']!r}")
    if w.rank != 3 or x.rank < 1 or x.shape[-1] != w.shape[1] or not isinstance(n, int) \
            or not (w.shape[0] - 1) * w.shape[2] < n <= w.shape[0] * w.shape[2]:
        raise ShapeError(f"linear_packed needs x (..., K) and weight panels (ceil(n/w), K, w) for n={n}, "
                         f"got {x} and {w}")
    if len(types) == 3 and types[2].shape != (n,):
        raise ShapeError(f"linear_packed bias must have shape ({n},), got {types[2]}")
    # The weight may be stored narrower than x (float16 panels); the product is computed in x's dtype.
    if not w.is_float or np.dtype(w.dtype).itemsize > np.dtype(x.dtype).itemsize:
        raise ShapeError(f"linear_packed weight {w} must be a float no wider than x {x}")
    return TensorType(x.shape[:-1] + (n,), O._same_dtype([x] + list(types[2:])))


@op("linear_packed", FUSED, None, _infer_linear_packed, activation="none", n=None)
def linear_packed(x, w, b=None, *, activation="none", n=None):
    """``linear`` over a weight in column panels (``pack_panels``): the CPU target's layout."""
    panels, k, width = w.shape
    return linear(x, w.transpose(1, 0, 2).reshape(k, panels * width)[:, :n].astype(x.dtype), b, activation=activation)


def _infer_add_layer_norm(types, attrs):
    a, b, gamma, beta = types
    s = O.infer_binary([a, b], attrs)
    if s.shape != a.shape:
        raise ShapeError(f"add_layer_norm: the residual {b} must not broadcast {a} to a larger shape")
    return O._infer_layer_norm([s, gamma, beta], attrs)


@op("add_layer_norm", FUSED, 4, _infer_add_layer_norm, eps=1e-5)
def add_layer_norm(a, b, gamma, beta, *, eps=1e-5):
    """layer_norm(a + b): the residual add folded into the norm."""
    return O.layer_norm(a + b, gamma, beta, eps=eps)


def _check_masks(types, attrs, scores_shape):
    kinds = tuple(attrs.get("mask_kinds", ()))
    if len(kinds) != len(types):
        raise ShapeError(f"{len(types)} mask operand(s) but mask_kinds {kinds}")
    for kind, t in zip(kinds, types):
        if kind not in MASK_KINDS:
            raise ShapeError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")
        if (kind == "additive") == (t.dtype == "bool"):
            raise ShapeError(f"a {kind} mask cannot be {t.dtype}")
        if broadcast_shapes(t.shape, scores_shape) != tuple(scores_shape):
            raise ShapeError(f"mask {t} does not broadcast to the scores ({', '.join(map(str, scores_shape))})")


def apply_masks(s, masks, kinds):
    for m, kind in zip(masks, kinds):
        if kind == "additive":
            s = s + m
        elif kind == "keep":
            s = np.where(m, s, -np.inf)
        else:
            s = np.where(m, -np.inf, s)
    return s


def _infer_sms(types, attrs):
    x = O.infer_unary(types[:1], attrs)
    _check_masks(types[1:], attrs, x.shape)
    return x


@op("scaled_masked_softmax", FUSED, None, _infer_sms, scale=1.0, mask_kinds=())
def scaled_masked_softmax(x, *masks, scale=1.0, mask_kinds=()):
    """softmax(masks(x * scale)) over the last axis."""
    s = apply_masks(x * np.asarray(scale, x.dtype), masks, mask_kinds)
    return O.softmax(s.astype(x.dtype, copy=False), axis=-1)


def _head_window(attrs) -> tuple | None:
    """``heads`` = (n, q0, k0, v0): q, k and v are read at heads [q0, q0 + n), [k0, k0 + n) and
    [v0, v0 + n) of their head axis (all three may be one tensor: a merged QKV projection viewed as
    (batch, seq, 3 x heads, dim), read without slicing it apart); () reads every head."""
    heads = tuple(attrs.get("heads", ()))
    if not heads:
        return None
    if len(heads) != 4 or not all(isinstance(v, int) and v >= 0 for v in heads) or heads[0] < 1:
        raise ShapeError(f"fused_attention: heads must be (n, q0, k0, v0) of non-negative ints, n >= 1, got {heads}")
    return heads


def _infer_attention(types, attrs):
    if len(types) < 3:
        raise ShapeError("fused_attention takes q, k, v and optional masks")
    q, k, v = types[:3]
    layout = attrs.get("layout", "bhsd")
    if layout not in ("bhsd", "bshd"):
        raise ShapeError(f"unknown layout {layout!r}")
    if not (q.rank == k.rank == v.rank == 4):
        raise ShapeError(f"q, k, v must have rank 4, got {q}, {k}, {v}")
    if layout == "bshd":  # (batch, seq, heads, dim)
        (b, lq, h, d), (bk, lk, hk, dk), (bv, lv, hv, dv) = q.shape, k.shape, v.shape
    else:                 # (batch, heads, seq, dim)
        (b, h, lq, d), (bk, hk, lk, dk), (bv, hv, lv, dv) = q.shape, k.shape, v.shape
    window = _head_window(attrs)
    if window is not None:
        n = window[0]
        for name, total, start in (("q", h, window[1]), ("k", hk, window[2]), ("v", hv, window[3])):
            if not isinstance(total, int) or start + n > total:
                raise ShapeError(f"fused_attention: heads {window} reads {name} heads [{start}, {start + n}) "
                                 f"of {total}")
        h = hk = hv = n
    if (b, h) != (bk, hk) or (b, h) != (bv, hv) or d != dk or lk != lv:
        raise ShapeError(f"q {q}, k {k}, v {v} do not fit together in layout {layout}")
    _check_masks(types[3:], attrs, (b, h, lq, lk))
    shape = (b, lq, h, dv) if layout == "bshd" else (b, h, lq, dv)
    return TensorType(shape, O._same_dtype(types[:3]))


@op("fused_attention", FUSED, None, _infer_attention, scale=1.0, mask_kinds=(), layout="bhsd", heads=())
def fused_attention(q, k, v, *masks, scale=1.0, mask_kinds=(), layout="bhsd", heads=()):
    """softmax(masks(q @ k^T * scale)) @ v in one op.  ``layout`` ``bhsd`` has q, k, v and the result
    as (batch, heads, seq, dim); ``bshd`` as (batch, seq, heads, dim), the layout projections
    produce without any transpose.  ``heads`` (n, q0, k0, v0): read n heads of each from q0, k0, v0."""
    if heads:
        n, q0, k0, v0 = heads
        axis = 2 if layout == "bshd" else 1
        q, k, v = (np.take(t, range(start, start + n), axis=axis) for t, start in ((q, q0), (k, k0), (v, v0)))
    if layout == "bshd":
        q, k, v = (np.swapaxes(t, 1, 2) for t in (q, k, v))
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * np.asarray(scale, q.dtype)
    p = O.softmax(apply_masks(s, masks, mask_kinds).astype(q.dtype, copy=False), axis=-1)
    out = np.matmul(p, v)
    return np.swapaxes(out, 1, 2) if layout == "bshd" else out
