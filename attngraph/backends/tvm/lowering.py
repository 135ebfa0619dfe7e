"""Every op as a TVM tensor expression: ``lower(op, attrs, operands, out_type, dim_vars)``.

The computes follow the NumPy reference functions in ``attngraph/ir`` one for one (broadcasting,
masks, layouts).  Schedules are separate (``build.py``); here only the meaning.
"""

from __future__ import annotations

import math

from tvm import te, tirx

from ...ir import TensorType
from ...ir.fused import MaskOps, apply_masks, attention_views


class LoweringError(NotImplementedError):
    """An op (or an op with these attributes) that the TVM backend cannot lower."""


def _bcast(t: te.Tensor, out_rank: int):
    """Index function reading ``t`` broadcast to rank ``out_rank`` (NumPy rules; size-1 dims read 0)."""
    shape = list(t.shape)
    offset = out_rank - len(shape)

    def read(*idx):
        return t[tuple(0 if isinstance(d, tirx.IntImm) and d.value == 1 else idx[offset + i]
                       for i, d in enumerate(shape))]
    return read


def _const(value, dtype):
    return tirx.const(value, dtype)


def _dtype(x) -> str:
    """The dtype of a PrimExpr (tensor reads have ``dtype``; arithmetic nodes only ``ty``)."""
    return getattr(x, "dtype", None) or str(x.ty)


def _gelu(x, approximate):
    if approximate == "tanh":
        c = _const(math.sqrt(2.0 / math.pi), _dtype(x))
        dt = _dtype(x)
        return _const(0.5, dt) * x * (_const(1.0, dt) + tirx.tanh(c * (x + _const(0.044715, dt) * x * x * x)))
    dt = _dtype(x)
    return _const(0.5, dt) * x * (_const(1.0, dt) + tirx.erf(x * _const(1 / math.sqrt(2.0), dt)))


UNARY = {
    "neg": lambda x, a: -x,
    "exp": lambda x, a: tirx.exp(x),
    "log": lambda x, a: tirx.log(x),
    "sqrt": lambda x, a: tirx.sqrt(x),
    "rsqrt": lambda x, a: _const(1.0, x.dtype) / tirx.sqrt(x),
    "tanh": lambda x, a: tirx.tanh(x),
    "erf": lambda x, a: tirx.erf(x),
    "sin": lambda x, a: tirx.sin(x),
    "cos": lambda x, a: tirx.cos(x),
    "relu": lambda x, a: tirx.max(x, _const(0, x.dtype)),
    "gelu": lambda x, a: _gelu(x, a.get("approximate", "none")),
    "cast": lambda x, a: x.astype(a["dtype"]),
    "logical_not": lambda x, a: tirx.Not(x),
}

BINARY = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "maximum": lambda a, b: tirx.max(a, b),
    "eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
    "logical_and": lambda a, b: tirx.all(a, b), "logical_or": lambda a, b: tirx.any(a, b),
}

ACTIVATIONS = {"none": lambda x: x, "relu": lambda x: tirx.max(x, _const(0, _dtype(x))),
               "gelu": lambda x: _gelu(x, "none"), "gelu_tanh": lambda x: _gelu(x, "tanh")}


def _matmul(a: te.Tensor, b: te.Tensor, shape, name="matmul"):
    k = te.reduce_axis((0, a.shape[-1]), name="k")
    ra, rb = _bcast_batch(a, len(shape)), _bcast_batch(b, len(shape))
    return te.compute(shape, lambda *i: te.sum(ra(i[:-2], i[-2], k) * rb(i[:-2], k, i[-1]), axis=k), name=name)


def _bcast_batch(t: te.Tensor, out_rank: int):
    """Index function for a matmul operand: batch dims broadcast, the last two given explicitly."""
    batch = list(t.shape[:-2])
    offset = out_rank - 2 - len(batch)

    def read(bidx, r, c):
        idx = [0 if isinstance(d, tirx.IntImm) and d.value == 1 else bidx[offset + i] for i, d in enumerate(batch)]
        return t[tuple(idx) + (r, c)]
    return read


def _softmax(x: te.Tensor, name: str, log: bool = False, axis: int = -1):
    """softmax (or log-softmax) of ``x`` along ``axis``: max, exp, sum, normalize."""
    rank = len(x.shape)
    axis %= rank
    n = x.shape[axis]

    def red(i):  # output index i without the reduced axis
        return tuple(i[a] for a in range(rank) if a != axis)
    lead = [d for a, d in enumerate(x.shape) if a != axis]

    def lead_row(j, k):  # the row element k for a reduced-shape index j
        return tuple(list(j[:axis]) + [k] + list(j[axis:]))
    k1 = te.reduce_axis((0, n), name="k1")
    mx = te.compute(lead, lambda *j: te.max(x[lead_row(j, k1)], axis=k1), name=f"{name}_max")
    e = te.compute(x.shape, lambda *i: tirx.exp(x[i] - mx[red(i)]), name=f"{name}_exp")
    k2 = te.reduce_axis((0, n), name="k2")
    sm = te.compute(lead, lambda *j: te.sum(e[lead_row(j, k2)], axis=k2), name=f"{name}_sum")
    if log:
        return te.compute(x.shape, lambda *i: x[i] - mx[red(i)] - tirx.log(sm[red(i)]), name=name)
    return te.compute(x.shape, lambda *i: e[i] / sm[red(i)], name=name)


def _layer_norm(x: te.Tensor, gamma, beta, eps, name):
    *lead, n = x.shape
    inv_n = _const(1.0, x.dtype) / n.astype(x.dtype)
    k1 = te.reduce_axis((0, n), name="k1")
    mean = te.compute(lead, lambda *i: te.sum(x[i + (k1,)] * inv_n, axis=k1), name=f"{name}_mean")
    k2 = te.reduce_axis((0, n), name="k2")
    var = te.compute(lead, lambda *i: te.sum((x[i + (k2,)] - mean[i]) * (x[i + (k2,)] - mean[i]) * inv_n, axis=k2),
                     name=f"{name}_var")
    return te.compute(x.shape, lambda *i: (x[i] - mean[i[:-1]]) * tirx.rsqrt(var[i[:-1]] + _const(eps, x.dtype))
                      * gamma[i[-1]] + beta[i[-1]], name=name)


def te_mask_ops(dtype: str) -> MaskOps:
    """``apply_masks`` over TVM expressions of ``dtype``."""
    return MaskOps(lambda a, b: a + b, tirx.Select, lambda v: _const(v, dtype))


def _masked_scores(s, masks, attrs, name):
    """``masks(s * scale)`` as one compute; masks broadcast to the scores' shape."""
    rank = len(s.shape)
    reads = [_bcast(m, rank) for m in masks]
    ops = te_mask_ops(s.dtype)
    return te.compute(s.shape, lambda *i: apply_masks(s[i] * _const(attrs["scale"], s.dtype), [r(*i) for r in reads],
                                                      attrs, ops), name=f"{name}_scores")


def _attention(xs, attrs, out: TensorType, shape, name):
    """``fused_attention``: the scores, the masked softmax and the value product as three computes, each
    operand read through its ``OperandView`` (layout, broadcast batch or head axis, head window)."""
    q, k, v = xs[:3]
    views = attention_views(_placeholder_types(xs[:3]), out, attrs)
    bshd = attrs["layout"] == "bshd"
    b, lq, h, dv = shape if bshd else (shape[0], shape[2], shape[1], shape[3])
    lk, d = k.shape[1 if bshd else 2], q.shape[3]

    def read(t, view, *i):
        return t[view.index(*i)]
    r = te.reduce_axis((0, d), name="r")
    s = te.compute((b, h, lq, lk), lambda i, j, m, n: te.sum(read(q, views[0], i, j, m, r) * read(k, views[1], i, j, n, r),
                                                             axis=r), name=f"{name}_qk")
    p = _softmax(_masked_scores(s, xs[3:], attrs, name), f"{name}_p")
    r2 = te.reduce_axis((0, lk), name="r2")
    o = te.compute((b, h, lq, dv), lambda i, j, m, n: te.sum(p[i, j, m, r2] * read(v, views[2], i, j, r2, n), axis=r2),
                   name=f"{name}_pv")
    if bshd:
        return te.compute(shape, lambda i, m, j, n: o[i, j, m, n], name=name)
    return o


def _placeholder_types(ts) -> list[TensorType]:
    """Placeholders as attngraph types: static dims as ints, every symbolic one as "n" (which is not 1)."""
    return [TensorType(tuple(int(d) if isinstance(d, tirx.IntImm) else "n" for d in t.shape), str(t.dtype)) for t in ts]


def lower(op: str, attrs: dict, xs: list[te.Tensor], out: TensorType, dv, name: str = "out") -> te.Tensor:
    """The tensor expression computing ``op(xs)`` with result type ``out``."""
    shape = dv.shape(out.shape)
    rank = len(shape)
    if op in UNARY:
        (x,) = xs
        return te.compute(shape, lambda *i: UNARY[op](x[i], attrs), name=name)
    if op in BINARY:
        a, b = (_bcast(t, rank) for t in xs)
        return te.compute(shape, lambda *i: BINARY[op](a(*i), b(*i)), name=name)
    if op == "where":
        c, a, b = (_bcast(t, rank) for t in xs)
        return te.compute(shape, lambda *i: tirx.Select(c(*i), a(*i), b(*i)), name=name)
    if op == "matmul":
        return _matmul(xs[0], xs[1], shape, name)
    if op == "linear":
        x, w = xs[0], xs[1]
        k = te.reduce_axis((0, w.shape[0]), name="k")
        y = te.compute(shape, lambda *i: te.sum(x[i[:-1] + (k,)] * w[k, i[-1]], axis=k), name=f"{name}_mm")
        bias = xs[2] if len(xs) == 3 else None
        act = ACTIVATIONS[attrs["activation"]]
        return te.compute(shape, lambda *i: act(y[i] + bias[i[-1]] if bias is not None else y[i]), name=name)
    if op == "linear_packed":
        x, w = xs[0], xs[1]
        width = int(w.shape[2])
        k = te.reduce_axis((0, w.shape[1]), name="k")
        y = te.compute(shape, lambda *i: te.sum(x[i[:-1] + (k,)] * w[i[-1] // width, k, i[-1] % width].astype(x.dtype),
                                                axis=k), name=f"{name}_mm")
        bias = xs[2] if len(xs) == 3 else None
        act = ACTIVATIONS[attrs["activation"]]
        return te.compute(shape, lambda *i: act(y[i] + bias[i[-1]] if bias is not None else y[i]), name=name)
    if op == "pack_panels":
        (w,) = xs
        width, n = attrs["width"], w.shape[1]
        zero = _const(0.0, w.dtype)
        return te.compute(shape, lambda p, k, c: tirx.Select(p * width + c < n, w[k, tirx.min(p * width + c, n - 1)],
                                                             zero).astype(out.dtype), name=name)
    if op in ("softmax", "log_softmax"):
        return _softmax(xs[0], name, log=op == "log_softmax", axis=attrs["axis"])
    if op == "layer_norm":
        return _layer_norm(xs[0], xs[1], xs[2], attrs["eps"], name)
    if op == "add_layer_norm":
        a, b = xs[0], _bcast(xs[1], rank)
        s = te.compute(shape, lambda *i: a[i] + b(*i), name=f"{name}_sum")
        return _layer_norm(s, xs[2], xs[3], attrs["eps"], name)
    if op == "scaled_masked_softmax":
        return _softmax(_masked_scores(xs[0], xs[1:], attrs, name), name)
    if op == "fused_attention":
        return _attention(xs, attrs, out, shape, name)
    if op in ("reduce_sum", "reduce_mean", "reduce_max"):
        (x,) = xs
        axes = sorted(a % len(x.shape) for a in attrs["axes"])
        keep = attrs.get("keepdims", False)
        ks = [te.reduce_axis((0, x.shape[a]), name=f"k{a}") for a in axes]
        count = _const(1.0, x.dtype)
        for a in axes:
            count = count * x.shape[a].astype(x.dtype)

        def body(*i):
            it, idx = iter(i), []
            for a in range(len(x.shape)):
                if a in axes:
                    idx.append(ks[axes.index(a)])
                    if keep:
                        next(it)
                else:
                    idx.append(next(it))
            val = x[tuple(idx)]
            if op == "reduce_max":
                return te.max(val, axis=ks)
            if op == "reduce_mean":
                return te.sum(val / count, axis=ks)
            return te.sum(val, axis=ks)
        return te.compute(shape, body, name=name)
    if op == "transpose":
        (x,) = xs
        perm = attrs["perm"]
        inv = [perm.index(a) for a in range(len(perm))]
        return te.compute(shape, lambda *i: x[tuple(i[inv[a]] for a in range(len(perm)))], name=name)
    if op == "reshape":
        (x,) = xs
        from tvm import topi
        return topi.reshape(x, shape)
    if op == "slice":
        (x,) = xs
        axis = attrs["axis"] % len(x.shape)
        start, step = dv(attrs.get("start", 0)), attrs.get("step", 1)
        return te.compute(shape, lambda *i: x[tuple(start + i[a] * step if a == axis else i[a] for a in range(rank))],
                          name=name)
    if op == "concat":
        axis = attrs["axis"] % rank
        offsets, total = [], tirx.IntImm("int64", 0)
        for t in xs:
            offsets.append(total)
            total = total + t.shape[axis]

        def body(*i):
            val = None
            for t, off in zip(xs, offsets):  # a later part wins from its offset on
                idx = tuple(i[a] - off if a == axis else i[a] for a in range(rank))
                # Clamp the index read by the branches not taken so every read stays in bounds.
                idx = tuple(tirx.max(tirx.min(v, t.shape[a] - 1), 0) if a == axis else v for a, v in enumerate(idx))
                val = t[idx] if val is None else tirx.Select(i[axis] >= off, t[idx], val)
            return val
        return te.compute(shape, body, name=name)
    if op == "gather":
        table, idx = xs
        r = len(idx.shape)
        return te.compute(shape, lambda *i: table[(idx[i[:r]].astype("int64"),) + tuple(i[r:])], name=name)
    if op == "arange":
        return te.compute(shape, lambda i: i.astype(out.dtype), name=name)
    if op == "update_slice":
        cache, value, offset = xs
        axis = attrs["axis"] % rank
        off = offset[()].astype("int64")
        n = value.shape[axis]

        def body(*i):
            inside = tirx.all(i[axis] >= off, i[axis] < off + n)
            j = tuple(tirx.max(tirx.min(i[a] - off, n - 1), 0) if a == axis else i[a] for a in range(rank))
            return tirx.Select(inside, value[j], cache[i])
        return te.compute(shape, body, name=name)
    raise LoweringError(f"op {op!r} has no TVM lowering")
