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


def _pow(a, b):
    """``a ** b`` as C's pow: a negative ``a`` to an integral ``b`` is ``+-|a| ** b`` (WGSL's pow is
    ``exp2(b log2 a)``, NaN there), to any other ``b`` NaN."""
    if not str(dtype_of(a)).startswith(("float", "bfloat")):
        return tirx.power(a, b)
    dt = dtype_of(a)
    magnitude = tirx.power(tirx.abs(a), b)
    integral = tirx.floor(b) == b
    odd = tirx.all(integral, tirx.floor(b * const(0.5, dt)) * const(2.0, dt) != b)
    negative = tirx.Select(integral, tirx.Select(odd, -magnitude, magnitude), const(float("nan"), dt))
    return tirx.Select(a < const(0.0, dt), negative, tirx.power(a, b))


def _ieee_eq(a, b):
    """``a == b`` as IEEE compares floats: false where either is NaN (TVM's simplifier takes ``x == x`` for true)."""
    if not str(dtype_of(a)).startswith(("float", "bfloat")):
        return a == b
    return tirx.all(tirx.Not(tirx.isnan(a)), tirx.Not(tirx.isnan(b)), a == b)


def cast(x, dtype: str):
    """``x`` converted to ``dtype``.  A float to bfloat16 is rounded here (to nearest, ties to even; NaN kept), as
    the float32 value it will be read as: TVM folds ``float32(bfloat16(x))`` back to ``x`` where the bfloat16
    value feeds float32 arithmetic in the same kernel (``cast(w) * scale`` would lose its rounding)."""
    if hasattr(x, "asobject"):  # a comparison not yet made an expression (x == y)
        x = x.asobject()
    if dtype != "bfloat16" or not str(dtype_of(x)).startswith("float"):
        return x.astype(dtype)
    v = x.astype("float32")
    bits = tirx.reinterpret("uint32", v)
    half, lsb, top = (tirx.const(c, "uint32") for c in (0x7FFF, 1, 0xFFFF0000))
    rounded = tirx.reinterpret("float32", (bits + half + ((bits >> tirx.const(16, "uint32")) & lsb)) & top)
    return tirx.Select(tirx.isnan(v), v, rounded).astype(dtype)


#: op -> expr(operands, attrs): one element of the op's result from the same element of each operand (each
#: already broadcast); the single ops and ``fused_elementwise``'s steps are lowered from this one table
EXPRESSIONS = {
    "neg": lambda xs, a: -xs[0],
    "exp": lambda xs, a: tirx.exp(xs[0]),
    "log": lambda xs, a: tirx.log(xs[0]),
    "sqrt": lambda xs, a: tirx.sqrt(xs[0]),
    "rsqrt": lambda xs, a: const(1.0, dtype_of(xs[0])) / tirx.sqrt(xs[0]),
    "tanh": lambda xs, a: tirx.tanh(xs[0]),
    "erf": lambda xs, a: tirx.erf(xs[0]),
    "sin": lambda xs, a: tirx.sin(xs[0]),
    "cos": lambda xs, a: tirx.cos(xs[0]),
    "relu": lambda xs, a: tirx.max(xs[0], const(0, dtype_of(xs[0]))),
    "sigmoid": lambda xs, a: tirx.sigmoid(xs[0]),
    "silu": lambda xs, a: xs[0] * tirx.sigmoid(xs[0]),
    "gelu": lambda xs, a: gelu(xs[0], a.get("approximate", "none")),
    "cast": lambda xs, a: cast(xs[0], a["dtype"]),
    "logical_not": lambda xs, a: tirx.Not(xs[0]),
    "add": lambda xs, a: xs[0] + xs[1],
    "sub": lambda xs, a: xs[0] - xs[1],
    "mul": lambda xs, a: xs[0] * xs[1],
    "div": lambda xs, a: xs[0] / xs[1],
    "maximum": lambda xs, a: tirx.max(xs[0], xs[1]),
    "minimum": lambda xs, a: tirx.min(xs[0], xs[1]),
    "pow": lambda xs, a: _pow(xs[0], xs[1]),
    "abs": lambda xs, a: tirx.abs(xs[0]),
    "eq": lambda xs, a: _ieee_eq(xs[0], xs[1]),
    "ne": lambda xs, a: tirx.Not(_ieee_eq(xs[0], xs[1])),
    "lt": lambda xs, a: xs[0] < xs[1],
    "le": lambda xs, a: xs[0] <= xs[1],
    "gt": lambda xs, a: xs[0] > xs[1],
    "ge": lambda xs, a: xs[0] >= xs[1],
    "logical_and": lambda xs, a: tirx.all(xs[0], xs[1]),
    "logical_or": lambda xs, a: tirx.any(xs[0], xs[1]),
    "where": lambda xs, a: tirx.Select(xs[0], xs[1], xs[2]),
}

#: activation(x) of the projections' epilogue (``linear``'s ``activation`` attribute)
ACTIVATIONS = {"none": lambda x: x, "relu": lambda x: tirx.max(x, const(0, dtype_of(x))),
               "gelu": lambda x: gelu(x, "none"), "gelu_tanh": lambda x: gelu(x, "tanh")}


@lowering(*EXPRESSIONS)
def _elementwise(c):
    reads = [bcast(t, c.rank) for t in c.xs]
    return te.compute(c.shape, lambda *i: EXPRESSIONS[c.op]([r(*i) for r in reads], c.attrs), name=c.name)


@lowering("fused_elementwise")
def _fused_elementwise(c):
    """The steps of ``program`` composed into one expression (every step has the result's shape)."""
    reads = [bcast(t, c.rank) for t in c.xs]

    def body(*i):
        values = [r(*i) for r in reads]
        for op, args, attrs in c.attrs["program"]:
            values.append(EXPRESSIONS[op]([values[a] for a in args], dict(attrs)))
        return values[-1]
    return te.compute(c.shape, body, name=c.name)


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
