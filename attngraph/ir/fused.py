"""Fused ops: created only by passes, each with reference semantics so the interpreter runs the
graph at every stage of the pipeline.  Backends lower them to single kernels.

Masks (``mask_kinds``, one per mask operand, applied in order to the scaled scores ``s``):
``additive``: ``s + m`` (float); ``keep``: ``where(m, s, fill)`` (bool, True = attend);
``drop``: ``where(m, fill, s)`` (bool, True = masked out, as PyTorch's key_padding_mask).  ``fill``
is the mask's entry of ``mask_fills`` (-inf where there is none): ``masked_fill(pad, -1e9)`` keeps
its -1e9, so a fully masked row is uniform, as in PyTorch, where -inf makes it NaN.  Every mask
broadcasts against the scores, shape (batch, heads, q_len, k_len).  ``apply_masks`` is that
definition, written once for NumPy arrays, tensor expressions and kernel source alike.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from . import ops as O
from .ops import FUSED, ShapeError, broadcast_shapes, derivative, op
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


@op("linear", FUSED, None, _infer_linear, flops=O.contraction_flops, activation="none")
def linear(x, w, b=None, *, activation="none"):
    """activation(x @ w + b): a matmul with its bias and activation as epilogue."""
    y = np.matmul(x, w)
    if b is not None:
        y = y + b
    return _activate(y, activation)


_ACTIVATION_VJP = {
    "relu": lambda d, pre, cot: d("where", d("gt", pre, d.const(0.0, pre)), cot, d.const(0.0, pre)),
    "gelu": lambda d, pre, cot: O.REGISTRY["gelu"].vjp(d, _Attrs(approximate="none"), [pre], None, cot)[0],
    "gelu_tanh": lambda d, pre, cot: O.REGISTRY["gelu"].vjp(d, _Attrs(approximate="tanh"), [pre], None, cot)[0],
}


class _Attrs:
    """A node's attributes alone, for a derivative rule called on a value the graph does not hold."""

    def __init__(self, **attrs):
        self.attrs = attrs


@derivative("linear")
def _linear_vjp(d, n, xs, out, cot):
    """Through the activation (its input recomputed without it), then d x = g W^T, d W = x^T g over every
    leading dim of x, d b = the sum of g over them."""
    x, w = xs[0], xs[1]
    activation = n.attrs["activation"]
    g = cot if activation == "none" else _ACTIVATION_VJP[activation](d, d("linear", *xs, activation="none"), cot)
    grads = [d("matmul", g, d("transpose", w, perm=(1, 0))), d("weight_grad", x, g)]
    if len(xs) == 3:
        grads.append(d("reduce_sum", g, axes=tuple(range(d.type(g).rank - 1))))
    return grads


def _infer_add_layer_norm(types, attrs):
    a, b, gamma, beta = types
    s = O.infer_binary([a, b], attrs)
    if s.shape != a.shape:
        raise ShapeError(f"add_layer_norm: the residual {b} must not broadcast {a} to a larger shape")
    return O._infer_layer_norm([s, gamma, beta], attrs)


@op("add_layer_norm", FUSED, 4, _infer_add_layer_norm, rows=True, eps=1e-5)
def add_layer_norm(a, b, gamma, beta, *, eps=1e-5):
    """layer_norm(a + b): the residual add folded into the norm."""
    return O.layer_norm(a + b, gamma, beta, eps=eps)


@derivative("add_layer_norm")
def _add_layer_norm_vjp(d, n, xs, out, cot):
    a, b, gamma, _ = xs
    dx, dgamma, dbeta = O.layer_norm_backward(d, d("add", a, b), gamma, cot, n.attrs["eps"])
    return [dx, d.sum_to(dx, b), dgamma, dbeta]


NEG_INF = float("-inf")


def mask_specs(attrs) -> list[tuple[str, float]]:
    """(kind, fill) of each mask operand, in the order they apply."""
    kinds = tuple(attrs.get("mask_kinds", ()))
    fills = tuple(attrs.get("mask_fills", ())) or (NEG_INF,) * len(kinds)
    return list(zip(kinds, fills))


def _infer_add_rms_norm(types, attrs):
    a, b, weight = types
    s = O.infer_binary([a, b], attrs)
    if s.shape != a.shape:
        raise ShapeError(f"add_rms_norm: the residual {b} must not broadcast {a} to a larger shape")
    return O._infer_rms_norm([s, weight], attrs)


@op("add_rms_norm", FUSED, 3, _infer_add_rms_norm, rows=True, eps=1e-6)
def add_rms_norm(a, b, weight, *, eps=1e-6):
    """rms_norm(a + b): the residual add folded into the norm."""
    return O.rms_norm(a + b, weight, eps=eps)


@derivative("add_rms_norm")
def _add_rms_norm_vjp(d, n, xs, out, cot):
    a, b, weight = xs
    dx, dweight = O.rms_norm_backward(d, d("add", a, b), weight, cot, n.attrs["eps"])
    return [dx, d.sum_to(dx, b), dweight]


def _check_masks(types, attrs, scores_shape):
    kinds, fills = tuple(attrs.get("mask_kinds", ())), tuple(attrs.get("mask_fills", ()))
    if len(kinds) != len(types):
        raise ShapeError(f"{len(types)} mask operand(s) but mask_kinds {kinds}")
    if fills and len(fills) != len(kinds):
        raise ShapeError(f"mask_fills {fills} must give one value per mask ({len(kinds)})")
    for (kind, fill), t in zip(mask_specs(attrs), types):
        if kind not in MASK_KINDS:
            raise ShapeError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")
        if (kind == "additive") == (t.dtype == "bool"):
            raise ShapeError(f"a {kind} mask cannot be {t.dtype}")
        if not isinstance(fill, (int, float)) or np.isnan(fill) or fill == np.inf:
            raise ShapeError(f"mask fill {fill!r} must be a number or -inf")
        if broadcast_shapes(t.shape, scores_shape) != tuple(scores_shape):
            raise ShapeError(f"mask {t} does not broadcast to the scores ({', '.join(map(str, scores_shape))})")


class MaskOps(NamedTuple):
    """The three operations masking needs, for one kind of value (NumPy arrays, TVM expressions,
    kernel source text): ``add(s, m)``, ``select(cond, a, b)``, ``const(number)``; ``truth(m)`` reads a
    bool mask as a condition (a mask stored as int32 compares with 0)."""
    add: Callable
    select: Callable
    const: Callable
    truth: Callable = lambda m: m


NUMPY = MaskOps(np.add, np.where, lambda v: v)


def apply_masks(s, masks, attrs, ops: MaskOps = NUMPY):
    """The scores ``s`` with every mask of ``attrs`` applied in order (the module docstring)."""
    for m, (kind, fill) in zip(masks, mask_specs(attrs)):
        if kind == "additive":
            s = ops.add(s, m)
        elif kind == "keep":
            s = ops.select(ops.truth(m), s, ops.const(fill))
        else:
            s = ops.select(ops.truth(m), ops.const(fill), s)
    return s


def _infer_sms(types, attrs):
    x = O.infer_unary(types[:1], attrs)
    _check_masks(types[1:], attrs, x.shape)
    return x


@op("scaled_masked_softmax", FUSED, None, _infer_sms, rows=True, scale=1.0, mask_kinds=(), mask_fills=())
def scaled_masked_softmax(x, *masks, scale=1.0, mask_kinds=(), mask_fills=()):
    """softmax(masks(x * scale)) over the last axis."""
    s = apply_masks(x * np.asarray(scale, x.dtype), masks, {"mask_kinds": mask_kinds, "mask_fills": mask_fills})
    return O.softmax(s.astype(x.dtype, copy=False), axis=-1)


def masked_softmax_backward(d, p, cot, masks, attrs, scale):
    """(d scores, d of each mask) of ``softmax(masks(scores * scale))`` with probabilities ``p``: the softmax's
    derivative, zero where a keep or drop mask replaced the score (its fill does not depend on it),
    times the scale; an additive mask takes the derivative before the scale."""
    ds = O.softmax_backward(d, p, cot)
    zero = d.const(0.0, ds)
    grads = []
    for m, (kind, _) in zip(masks, mask_specs(attrs)):
        if kind == "additive":
            grads.append(ds)
            continue
        grads.append(None)
        ds = d("where", m, ds, zero) if kind == "keep" else d("where", m, zero, ds)
    grads = [d.sum_to(g, m) if g is not None else None for g, m in zip(grads, masks)]
    return d("mul", ds, d.const(scale, ds)), grads


@derivative("scaled_masked_softmax")
def _sms_vjp(d, n, xs, out, cot):
    dx, dmasks = masked_softmax_backward(d, out, cot, xs[1:], n.attrs, n.attrs["scale"])
    return [dx, *dmasks]


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


class OperandView(NamedTuple):
    """How an attention kernel reads q, k or v at (batch, head, position, channel): the layout, a size-1
    batch or head axis broadcast (read at 0: multi-query attention's one key head, learned queries
    shared by a batch) and the first head of a head window.  ``attention_views`` makes them; every
    kernel indexes through ``index``, so the rule is written once."""
    layout: str
    batch_broadcast: bool
    head_broadcast: bool
    head_offset: int
    #: query heads per head of this operand (grouped-query attention: K and V with fewer heads, each read by
    #: ``head_group`` query heads in a row, as ``repeat_interleave`` / Hugging Face's ``repeat_kv`` spell it)
    head_group: int = 1

    def index(self, b, h, s, x, add=lambda a, b: a + b, div=lambda a, b: a // b) -> tuple:
        """The index of element (b, h, s, x); ``add`` adds the head offset, ``div`` divides by the head group
        (index expressions of any kind)."""
        b = 0 if self.batch_broadcast else b
        if self.head_broadcast:
            h = 0
        elif self.head_group > 1:
            h = div(h, self.head_group)
        elif self.head_offset:
            h = add(h, self.head_offset)
        return (b, s, h, x) if self.layout == "bshd" else (b, h, s, x)


def _split(t: TensorType, layout: str):
    """(batch, heads, seq, dim) of an attention operand in ``layout``."""
    b, x, y, d = t.shape
    return (b, y, x, d) if layout == "bshd" else (b, x, y, d)


def attention_views(in_types, out_type: TensorType, attrs) -> tuple[OperandView, OperandView, OperandView]:
    """The ``OperandView`` of q, k and v of a ``fused_attention`` with these operand and result types."""
    layout = attrs.get("layout", "bhsd")
    b, h, _, _ = _split(out_type, layout)
    window = _head_window(attrs)
    offsets = window[1:] if window else (0, 0, 0)
    views = []
    for t, offset in zip(in_types[:3], offsets):
        tb, th, _, _ = _split(t, layout)
        views.append(OperandView(layout, tb == 1 and b != 1, window is None and th == 1 and h != 1, offset,
                                 h // th if window is None and _grouped(h, th) else 1))
    return tuple(views)


def _grouped(heads, kv_heads) -> bool:
    """Whether an operand of ``kv_heads`` heads serves ``heads`` query heads in groups (neither one nor all)."""
    return (isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads not in (1, heads)
            and heads % kv_heads == 0)


def _infer_attention(types, attrs):
    if len(types) < 3:
        raise ShapeError("fused_attention takes q, k, v and optional masks")
    q, k, v = types[:3]
    layout = attrs.get("layout", "bhsd")
    if layout not in ("bhsd", "bshd"):
        raise ShapeError(f"unknown layout {layout!r}")
    if not (q.rank == k.rank == v.rank == 4):
        raise ShapeError(f"q, k, v must have rank 4, got {q}, {k}, {v}")
    (bq, hq, lq, d), (bk, hk, lk, dk), (bv, hv, lv, dv) = (_split(t, layout) for t in (q, k, v))
    window = _head_window(attrs)
    if window is not None:
        n = window[0]
        for name, total, start in (("q", hq, window[1]), ("k", hk, window[2]), ("v", hv, window[3])):
            if not isinstance(total, int) or start + n > total:
                raise ShapeError(f"fused_attention: heads {window} reads {name} heads [{start}, {start + n}) "
                                 f"of {total}")
        hq = hk = hv = n
    else:  # K and V with fewer heads, each serving a group of query heads
        hk, hv = (hq if _grouped(hq, x) else x for x in (hk, hv))
    try:  # batch and heads broadcast (size 1 against any), as the matmuls they replace do
        b, h = broadcast_shapes((bq, hq), (bk, hk), (bv, hv))
    except ShapeError:
        raise ShapeError(f"q {q}, k {k}, v {v} do not fit together in layout {layout}: batch and head axes "
                         f"must be equal or 1") from None
    if d != dk or lk != lv:
        raise ShapeError(f"q {q}, k {k}, v {v} do not fit together in layout {layout}")
    _check_masks(types[3:], attrs, (b, h, lq, lk))
    shape = (b, lq, h, dv) if layout == "bshd" else (b, h, lq, dv)
    return TensorType(shape, O._same_dtype(types[:3]))


def _attention_flops(attrs, in_shapes, out_shape) -> int:
    """Q K^T and P V: 2 x (scores) x head dim, 2 x (outputs) x keys."""
    lk = in_shapes[1][1] if attrs.get("layout") == "bshd" else in_shapes[1][2]
    size = int(np.prod(out_shape, dtype=np.int64))
    return 2 * size * int(lk) + 2 * size // int(out_shape[-1]) * int(lk) * int(in_shapes[0][-1])


@op("fused_attention", FUSED, None, _infer_attention, flops=_attention_flops, scale=1.0, mask_kinds=(), mask_fills=(),
    layout="bhsd", heads=())
def fused_attention(q, k, v, *masks, scale=1.0, mask_kinds=(), mask_fills=(), layout="bhsd", heads=()):
    """softmax(masks(q @ k^T * scale)) @ v in one op.  ``layout`` ``bhsd`` has q, k, v and the result
    as (batch, heads, seq, dim); ``bshd`` as (batch, seq, heads, dim), the layout projections
    produce without any transpose.  Batch and head axes of size 1 broadcast; k and v with a divisor of q's
    heads serve q's heads in groups (head j reads head j // group).  ``heads`` (n, q0, k0, v0): read n heads
    of each from q0, k0, v0."""
    if heads:
        n, q0, k0, v0 = heads
        axis = 2 if layout == "bshd" else 1
        q, k, v = (np.take(t, range(start, start + n), axis=axis) for t, start in ((q, q0), (k, k0), (v, v0)))
    if layout == "bshd":
        q, k, v = (np.swapaxes(t, 1, 2) for t in (q, k, v))
    k, v = (np.repeat(t, q.shape[1] // t.shape[1], axis=1) if _grouped(q.shape[1], t.shape[1]) else t for t in (k, v))
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * np.asarray(scale, q.dtype)
    s = apply_masks(s, masks, {"mask_kinds": mask_kinds, "mask_fills": mask_fills})
    out = np.matmul(O.softmax(s.astype(q.dtype, copy=False), axis=-1), v)
    return np.swapaxes(out, 1, 2) if layout == "bshd" else out


@derivative("fused_attention")
def _attention_vjp(d, n, xs, out, cot):
    """FlashAttention's backward: the probabilities are recomputed from q, k and each query row's
    log-sum-exp (``attention_lse``) inside the two gradient kernels, a block of rows at a time, never
    held as a (batch, heads, q_len, k_len) matrix; delta = rowsum(d out * out) is each row's
    sum(p * d p).  ``attention_grad_q`` walks the keys of each query row, ``attention_grad_kv`` the
    queries of each key row (FlashAttention-2 adds d q up across key blocks with atomics instead: two
    kernels here, as in its deterministic form and Triton's).  An additive mask whose gradient is
    wanted (a learned position bias) takes the scores' form: its gradient is that matrix."""
    attrs = n.attrs
    bshd = attrs.get("layout", "bhsd") == "bshd"
    heads = tuple(attrs.get("heads", ()))

    def layout(t):  # (batch, seq, heads, dim) <-> (batch, heads, seq, dim)
        return d("transpose", t, perm=(0, 2, 1, 3)) if bshd else t

    hq = _split(d.type(xs[0]), attrs.get("layout", "bhsd"))[1]

    def group_of(t) -> int:  # the query heads each head of operand t serves (grouped-query attention)
        th = _split(d.type(t), attrs.get("layout", "bhsd"))[1]
        return hq // th if not heads and _grouped(hq, th) else 1

    def bhsd(t, start):  # operand -> (batch, heads, seq, dim), a grouped operand's heads repeated
        if heads:
            t = d("slice", t, axis=2 if bshd else 1, start=start, stop=start + heads[0])
        group, t = group_of(t), layout(t)
        if group > 1:
            b, th, s, x = d.type(t).shape
            t = d("reshape", d("broadcast_to", d("reshape", t, shape=(b, th, 1, s, x)), shape=(b, th, group, s, x)),
                  shape=(b, th * group, s, x))
        return t

    def back(g, t, start):  # the cotangent of a (batch, heads, seq, dim) view, in operand t's own shape and layout
        group = group_of(t)
        if group > 1:  # summed over each group of query heads
            b, h, s, x = d.type(g).shape
            g = d("reshape", d("reduce_sum", d("reshape", g, shape=(b, h // group, group, s, x)), axes=(2,)),
                  shape=(b, h // group, s, x))
        g = layout(g)
        tt = d.type(t)
        if heads:  # into zeros of the whole operand, at the window's heads
            axis = 2 if bshd else 1
            window = tt.with_shape([heads[0] if a == axis else s for a, s in enumerate(tt.shape)])
            g = d.sum_to(g, window)
            offset = d.const(np.asarray(start, np.int64), None)
            return d("update_slice", d("broadcast_like", d.const(0.0, g), t), g, offset, axis=axis)
        return d.sum_to(g, tt)

    starts = heads[1:] if heads else (0, 0, 0)
    q, k, v = (bhsd(t, s) for t, s in zip(xs[:3], starts))
    masks = xs[3:]
    g = layout(cot)
    mask_attrs = {"scale": attrs["scale"], "mask_kinds": tuple(attrs["mask_kinds"]),
                  "mask_fills": tuple(attrs.get("mask_fills", ()))}
    # (q, k and v may be one tensor, windows of a merged projection: the transform adds their cotangents)
    if any(kind == "additive" and d.needs(m) for m, (kind, _) in zip(masks, mask_specs(attrs))):
        dq, dk, dv, dmasks = _attention_scores_backward(d, mask_attrs, q, k, v, g, masks)
    else:
        lse = d("attention_lse", q, k, *masks, **mask_attrs)
        delta = d("reduce_sum", d("mul", g, layout(out)), axes=(3,))
        dq = d("attention_grad_q", q, k, v, g, lse, delta, *masks, **mask_attrs)
        dkv = d("attention_grad_kv", q, k, v, g, lse, delta, *masks, **mask_attrs)
        e, ev = d.type(q).shape[3], d.type(v).shape[3]
        dk, dv = d("slice", dkv, axis=3, start=0, stop=e), d("slice", dkv, axis=3, start=e, stop=e + ev)
        dmasks = [None] * len(masks)
    return [back(dq, xs[0], starts[0]), back(dk, xs[1], starts[1]), back(dv, xs[2], starts[2])] + dmasks


def _attention_scores_backward(d, attrs, q, k, v, g, masks):
    """The backward through the (batch, heads, q_len, k_len) probabilities, recomputed by plain ops:
    d v = p^T g, d p = g v^T, d s through the masked softmax, d q = d s k, d k = d s^T q.  ``attrs``: the
    scale and the masks' kinds and fills."""
    p = d("scaled_masked_softmax", d("matmul", q, d.swap_last(k)), *masks, **attrs)
    dv = d("matmul", d.swap_last(p), g)
    ds, dmasks = masked_softmax_backward(d, p, d("matmul", g, d.swap_last(v)), masks, attrs, attrs["scale"])
    return d("matmul", ds, k), d("matmul", d.swap_last(ds), q), dv, dmasks


# -- the attention's backward kernels (made by its derivative) ---------------------------------------------

def _infer_attention_lse(types, attrs):
    if len(types) < 2 or any(t.rank != 4 for t in types[:2]):
        raise ShapeError(f"attention_lse takes q and k (batch, heads, seq, dim) and optional masks, got "
                         f"{', '.join(map(str, types[:2]))}")
    q, k = types[:2]
    try:
        b, h = broadcast_shapes(q.shape[:2], k.shape[:2])
    except ShapeError:
        raise ShapeError(f"attention_lse: q {q} and k {k} must have equal or size-1 batch and head axes") from None
    if q.shape[3] != k.shape[3]:
        raise ShapeError(f"attention_lse: q {q} and k {k} must have the same head dim")
    _check_masks(types[2:], attrs, (b, h, q.shape[2], k.shape[2]))
    return TensorType((b, h, q.shape[2]), O._same_dtype(types[:2]))


def _grad_operands(name, types, attrs):
    """(batch, heads, q_len, k_len, head dim, value head dim) of an attention gradient op's operands
    q, k, v, d out (batch, heads, seq, dim), lse and delta (batch, heads, q_len) and masks; q, k, v and
    lse may have batch or head axes of size 1 (broadcast), d out and delta have the result's."""
    if len(types) < 6 or any(t.rank != 4 for t in types[:4]) or any(t.rank != 3 for t in types[4:6]):
        raise ShapeError(f"{name} takes q, k, v, d out (batch, heads, seq, dim), lse and delta (batch, heads, "
                         f"q_len) and optional masks, got {', '.join(map(str, types[:6]))}")
    q, k, v, g, lse, delta = types[:6]
    b, h, lq, dv = g.shape
    e, lk = q.shape[3], k.shape[2]
    fits = all(_broadcasts_to(t.shape[:2], (b, h)) for t in (q, k, v)) and _broadcasts_to(lse.shape, (b, h, lq))
    if not fits or k.shape[3] != e or v.shape[2] != lk or v.shape[3] != dv or q.shape[2] != lq \
            or delta.shape != (b, h, lq):
        raise ShapeError(f"{name}: q {q}, k {k}, v {v}, d out {g}, lse {lse} and delta {delta} do not fit together")
    if not all(isinstance(x, int) for x in (e, dv)):
        raise ShapeError(f"{name}: the head dims must be static, got {e} and {dv}")
    _check_masks(types[6:], attrs, (b, h, lq, lk))
    O._same_dtype(types[:6])
    return b, h, lq, lk, e, dv


def _broadcasts_to(shape, to) -> bool:
    try:
        return broadcast_shapes(shape, to) == tuple(to)
    except ShapeError:
        return False


def _infer_grad_q(types, attrs):
    b, h, lq, _, e, _ = _grad_operands("attention_grad_q", types, attrs)
    return TensorType((b, h, lq, e), types[0].dtype)


def _infer_grad_kv(types, attrs):
    b, h, _, lk, e, dv = _grad_operands("attention_grad_kv", types, attrs)
    return TensorType((b, h, lk, e + dv), types[0].dtype)


def _lse_flops(attrs, in_shapes, out_shape) -> int:
    return 2 * int(np.prod(out_shape, dtype=np.int64)) * int(in_shapes[1][2]) * int(in_shapes[0][3])


def _grad_flops(key_dims: int, value_dims: int):
    """2 x (batch, heads, q_len, k_len) x the head dims summed over: the scores, d p and d q (``key_dims``
    2, ``value_dims`` 1); and d k, d v (2, 2)."""
    def flops(attrs, in_shapes, out_shape) -> int:
        b, h, lq, dv = (int(x) for x in in_shapes[3])
        return 2 * b * h * lq * int(in_shapes[1][2]) * (key_dims * int(in_shapes[0][3]) + value_dims * dv)
    return flops


def mask_score_grad(ds, masks, attrs, ops: MaskOps = NUMPY):
    """``ds`` (a cotangent of the masked scores, as the scores' shape) with 0 where a keep or drop mask
    replaced the score by its fill: the result does not depend on the score there."""
    zero = ops.const(0.0)
    for m, (kind, _) in zip(masks, mask_specs(attrs)):
        if kind == "keep":
            ds = ops.select(ops.truth(m), ds, zero)
        elif kind == "drop":
            ds = ops.select(ops.truth(m), zero, ds)
    return ds


def _scores(q, k, masks, attrs):
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * np.asarray(attrs["scale"], q.dtype)
    return apply_masks(s, masks, attrs).astype(q.dtype, copy=False)


def _probs_and_score_grad(q, k, v, g, lse, delta, masks, attrs):
    """p = exp(s - lse) and d s = p (d out v^T - delta) (0 where a mask replaced the score) times the scale."""
    p = np.exp(_scores(q, k, masks, attrs) - lse[..., None])
    ds = mask_score_grad(p * (np.matmul(g, np.swapaxes(v, -1, -2)) - delta[..., None]), masks, attrs)
    return p, ds * np.asarray(attrs["scale"], q.dtype)


@op("attention_lse", FUSED, None, _infer_attention_lse, flops=_lse_flops, scale=1.0, mask_kinds=(), mask_fills=())
def attention_lse(q, k, *masks, scale=1.0, mask_kinds=(), mask_fills=()):
    """log(sum(exp(masks(q @ k^T * scale)))) of each query row (batch, heads, q_len): the row statistic
    the attention's gradient kernels recompute the probabilities from."""
    s = _scores(q, k, masks, {"scale": scale, "mask_kinds": mask_kinds, "mask_fills": mask_fills})
    mx = np.max(s, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):  # a fully masked row (all -inf): NaN, as the attention's own
        return (mx + np.log(np.sum(np.exp(s - mx), axis=-1, keepdims=True)))[..., 0]


@op("attention_grad_q", FUSED, None, _infer_grad_q, flops=_grad_flops(2, 1), scale=1.0, mask_kinds=(), mask_fills=())
def attention_grad_q(q, k, v, g, lse, delta, *masks, scale=1.0, mask_kinds=(), mask_fills=()):
    """d q of ``fused_attention`` (in its (batch, heads, seq, dim) form) from its cotangent ``g``: d s k,
    where p = exp(masks(q k^T scale) - lse) and d s = p (g v^T - delta) scale (``_attention_vjp``)."""
    _, ds = _probs_and_score_grad(q, k, v, g, lse, delta, masks,
                                  {"scale": scale, "mask_kinds": mask_kinds, "mask_fills": mask_fills})
    return np.matmul(ds, k)


@op("attention_grad_kv", FUSED, None, _infer_grad_kv, flops=_grad_flops(2, 2), scale=1.0, mask_kinds=(), mask_fills=())
def attention_grad_kv(q, k, v, g, lse, delta, *masks, scale=1.0, mask_kinds=(), mask_fills=()):
    """d k and d v of ``fused_attention`` side by side on the last axis (batch, heads, k_len, dim + value
    dim): d s^T q and p^T g (``attention_grad_q``'s p and d s)."""
    p, ds = _probs_and_score_grad(q, k, v, g, lse, delta, masks,
                                  {"scale": scale, "mask_kinds": mask_kinds, "mask_fills": mask_fills})
    dk = np.matmul(np.swapaxes(ds, -1, -2), q)
    dv = np.matmul(np.swapaxes(p, -1, -2), g)
    return np.concatenate([dk, dv], axis=-1)


# ----------------------------------------------------------------------------------------------
# A chain of elementwise ops as one kernel.

def elementwise_step_ok(op_name: str) -> bool:
    """Whether ``op_name`` may be a step of ``fused_elementwise`` (the elementwise groups: one result
    element from the same element of each operand)."""
    return O.get(op_name).group in O.ELEMENTWISE_GROUPS


def _step_types(types, program):
    values = list(types)
    for i, (op_name, args, attrs) in enumerate(program):
        if not elementwise_step_ok(op_name):
            raise ShapeError(f"step {i} of fused_elementwise is {op_name}, which is not elementwise")
        if any(not 0 <= a < len(values) for a in args):
            raise ShapeError(f"step {i} of fused_elementwise reads {args}: only operands and earlier steps "
                             f"(0..{len(values) - 1})")
        values.append(O.get(op_name).infer([values[a] for a in args], dict(attrs)))
    return values[len(types):]


def _infer_fused_elementwise(types, attrs):
    steps = _step_types(types, attrs["program"])
    if not steps:
        raise ShapeError("fused_elementwise needs at least one step")
    out = steps[-1]
    odd = [i for i, t in enumerate(steps) if t.shape != out.shape]
    if odd:
        raise ShapeError(f"every step of fused_elementwise has the result's shape {out}; steps {odd} do not")
    return out


@op("fused_elementwise", FUSED, None, _infer_fused_elementwise, program=())
def fused_elementwise(*xs, program=()):
    """Elementwise ops run as one: ``program`` is a tuple of steps ``(op, operand indices, attrs as (key,
    value) pairs)``; an index below the operand count reads an operand (broadcast to the result's shape),
    one above reads an earlier step's result; the last step is the result.  Made by ``fuse-elementwise``."""
    values = list(xs)
    for op_name, args, attrs in program:
        values.append(np.asarray(O.get(op_name).ref(*[values[a] for a in args], **dict(attrs))))
    return values[-1]


@derivative("fused_elementwise")
def _fused_elementwise_vjp(d, n, xs, out, cot):
    """The steps written out as ops again, each differentiated by its own rule."""
    values = list(xs)
    for op_name, args, attrs in n.attrs["program"]:
        values.append(d(op_name, *[values[a] for a in args], **dict(attrs)))
    cots = {len(values) - 1: cot}
    for k in reversed(range(len(xs), len(values))):
        if k not in cots:
            continue
        step = d.g.node(values[k])
        op_name, args, _ = n.attrs["program"][k - len(xs)]
        if step.opdef.vjp is None:
            raise ShapeError(f"step {op_name} of fused_elementwise has no derivative")
        for a, gr in zip(args, step.opdef.vjp(d, step, [values[a] for a in args], values[k], cots[k])):
            if gr is not None:
                cots[a] = gr if a not in cots else d("add", cots[a], gr)
    return [cots.get(i) for i in range(len(xs))]
