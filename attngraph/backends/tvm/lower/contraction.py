"""Contractions: the batched ``matmul`` (broadcasting batch dims) and the projection ``linear`` with its
bias and activation epilogue."""

from __future__ import annotations

from tvm import te, tirx

from .elementwise import ACTIVATIONS
from .registry import lowering


def _bcast_batch(t: te.Tensor, out_rank: int):
    """Index function for a matmul operand: batch dims broadcast, the last two given explicitly."""
    batch = list(t.shape[:-2])
    offset = out_rank - 2 - len(batch)

    def read(bidx, r, c):
        idx = [0 if isinstance(d, tirx.IntImm) and d.value == 1 else bidx[offset + i] for i, d in enumerate(batch)]
        return t[tuple(idx) + (r, c)]
    return read


@lowering("matmul")
def _matmul(c):
    a, b = c.xs
    k = te.reduce_axis((0, a.shape[-1]), name="k")
    ra, rb = _bcast_batch(a, c.rank), _bcast_batch(b, c.rank)
    return te.compute(c.shape, lambda *i: te.sum(ra(i[:-2], i[-2], k) * rb(i[:-2], k, i[-1]), axis=k), name=c.name)


@lowering("weight_grad")
def _weight_grad(c):
    x, g = c.xs
    lead = [te.reduce_axis((0, n), name=f"p{a}") for a, n in enumerate(x.shape[:-1])]
    return te.compute(c.shape, lambda i, j: te.sum(x[tuple(lead) + (i,)] * g[tuple(lead) + (j,)], axis=lead),
                      name=c.name)


def epilogue(c, y: te.Tensor, bias: te.Tensor | None) -> te.Tensor:
    """``activation(y + bias)`` of a projection: its bias and activation, applied as it is written back."""
    act = ACTIVATIONS[c.attrs["activation"]]
    return te.compute(c.shape, lambda *i: act(y[i] + bias[i[-1]] if bias is not None else y[i]), name=c.name)


@lowering("linear")
def _linear(c):
    x, w = c.xs[0], c.xs[1]
    k = te.reduce_axis((0, w.shape[0]), name="k")
    y = te.compute(c.shape, lambda *i: te.sum(x[i[:-1] + (k,)] * w[k, i[-1]], axis=k), name=f"{c.name}_mm")
    return epilogue(c, y, c.xs[2] if len(c.xs) == 3 else None)
