"""Elementwise ops: unary, binary (broadcasting), comparisons, ``where``, ``cast``; and the activations
the projections apply in their epilogue."""

from __future__ import annotations

import math

from tvm import te, tirx

from ....ir.ops import dropout_bits, dropout_threshold
from .common import bcast, const, dtype_of
from .registry import lowering


def gelu(x, approximate):
    dt = dtype_of(x)
    if approximate == "tanh":
        c = const(math.sqrt(2.0 / math.pi), dt)
        return const(0.5, dt) * x * (const(1.0, dt) + tirx.tanh(c * (x + const(0.044715, dt) * x * x * x)))
    return const(0.5, dt) * x * (const(1.0, dt) + tirx.erf(x * const(1 / math.sqrt(2.0), dt)))


UNARY = {
    "neg": lambda x, a: -x,
    "exp": lambda x, a: tirx.exp(x),
    "log": lambda x, a: tirx.log(x),
    "sqrt": lambda x, a: tirx.sqrt(x),
    "rsqrt": lambda x, a: const(1.0, x.dtype) / tirx.sqrt(x),
    "tanh": lambda x, a: tirx.tanh(x),
    "erf": lambda x, a: tirx.erf(x),
    "sin": lambda x, a: tirx.sin(x),
    "cos": lambda x, a: tirx.cos(x),
    "relu": lambda x, a: tirx.max(x, const(0, x.dtype)),
    "gelu": lambda x, a: gelu(x, a.get("approximate", "none")),
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

#: activation(x) of the projections' epilogue (``linear``'s ``activation`` attribute)
ACTIVATIONS = {"none": lambda x: x, "relu": lambda x: tirx.max(x, const(0, dtype_of(x))),
               "gelu": lambda x: gelu(x, "none"), "gelu_tanh": lambda x: gelu(x, "tanh")}


@lowering(*UNARY)
def _unary(c):
    (x,) = c.xs
    return te.compute(c.shape, lambda *i: UNARY[c.op](x[i], c.attrs), name=c.name)


@lowering(*BINARY)
def _binary(c):
    a, b = (bcast(t, c.rank) for t in c.xs)
    return te.compute(c.shape, lambda *i: BINARY[c.op](a(*i), b(*i)), name=c.name)


@lowering("where")
def _where(c):
    cond, a, b = (bcast(t, c.rank) for t in c.xs)
    return te.compute(c.shape, lambda *i: tirx.Select(cond(*i), a(*i), b(*i)), name=c.name)


@lowering("dropout")
def _dropout(c):
    x, seed = c.xs
    p = c.attrs["p"]
    dtype = c.out.dtype

    def u32(v):
        return tirx.const(v, "uint32")

    def body(*i):
        flat = i[0]
        for a in range(1, c.rank):
            flat = flat * c.shape[a] + i[a]
        bits = dropout_bits(flat.astype("uint32") if c.rank else u32(0), seed[()].astype("uint32"), c.attrs["salt"], u32)
        return tirx.Select(bits >= u32(dropout_threshold(p)), x[i] * tirx.const(1.0 / (1.0 - p), dtype),
                           tirx.const(0.0, dtype))
    return te.compute(c.shape, body, name=c.name)
