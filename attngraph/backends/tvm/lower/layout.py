"""Ops that move, select or build elements: transpose, reshape, slice, concat, gather, arange, the
KV-cache write ``update_slice``, ``broadcast_to`` (``expand``), and the derivatives' ``broadcast_like`` and
``scatter_add``."""

from __future__ import annotations

from tvm import te, tirx

from .common import bcast
from .registry import lowering


@lowering("transpose")
def _transpose(c):
    (x,) = c.xs
    perm = c.attrs["perm"]
    inv = [perm.index(a) for a in range(len(perm))]
    return te.compute(c.shape, lambda *i: x[tuple(i[inv[a]] for a in range(len(perm)))], name=c.name)


@lowering("reshape")
def _reshape(c):
    from tvm import topi
    return topi.reshape(c.xs[0], c.shape)


@lowering("slice")
def _slice(c):
    (x,) = c.xs
    axis = c.attrs["axis"] % len(x.shape)
    start, step = c.dv(c.attrs.get("start", 0)), c.attrs.get("step", 1)
    return te.compute(c.shape, lambda *i: x[tuple(start + i[a] * step if a == axis else i[a] for a in range(c.rank))],
                      name=c.name)


@lowering("concat")
def _concat(c):
    axis = c.attrs["axis"] % c.rank
    offsets, total = [], tirx.IntImm("int64", 0)
    for t in c.xs:
        offsets.append(total)
        total = total + t.shape[axis]

    def body(*i):
        val = None
        for t, off in zip(c.xs, offsets):  # a later part wins from its offset on
            idx = tuple(i[a] - off if a == axis else i[a] for a in range(c.rank))
            # Clamp the index read by the branches not taken so every read stays in bounds.
            idx = tuple(tirx.max(tirx.min(v, t.shape[a] - 1), 0) if a == axis else v for a, v in enumerate(idx))
            val = t[idx] if val is None else tirx.Select(i[axis] >= off, t[idx], val)
        return val
    return te.compute(c.shape, body, name=c.name)


@lowering("gather")
def _gather(c):
    table, idx = c.xs
    r = len(idx.shape)
    return te.compute(c.shape, lambda *i: table[(idx[i[:r]].astype("int64"),) + tuple(i[r:])], name=c.name)


@lowering("arange")
def _arange(c):
    return te.compute(c.shape, lambda i: i.astype(c.out.dtype), name=c.name)


@lowering("update_slice")
def _update_slice(c):
    cache, value, offset = c.xs
    axis = c.attrs["axis"] % c.rank
    off = offset[()].astype("int64")
    n = value.shape[axis]

    def body(*i):
        inside = tirx.all(i[axis] >= off, i[axis] < off + n)
        j = tuple(tirx.max(tirx.min(i[a] - off, n - 1), 0) if a == axis else i[a] for a in range(c.rank))
        return tirx.Select(inside, value[j], cache[i])
    return te.compute(c.shape, body, name=c.name)


@lowering("broadcast_like", "broadcast_to")
def _broadcast_like(c):
    return te.compute(c.shape, bcast(c.xs[0], c.rank), name=c.name)


@lowering("scatter_add")
def _scatter_add(c):
    """Each output row sums the value rows whose index names it: a reduction over every index position."""
    idx, values, _ = c.xs
    ks = [te.reduce_axis((0, n), name=f"k{a}") for a, n in enumerate(idx.shape)]
    zero = tirx.const(0.0, values.dtype)
    return te.compute(c.shape, lambda row, *i: te.sum(
        tirx.Select(idx[tuple(ks)].astype("int64") == row, values[tuple(ks) + tuple(i)], zero), axis=ks),
        name=c.name)
