"""``fused_attention`` as three computes: the scores, the masked softmax and the value product, each
operand read through its ``ir.fused.OperandView`` (layout, broadcast batch or head axis, head window);
and its backward's ops: each row's log-sum-exp, the gradients of q and of k and v."""

from __future__ import annotations

from tvm import te, tirx

from ....ir.fused import attention_views, mask_score_grad
from .rows import masked_scores, softmax
from .common import bcast, const, placeholder_types, te_mask_ops
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


# -- the attention's backward (``ir.fused._attention_vjp``): operands (batch, heads, seq, dim), batch and
# head axes of size 1 broadcast; the scores, probabilities and their gradient as (batch, heads, q_len,
# k_len) stages of one kernel (a target's own kernel keeps a block of rows of them at a time).

def _scores(c, lq, lk):
    """q k^T of operands q = xs[0] and k = xs[1]: (batch, heads, ``lq``, ``lk``)."""
    q, k = bcast(c.xs[0], 4), bcast(c.xs[1], 4)
    b, h = c.shape[0], c.shape[1]
    r = te.reduce_axis((0, c.xs[0].shape[3]), name="r")
    return te.compute((b, h, lq, lk), lambda i, j, m, n: te.sum(q(i, j, m, r) * k(i, j, n, r), axis=r),
                      name=f"{c.name}_qk")


@lowering("attention_lse")
def _attention_lse(c):
    lq, lk = c.xs[0].shape[2], c.xs[1].shape[2]
    s = masked_scores(_scores(c, lq, lk), c.xs[2:], c.attrs, c.name)
    n1, n2 = te.reduce_axis((0, lk), name="n1"), te.reduce_axis((0, lk), name="n2")
    mx = te.compute(c.shape, lambda i, j, m: te.max(s[i, j, m, n1], axis=n1), name=f"{c.name}_max")
    se = te.compute(c.shape, lambda i, j, m: te.sum(tirx.exp(s[i, j, m, n2] - mx[i, j, m]), axis=n2),
                    name=f"{c.name}_sum")
    return te.compute(c.shape, lambda i, j, m: mx[i, j, m] + tirx.log(se[i, j, m]), name=c.name)


def _probs_and_score_grad(c):
    """p = exp(s - lse) and d s = p (d out v^T - delta) scale, 0 where a keep or drop mask replaced the score."""
    q, k, v, g, lse, delta = c.xs[:6]
    masks = c.xs[6:]
    lq, lk = q.shape[2], k.shape[2]
    s = masked_scores(_scores(c, lq, lk), masks, c.attrs, c.name)
    lse_at, v_at = bcast(lse, 3), bcast(v, 4)
    b, h = c.shape[0], c.shape[1]
    p = te.compute((b, h, lq, lk), lambda i, j, m, n: tirx.exp(s[i, j, m, n] - lse_at(i, j, m)), name=f"{c.name}_p")
    x = te.reduce_axis((0, v.shape[3]), name="x")
    dp = te.compute((b, h, lq, lk), lambda i, j, m, n: te.sum(g[i, j, m, x] * v_at(i, j, n, x), axis=x),
                    name=f"{c.name}_dp")
    reads = [bcast(mk, 4) for mk in masks]
    ops = te_mask_ops(c.out.dtype)
    scale = const(c.attrs["scale"], c.out.dtype)
    ds = te.compute((b, h, lq, lk), lambda i, j, m, n: mask_score_grad(
        p[i, j, m, n] * (dp[i, j, m, n] - delta[i, j, m]) * scale, [r(i, j, m, n) for r in reads], c.attrs, ops),
        name=f"{c.name}_ds")
    return p, ds


@lowering("attention_grad_q")
def _attention_grad_q(c):
    _, ds = _probs_and_score_grad(c)
    k = bcast(c.xs[1], 4)
    n = te.reduce_axis((0, c.xs[1].shape[2]), name="n")
    return te.compute(c.shape, lambda i, j, m, r: te.sum(ds[i, j, m, n] * k(i, j, n, r), axis=n), name=c.name)


@lowering("attention_grad_kv")
def _attention_grad_kv(c):
    """d k (channels below the head dim) and d v (the rest) in one compute."""
    p, ds = _probs_and_score_grad(c)
    q, g = bcast(c.xs[0], 4), c.xs[3]
    e = c.xs[0].shape[3]
    last_q, last_v = e - 1, c.xs[3].shape[3] - 1
    m = te.reduce_axis((0, c.xs[0].shape[2]), name="m")

    def body(i, j, n, x):
        key = x < e
        return te.sum(tirx.Select(key, ds[i, j, m, n] * q(i, j, m, tirx.min(x, last_q)),
                                  p[i, j, m, n] * g[i, j, m, tirx.max(tirx.min(x - e, last_v), 0)]), axis=m)
    return te.compute(c.shape, body, name=c.name)
