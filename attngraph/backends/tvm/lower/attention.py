"""``fused_attention`` as three computes: the scores, the masked softmax and the value product, each
operand read through its ``ir.fused.OperandView`` (layout, broadcast batch or head axis, head window)."""

from __future__ import annotations

from tvm import te

from ....ir.fused import attention_views
from .rows import masked_scores, softmax
from .common import placeholder_types
from .registry import lowering


@lowering("fused_attention")
def _attention(c):
    q, k, v = c.xs[:3]
    views = attention_views(placeholder_types(c.xs[:3]), c.out, c.attrs)
    bshd = c.attrs["layout"] == "bshd"
    b, lq, h, dv = c.shape if bshd else (c.shape[0], c.shape[2], c.shape[1], c.shape[3])
    lk, d = k.shape[1 if bshd else 2], q.shape[3]

    def read(t, view, *i):
        return t[view.index(*i)]
    r = te.reduce_axis((0, d), name="r")
    s = te.compute((b, h, lq, lk), lambda i, j, m, n: te.sum(read(q, views[0], i, j, m, r) * read(k, views[1], i, j, n, r),
                                                             axis=r), name=f"{c.name}_qk")
    p = softmax(masked_scores(s, c.xs[3:], c.attrs, c.name), f"{c.name}_p")
    r2 = te.reduce_axis((0, lk), name="r2")
    o = te.compute((b, h, lq, dv), lambda i, j, m, n: te.sum(p[i, j, m, r2] * read(v, views[2], i, j, r2, n), axis=r2),
                   name=f"{c.name}_pv")
    if bshd:
        return te.compute(c.shape, lambda i, m, j, n: o[i, j, m, n], name=c.name)
    return o
