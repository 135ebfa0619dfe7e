"""Ops whose every output row depends on one row of their input (along the last axis, or a chosen
axis): softmax, log-softmax, the norms (layer norm, RMSNorm, and their residual forms), the scaled and
masked softmax; and the reductions."""

from __future__ import annotations

from tvm import te, tirx

from ....ir.fused import apply_masks
from .common import bcast, const, te_mask_ops
from .registry import lowering


def softmax(x: te.Tensor, name: str, log: bool = False, axis: int = -1):
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


def masked_scores(s, masks, attrs, name):
    """``masks(s * scale)`` as one compute (``ir.fused.apply_masks``); masks broadcast to the scores' shape."""
    rank = len(s.shape)
    reads = [bcast(m, rank) for m in masks]
    ops = te_mask_ops(s.dtype)
    return te.compute(s.shape, lambda *i: apply_masks(s[i] * const(attrs["scale"], s.dtype), [r(*i) for r in reads],
                                                      attrs, ops), name=f"{name}_scores")


@lowering("softmax", "log_softmax")
def _softmax(c):
    return softmax(c.xs[0], c.name, log=c.op == "log_softmax", axis=c.attrs["axis"])


@lowering("scaled_masked_softmax")
def _scaled_masked_softmax(c):
    return softmax(masked_scores(c.xs[0], c.xs[1:], c.attrs, c.name), c.name)


def _layer_norm(x: te.Tensor, gamma, beta, eps, name):
    *lead, n = x.shape
    inv_n = const(1.0, x.dtype) / n.astype(x.dtype)
    k1 = te.reduce_axis((0, n), name="k1")
    mean = te.compute(lead, lambda *i: te.sum(x[i + (k1,)] * inv_n, axis=k1), name=f"{name}_mean")
    k2 = te.reduce_axis((0, n), name="k2")
    var = te.compute(lead, lambda *i: te.sum((x[i + (k2,)] - mean[i]) * (x[i + (k2,)] - mean[i]) * inv_n, axis=k2),
                     name=f"{name}_var")
    return te.compute(x.shape, lambda *i: (x[i] - mean[i[:-1]]) * tirx.rsqrt(var[i[:-1]] + const(eps, x.dtype))
                      * gamma[i[-1]] + beta[i[-1]], name=name)


@lowering("layer_norm_grad")
def _layer_norm_grad(c):
    """rstd (g - mean(g) - xhat mean(g xhat)) per row: the statistics, then the two means, then the result."""
    x, gamma, cot = c.xs
    *lead, n = x.shape
    dt = x.dtype
    inv_n = const(1.0, dt) / n.astype(dt)

    def row_mean(f, name):
        k = te.reduce_axis((0, n), name=f"k_{name}")
        return te.compute(lead, lambda *i: te.sum(f(*i, k) * inv_n, axis=k), name=f"{c.name}_{name}")
    mean = row_mean(lambda *i: x[i], "mean")
    var = row_mean(lambda *i: (x[i] - mean[i[:-1]]) * (x[i] - mean[i[:-1]]), "var")

    def xhat(*i):
        return (x[i] - mean[i[:-1]]) * tirx.rsqrt(var[i[:-1]] + const(c.attrs["eps"], dt))

    def g(*i):
        return cot[i] * gamma[i[-1]]
    mg = row_mean(g, "mg")
    mgx = row_mean(lambda *i: g(*i) * xhat(*i), "mgx")
    return te.compute(x.shape, lambda *i: tirx.rsqrt(var[i[:-1]] + const(c.attrs["eps"], dt))
                      * (g(*i) - mg[i[:-1]] - xhat(*i) * mgx[i[:-1]]), name=c.name)


def residual_sum(c) -> te.Tensor:
    """``a + b`` of a fused residual norm (b broadcast to a's shape)."""
    a, b = c.xs[0], bcast(c.xs[1], c.rank)
    return te.compute(c.shape, lambda *i: a[i] + b(*i), name=f"{c.name}_sum")


@lowering("layer_norm")
def _layer_norm_op(c):
    return _layer_norm(c.xs[0], c.xs[1], c.xs[2], c.attrs["eps"], c.name)


@lowering("add_layer_norm")
def _add_layer_norm(c):
    return _layer_norm(residual_sum(c), c.xs[2], c.xs[3], c.attrs["eps"], c.name)


def _rms_norm(c, read):
    """RMSNorm of the rows ``read(*index)`` gives: the sum of squares, then the scaled output, each reading
    the input afresh (a residual sum is recomputed, not stored: one stage fewer for the GPU schedules)."""
    *lead, n = c.shape
    dtype = c.out.dtype
    inv_n = const(1.0, dtype) / n.astype(dtype)
    k = te.reduce_axis((0, n), name="k")
    ms = te.compute(lead, lambda *i: te.sum(read(*i, k) * read(*i, k) * inv_n, axis=k), name=f"{c.name}_ms")
    weight, eps = c.xs[-1], const(c.attrs["eps"], dtype)
    return te.compute(c.shape, lambda *i: read(*i) * tirx.rsqrt(ms[i[:-1]] + eps) * weight[i[-1]], name=c.name)


@lowering("rms_norm")
def _rms_norm_op(c):
    x = c.xs[0]
    return _rms_norm(c, lambda *i: x[i])


@lowering("add_rms_norm")
def _add_rms_norm(c):
    a, b = c.xs[0], bcast(c.xs[1], c.rank)
    return _rms_norm(c, lambda *i: a[i] + b(*i))


@lowering("cross_entropy")
def _cross_entropy(c):
    """Per row: the log-sum-exp (0 for log-probabilities), the target's score and the mean score; the loss
    from them, 0 where the target is ignored (its index clamped: every read stays in bounds)."""
    x, t = c.xs
    a, dtype = c.attrs, c.out.dtype
    classes = x.shape[-1]
    k1, k2, k3 = (te.reduce_axis((0, classes), name=f"k{i}") for i in (1, 2, 3))
    total = te.compute(c.shape, lambda *i: te.sum(x[i + (k3,)], axis=k3), name=f"{c.name}_sum")
    if a["log_probs"]:
        def lse(*i):
            return const(0.0, dtype)
    else:
        mx = te.compute(c.shape, lambda *i: te.max(x[i + (k1,)], axis=k1), name=f"{c.name}_max")
        se = te.compute(c.shape, lambda *i: te.sum(tirx.exp(x[i + (k2,)] - mx[i]), axis=k2), name=f"{c.name}_exp")

        def lse(*i):
            return mx[i] + tirx.log(se[i])
    eps = a["label_smoothing"]

    def body(*i):
        index = tirx.max(tirx.min(t[i].astype("int64"), classes - 1), tirx.const(0, "int64"))
        nll = lse(*i) - x[i + (index,)]
        smooth = lse(*i) - total[i] / classes.astype(dtype)
        loss = const(1 - eps, dtype) * nll + const(eps, dtype) * smooth
        return tirx.Select(t[i] == tirx.const(a["ignore_index"], t.dtype), const(0.0, dtype), loss)
    return te.compute(c.shape, body, name=c.name)


def _ieee_max_combine(a, b):
    return tirx.Select(tirx.any(b > a, tirx.isnan(b)), b, a)


#: max as NumPy and PyTorch take it: from -inf (a row of -inf has max -inf, not the lowest finite value), a NaN
#: anywhere the result
_ieee_max = te.comm_reducer(_ieee_max_combine, lambda dtype: tirx.const(float("-inf"), dtype), name="ieee_max")


@lowering("reduce_sum", "reduce_mean", "reduce_max")
def _reduce(c):
    (x,) = c.xs
    axes = sorted(a % len(x.shape) for a in c.attrs["axes"])
    keep = c.attrs.get("keepdims", False)
    ks = [te.reduce_axis((0, x.shape[a]), name=f"k{a}") for a in axes]
    count = const(1.0, x.dtype)
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
        if c.op == "reduce_max":
            return (_ieee_max if str(x.dtype).startswith(("float", "bfloat")) else te.max)(val, axis=ks)
        if c.op == "reduce_mean":
            return te.sum(val / count, axis=ks)
        return te.sum(val, axis=ks)
    return te.compute(c.shape, body, name=c.name)
