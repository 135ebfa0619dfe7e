"""The op registry: each op is defined in one place.

An ``OpDef`` holds an op's name, its group (so rewrite rules can say "any elementwise op"), its
arity, its default attributes, its type rule and its reference semantics in NumPy.  The reference
interpreter, shape inference and the passes all read this table; backends add their lowerings
beside it in their own tables.

Adding an op is adding one ``@op`` function below (or in ``fused.py`` for ops that only passes create).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from . import dims as D
from .dims import Dim
from .types import TensorType, check_dtype, numpy_dtype


class ShapeError(ValueError):
    """Operand types that an op does not accept."""


@dataclass(frozen=True)
class OpDef:
    name: str
    group: str
    arity: int | None  # None: variadic
    infer: Callable[[list[TensorType], dict], TensorType]
    ref: Callable[..., np.ndarray]
    defaults: dict = field(default_factory=dict)
    doc: str = ""
    #: every output row (the last axis; softmax: its ``axis``, when that is the last) depends on the same
    #: row of the first operand alone: softmax- and norm-like ops, which CPU kernels run a row at a time
    rows: bool = False
    #: (attrs, operand shapes, result shape) -> floating-point operations (2 per multiply-add), for the ops
    #: whose work is counted in profiles (contractions, attention); None: not counted
    flops: Callable | None = None
    #: the derivative: ``vjp(d, node, operands, out, cot)`` -> the cotangent of each operand (a node id, or
    #: None where there is none: integer and bool operands), built with ``d`` (``passes.autodiff.Builder``:
    #: ``d(op, *operands, **attrs)`` adds a node) from the result's cotangent ``cot``; None: no derivative
    vjp: Callable | None = None


REGISTRY: dict[str, OpDef] = {}

SOURCE_OPS = ("input", "param", "const")
UNARY, BINARY, COMPARE, REDUCE, LAYOUT, NN, SOURCE, FUSED = (
    "unary", "binary", "compare", "reduce", "layout", "nn", "source", "fused")
ELEMENTWISE_GROUPS = (UNARY, BINARY, COMPARE)


def op(name: str, group: str, arity: int | None, infer, *, rows: bool = False, flops: Callable | None = None,
       **defaults):
    """Register ``fn`` (the NumPy reference) as op ``name`` (``rows``, ``flops``: see ``OpDef``)."""
    def register(fn):
        if name in REGISTRY:
            raise ValueError(f"op {name!r} registered twice")
        REGISTRY[name] = OpDef(name, group, arity, infer, fn, dict(defaults), (fn.__doc__ or "").strip(), rows, flops)
        return fn
    return register


def derivative(*names: str):
    """Register the decorated function as the derivative (``OpDef.vjp``) of the ops ``names``."""
    def register(fn):
        for name in names:
            REGISTRY[name] = replace(REGISTRY[name], vjp=fn)
        return fn
    return register


def contraction_flops(attrs, in_shapes, out_shape) -> int:
    """2 x (result elements) x (contracted length: the first operand's last dim)."""
    return 2 * int(np.prod(out_shape, dtype=np.int64)) * int(in_shapes[0][-1])


#: Attributes that may hold symbolic dims, evaluated once the inputs bind them.
DIM_ATTRS = ("shape", "n", "start", "stop")


def bind_attrs(attrs: dict, bindings) -> dict:
    """``attrs`` with symbolic dims replaced by their values."""
    out = dict(attrs)
    for key in DIM_ATTRS:
        value = out.get(key)
        if isinstance(value, str):
            out[key] = D.evaluate(value, bindings)
        elif isinstance(value, (list, tuple)):
            out[key] = type(value)(D.evaluate(v, bindings) if isinstance(v, str) else v for v in value)
    return out


def get(name: str) -> OpDef:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; known ops: {', '.join(sorted(REGISTRY))}") from None


def is_elementwise(name: str) -> bool:
    return get(name).group in ELEMENTWISE_GROUPS


# ----------------------------------------------------------------------------------------------
# Type rules shared by several ops.

def _axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise ShapeError(f"axis {axis} is out of range for rank {rank}")
    return axis % rank


def broadcast_shapes(*shapes: Sequence[Dim]) -> tuple[Dim, ...]:
    """NumPy broadcasting over possibly symbolic dims (equal, or one of them is 1)."""
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dim: Dim = 1
        for s in shapes:
            d = s[i - rank + len(s)] if i - rank + len(s) >= 0 else 1
            if d == 1:
                continue
            if dim != 1 and d != dim:
                raise ShapeError("shapes " + " and ".join(f"({', '.join(map(str, s))})" for s in shapes)
                                 + f" do not broadcast: dim {d} vs {dim}")
            dim = d
        out.append(dim)
    return tuple(out)


def _same_dtype(types: Sequence[TensorType]) -> str:
    dtypes = {t.dtype for t in types}
    if len(dtypes) != 1:
        raise ShapeError(f"operand dtypes differ: {', '.join(t.dtype for t in types)}")
    return dtypes.pop()


def infer_unary(types, attrs):
    (x,) = types
    if not x.is_float:
        raise ShapeError(f"expects a floating-point operand, got {x.dtype}")
    return x


def infer_signed(types, attrs):
    """A float or signed integer operand (``neg``, ``abs``: defined on both)."""
    (x,) = types
    if not (x.is_float or x.dtype in ("int8", "int16", "int32", "int64")):
        raise ShapeError(f"expects a number operand (float or signed integer), got {x.dtype}")
    return x


def infer_binary(types, attrs):
    return TensorType(broadcast_shapes(*(t.shape for t in types)), _same_dtype(types))


def infer_compare(types, attrs):
    _same_dtype(types)
    return TensorType(broadcast_shapes(*(t.shape for t in types)), "bool")


def infer_source(types, attrs):
    return attrs["type"]


def infer_same(types, attrs):
    return types[0]


# ----------------------------------------------------------------------------------------------
# Sources.  Their values come from outside: graph inputs, weights, or the attribute ``value``.

@op("input", SOURCE, 0, infer_source)
def _input():
    """A graph input; the interpreter reads it from the inputs it is given."""
    raise RuntimeError("input nodes are bound by the interpreter")


@op("param", SOURCE, 0, infer_source)
def _param():
    """A named weight; the interpreter reads it from the parameters it is given."""
    raise RuntimeError("param nodes are bound by the interpreter")


def _infer_const(types, attrs):
    value = attrs["value"]
    return TensorType(value.shape, check_dtype(attrs.get("dtype") or value.dtype))


@op("const", SOURCE, 0, _infer_const, dtype=None)
def const(*, value, dtype=None):
    """A constant tensor held in the graph.  ``dtype``, when given, is its type while ``value`` may
    be held more precisely (constant folding keeps float64 values, so folding changes nothing in a
    float64 run and rounds exactly like the unfolded graph in a float32 one)."""
    return value


def _infer_arange(types, attrs):
    return TensorType((attrs["n"],), attrs.get("dtype", "int64"))


@op("arange", SOURCE, 0, _infer_arange, dtype="int64")
def arange(*, n, dtype="int64"):
    """0, 1, ..., n-1 where n may be a symbolic dim (bound at run time)."""
    return np.arange(n, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Elementwise.

def _erf(x):
    from scipy.special import erf
    return erf(x)


def _sigmoid(x):
    from scipy.special import expit  # no overflow for large negative x
    return expit(x)


def _unary(name, fn, doc, infer=infer_unary):
    def ref(x):
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # NaN and inf as IEEE makes them
            return fn(x).astype(x.dtype, copy=False)
    ref.__doc__ = doc
    op(name, UNARY, 1, infer)(ref)


_unary("neg", np.negative, "-x", infer_signed)
_unary("exp", np.exp, "e**x")
_unary("log", np.log, "natural log")
_unary("sqrt", np.sqrt, "square root")
_unary("rsqrt", lambda x: 1.0 / np.sqrt(x), "1/sqrt(x)")
_unary("tanh", np.tanh, "hyperbolic tangent")
_unary("erf", _erf, "the error function")
_unary("sin", np.sin, "sine")
_unary("cos", np.cos, "cosine")
_unary("relu", lambda x: np.maximum(x, 0), "max(x, 0)")
_unary("sigmoid", _sigmoid, "1 / (1 + e**-x)")
_unary("silu", lambda x: x * _sigmoid(x), "x * sigmoid(x) (SiLU, swish)")
_unary("abs", np.abs, "|x|", infer_signed)


# Derivatives of the elementwise ops: cot * f'(x), written with the ops themselves (``out`` is f(x)).
_UNARY_VJP = {
    "neg": lambda d, x, out, cot: d("neg", cot),
    "exp": lambda d, x, out, cot: d("mul", cot, out),
    "log": lambda d, x, out, cot: d("div", cot, x),
    "sqrt": lambda d, x, out, cot: d("div", cot, d("mul", out, d.const(2.0, x))),
    "rsqrt": lambda d, x, out, cot: d("mul", cot, d("mul", d.const(-0.5, x), d("mul", out, d("mul", out, out)))),
    "tanh": lambda d, x, out, cot: d("mul", cot, d("sub", d.const(1.0, x), d("mul", out, out))),
    "erf": lambda d, x, out, cot: d("mul", cot, d("mul", d.const(2 / np.sqrt(np.pi), x),
                                                    d("exp", d("neg", d("mul", x, x))))),
    "sin": lambda d, x, out, cot: d("mul", cot, d("cos", x)),
    "cos": lambda d, x, out, cot: d("neg", d("mul", cot, d("sin", x))),
    "relu": lambda d, x, out, cot: d("where", d("gt", x, d.const(0.0, x)), cot, d.const(0.0, x)),
    "sigmoid": lambda d, x, out, cot: d("mul", cot, d("mul", out, d("sub", d.const(1.0, x), out))),
    # silu' = s + x s (1 - s) = s + out (1 - s), s = sigmoid(x)
    "silu": lambda d, x, out, cot: (lambda s: d("mul", cot, d("add", s, d("mul", out, d("sub", d.const(1.0, x), s)))))(
        d("sigmoid", x)),
    # |x|' = sign(x), 0 at 0 (as torch.abs)
    "abs": lambda d, x, out, cot: d("where", d("gt", x, d.const(0.0, x)), cot,
                                    d("where", d("lt", x, d.const(0.0, x)), d("neg", cot), d.const(0.0, x))),
}


@derivative(*_UNARY_VJP)
def _unary_vjp(d, n, xs, out, cot):
    return [_UNARY_VJP[n.op](d, xs[0], out, cot)]


@op("gelu", UNARY, 1, infer_unary, approximate="none")
def gelu(x, *, approximate="none"):
    """x * Phi(x): exact (erf) or the tanh approximation."""
    if approximate == "tanh":
        c = np.sqrt(2.0 / np.pi)
        return (0.5 * x * (1.0 + np.tanh(c * (x + 0.044715 * x ** 3)))).astype(x.dtype)
    return (0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))).astype(x.dtype)


@op("cast", UNARY, 1, lambda types, attrs: types[0].with_dtype(attrs["dtype"]))
def cast(x, *, dtype):
    """Convert to ``dtype`` (a float past the type's range becomes inf, as in IEEE arithmetic; a float with no
    integer value, NaN or inf, what the machine makes of it: no warning)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(numpy_dtype(dtype))


@derivative("gelu")
def _gelu_vjp(d, n, xs, out, cot):
    (x,) = xs
    if n.attrs["approximate"] == "tanh":  # 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2), t = tanh(c (x + a x^3))
        c, a = np.sqrt(2.0 / np.pi), 0.044715
        x2 = d("mul", x, x)
        t = d("tanh", d("mul", d.const(c, x), d("add", x, d("mul", d.const(a, x), d("mul", x2, x)))))
        one = d.const(1.0, x)
        dt = d("mul", d("sub", one, d("mul", t, t)), d("mul", d.const(c, x), d("add", one, d("mul", d.const(3 * a, x), x2))))
        grad = d("add", d("mul", d.const(0.5, x), d("add", one, t)), d("mul", d("mul", d.const(0.5, x), x), dt))
    else:  # Phi(x) + x phi(x)
        phi = d("mul", d.const(1 / np.sqrt(2 * np.pi), x), d("exp", d("mul", d.const(-0.5, x), d("mul", x, x))))
        cdf = d("mul", d.const(0.5, x), d("add", d.const(1.0, x), d("erf", d("mul", x, d.const(1 / np.sqrt(2), x)))))
        grad = d("add", cdf, d("mul", x, phi))
    return [d("mul", cot, grad)]


@derivative("cast")
def _cast_vjp(d, n, xs, out, cot):
    return [d("cast", cot, dtype=d.type(xs[0]).dtype)] if d.type(xs[0]).is_float else [None]


def _binary(name, fn, doc):
    def ref(a, b):
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # NaN and inf as IEEE makes them
            return np.asarray(fn(a, b)).astype(np.result_type(a, b), copy=False)
    ref.__doc__ = doc
    op(name, BINARY, 2, infer_binary)(ref)


_binary("add", np.add, "a + b")
_binary("sub", np.subtract, "a - b")
_binary("mul", np.multiply, "a * b")
_binary("div", np.divide, "a / b (true division)")
_binary("maximum", np.maximum, "elementwise max")
_binary("minimum", np.minimum, "elementwise min")


_binary("pow", np.power, "a ** b (a negative a to a non-integer b: NaN)")


@derivative("add", "sub", "mul", "div", "maximum", "minimum", "pow")
def _binary_vjp(d, n, xs, out, cot):
    """Each operand's cotangent summed back to its own shape (it may have been broadcast)."""
    a, b = xs
    if n.op == "add":
        da, db = cot, cot
    elif n.op == "sub":
        da, db = cot, d("neg", cot)
    elif n.op == "mul":
        da, db = d("mul", cot, b), d("mul", cot, a)
    elif n.op == "div":
        da = d("div", cot, b)
        db = d("neg", d("mul", da, d("div", a, b)))
    elif n.op == "pow":  # as torch.pow: b a^(b-1), 0 where b is 0; a^b log a, 0 where a is 0 and b >= 0
        zero = d.const(0.0, cot)
        base = d("mul", b, d("pow", a, d("sub", b, d.const(1.0, b))))
        da = d("where", d("eq", b, d.const(0.0, b)), zero, d("mul", cot, base))
        db = d("where", d("logical_and", d("eq", a, d.const(0.0, a)), d("ge", b, d.const(0.0, b))), zero,
               d("mul", cot, d("mul", out, d("log", a))))
    else:  # the larger (maximum) or smaller (minimum) one takes it (a on a tie)
        first = d("ge" if n.op == "maximum" else "le", a, b)
        da, db = d("where", first, cot, d.const(0.0, cot)), d("where", first, d.const(0.0, cot), cot)
    return [d.sum_to(da, a), d.sum_to(db, b)]


def _compare(name, fn, doc):
    def ref(a, b):
        return fn(a, b)
    ref.__doc__ = doc
    op(name, COMPARE, 2, infer_compare)(ref)


_compare("eq", np.equal, "a == b")
_compare("ne", np.not_equal, "a != b")
_compare("lt", np.less, "a < b")
_compare("le", np.less_equal, "a <= b")
_compare("gt", np.greater, "a > b")
_compare("ge", np.greater_equal, "a >= b")
_compare("logical_and", np.logical_and, "a and b")
_compare("logical_or", np.logical_or, "a or b")


def _infer_logical_not(types, attrs):
    (x,) = types
    if x.dtype != "bool":
        raise ShapeError(f"logical_not expects a bool operand, got {x.dtype}")
    return x


@op("logical_not", COMPARE, 1, _infer_logical_not)
def logical_not(x):
    """not x (``~mask``)."""
    return np.logical_not(x)


def _infer_where(types, attrs):
    cond, a, b = types
    if cond.dtype != "bool":
        raise ShapeError(f"condition must be bool, got {cond.dtype}")
    return TensorType(broadcast_shapes(cond.shape, a.shape, b.shape), _same_dtype([a, b]))


@op("where", BINARY, 3, _infer_where)
def where(cond, a, b):
    """cond ? a : b, broadcasting."""
    return np.where(cond, a, b)


@derivative("where")
def _where_vjp(d, n, xs, out, cot):
    cond, a, b = xs
    zero = d.const(0.0, cot)
    return [None, d.sum_to(d("where", cond, cot, zero), a), d.sum_to(d("where", cond, zero, cot), b)]


def _infer_broadcast_like(types, attrs):
    x, ref = types
    return TensorType(broadcast_shapes(x.shape, ref.shape), x.dtype)


@op("broadcast_like", LAYOUT, 2, _infer_broadcast_like)
def broadcast_like(x, ref):
    """``x`` broadcast against ``ref`` (whose values are not read): the derivative of a sum, zeros of a shape."""
    return np.array(np.broadcast_to(x, np.broadcast_shapes(x.shape, ref.shape)))


@derivative("broadcast_like")
def _broadcast_like_vjp(d, n, xs, out, cot):
    return [d.sum_to(cot, xs[0]), None]


def _infer_broadcast_to(types, attrs):
    (x,) = types
    shape = tuple(attrs["shape"])
    lead = len(shape) - x.rank
    if lead < 0:
        raise ShapeError(f"broadcast_to {shape}: fewer axes than the operand {x}")
    out = []
    for i, size in enumerate(shape):
        have = x.shape[i - lead] if i >= lead else None
        if size == -1:
            if have is None:
                raise ShapeError(f"broadcast_to {shape}: a new leading axis ({i}) cannot be -1")
            out.append(have)
            continue
        size = D.canonical(size)
        if have is not None and have != size and have != 1:
            raise ShapeError(f"broadcast_to {shape}: axis {i} of {x} has size {have}, which is neither {size} nor 1")
        out.append(size)
    return x.with_shape(tuple(out))


@op("broadcast_to", LAYOUT, 1, _infer_broadcast_to)
def broadcast_to(x, *, shape):
    """``x`` along its size-1 axes and new leading ones at ``shape`` (-1: the operand's size), as
    ``torch.Tensor.expand``; the graph holds the result as a value of its own."""
    lead = len(shape) - x.ndim
    return np.array(np.broadcast_to(x, [x.shape[i - lead] if s == -1 else s for i, s in enumerate(shape)]))


@derivative("broadcast_to")
def _broadcast_to_vjp(d, n, xs, out, cot):
    return [d.sum_to(cot, xs[0])]


# ----------------------------------------------------------------------------------------------
# Dropout: a counter-based generator, so that every target and the interpreter drop the same elements.

def mix32(x, const):
    """A 32-bit integer hash (the "lowbias32" finalizer) of ``x``, a uint32 value or array; written once for
    NumPy and for TVM expressions (``const(c)``: the uint32 constant ``c`` in that world)."""
    x = x ^ (x >> const(16))
    x = x * const(0x7FEB352D)
    x = x ^ (x >> const(15))
    x = x * const(0x846CA68B)
    return x ^ (x >> const(16))


def dropout_bits(index, seed, salt: int, const):
    """32 random bits for the element at flat ``index`` of the dropout site ``salt`` in the step of ``seed``
    (all uint32): a hash of the index keyed by a hash of the seed and the site."""
    site = int(mix32(np.array([salt & 0xFFFFFFFF], np.uint32), np.uint32)[0])
    key = mix32(seed ^ const(site), const)
    return mix32(mix32(index, const) ^ key, const)


def dropout_threshold(p: float) -> int:
    """An element is kept where its bits are at least this: a fraction ``p`` of the 2^32 values is below."""
    return min(int(round(p * 2.0 ** 32)), 2 ** 32 - 1)


def _infer_dropout(types, attrs):
    x, seed = types
    infer_unary([x], attrs)
    if not x.is_float:
        raise ShapeError(f"dropout needs a float tensor, got {x}")
    if seed.rank != 0 or seed.dtype not in ("int32", "int64"):
        raise ShapeError(f"dropout's seed must be an integer scalar, got {seed}")
    if not 0.0 <= attrs["p"] < 1.0:
        raise ShapeError(f"dropout probability must be in [0, 1), got {attrs['p']}")
    return x


@op("dropout", NN, 2, _infer_dropout, p=0.5, salt=0)
def dropout(x, seed, *, p=0.5, salt=0):
    """Each element zeroed with probability ``p``, the rest scaled by 1 / (1 - p), as
    ``torch.nn.functional.dropout`` in training; which elements, a function of the step's ``seed``, the
    site's ``salt`` and the element's flat index (``dropout_bits``), the same on every target."""
    index = np.arange(x.size, dtype=np.uint64).astype(np.uint32).reshape(x.shape)
    with np.errstate(over="ignore"):  # uint32 products wrap around, as they do in the kernels
        bits = dropout_bits(index, np.uint32(np.int64(seed) & 0xFFFFFFFF), salt, np.uint32)
    keep = bits >= np.uint32(dropout_threshold(p))
    return np.where(keep, x * (1.0 / (1.0 - p)), 0.0).astype(x.dtype)


@derivative("dropout")
def _dropout_vjp(d, n, xs, out, cot):
    """The same elements dropped from the cotangent, the rest scaled alike."""
    return [d("dropout", cot, xs[1], p=n.attrs["p"], salt=n.attrs["salt"]), None]


# ----------------------------------------------------------------------------------------------
# Contractions and normalizations.

def _infer_matmul(types, attrs):
    a, b = types
    if a.rank < 2 or b.rank < 2:
        raise ShapeError(f"matmul needs operands of rank >= 2, got {a} and {b}")
    if a.shape[-1] != b.shape[-2]:
        raise ShapeError(f"contracting dims differ: {a} @ {b} ({a.shape[-1]} vs {b.shape[-2]})")
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return TensorType(batch + (a.shape[-2], b.shape[-1]), _same_dtype(types))


@op("matmul", NN, 2, _infer_matmul, flops=contraction_flops)
def matmul(a, b):
    """Batched matrix product with broadcasting batch dims, as ``np.matmul``."""
    return np.matmul(a, b)


@derivative("matmul")
def _matmul_vjp(d, n, xs, out, cot):
    """d a = cot @ b^T, d b = a^T @ cot, each summed over the batch dims it was broadcast along."""
    a, b = xs
    da = d.sum_to(d("matmul", cot, d.swap_last(b)), a)
    if d.type(b).rank == 2 and d.type(a).rank >= 2:  # a weight: summed over every leading position at once
        return [da, d("weight_grad", a, cot)]
    return [da, d.sum_to(d("matmul", d.swap_last(a), cot), b)]


def _infer_weight_grad(types, attrs):
    x, g = types
    if x.rank < 2 or g.rank != x.rank or tuple(x.shape[:-1]) != tuple(g.shape[:-1]):
        raise ShapeError(f"weight_grad needs operands with the same leading dims, got {x} and {g}")
    return TensorType((x.shape[-1], g.shape[-1]), _same_dtype(types))


def _weight_grad_flops(attrs, in_shapes, out_shape) -> int:
    return 2 * int(np.prod(in_shapes[0], dtype=np.int64)) * int(out_shape[-1])


@op("weight_grad", NN, 2, _infer_weight_grad, flops=_weight_grad_flops)
def weight_grad(x, g):
    """x^T g over every leading position: (..., K), (..., N) -> (K, N), the sum of the outer products
    x[p] g[p]^T (the gradient of a projection's weight, contracted over batch and sequence)."""
    return np.matmul(x.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1]))


@derivative("weight_grad")
def _weight_grad_vjp(d, n, xs, out, cot):
    x, g = xs
    return [d("matmul", g, d.swap_last(cot)), d("matmul", x, cot)]


def _infer_softmax(types, attrs):
    x = infer_unary(types, attrs)
    _axis(attrs["axis"], x.rank)
    return x


@op("softmax", NN, 1, _infer_softmax, rows=True, axis=-1)
def softmax(x, *, axis=-1):
    """exp(x - max) / sum(exp(x - max)) along ``axis``; rows of all -inf give NaN, as in PyTorch."""
    with np.errstate(invalid="ignore"):  # a fully masked row is NaN by definition
        m = np.max(x, axis=axis, keepdims=True)
        e = np.exp(x - m)
        return e / np.sum(e, axis=axis, keepdims=True)


@op("log_softmax", NN, 1, _infer_softmax, rows=True, axis=-1)
def log_softmax(x, *, axis=-1):
    """x - logsumexp(x) along ``axis``."""
    m = np.max(x, axis=axis, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))


@derivative("softmax")
def _softmax_vjp(d, n, xs, out, cot):
    """p (cot - sum(cot p)) along the axis."""
    return [softmax_backward(d, out, cot, n.attrs["axis"])]


def softmax_backward(d, p, cot, axis=-1):
    return d("mul", p, d("sub", cot, d("reduce_sum", d("mul", cot, p), axes=(axis,), keepdims=True)))


@derivative("log_softmax")
def _log_softmax_vjp(d, n, xs, out, cot):
    """cot - exp(out) sum(cot) along the axis."""
    axis = n.attrs["axis"]
    return [d("sub", cot, d("mul", d("exp", out), d("reduce_sum", cot, axes=(axis,), keepdims=True)))]


def _infer_cross_entropy(types, attrs):
    x, target = types
    infer_unary([x], attrs)
    if target.dtype not in ("int32", "int64"):
        raise ShapeError(f"cross_entropy targets must be integers, got {target.dtype}")
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ShapeError(f"cross_entropy: targets {target} must have the shape of the scores {x} without their "
                         f"last (class) axis")
    return TensorType(target.shape, x.dtype)


@op("cross_entropy", NN, 2, _infer_cross_entropy, label_smoothing=0.0, ignore_index=-100, log_probs=False)
def cross_entropy(x, target, *, label_smoothing=0.0, ignore_index=-100, log_probs=False):
    """Per position, -sum_j q_j log p_j over the classes (the last axis): p = softmax(x), or x = log p with
    ``log_probs``; q the target's one-hot smoothed as PyTorch's ``label_smoothing`` (1 - eps on the target,
    eps/V on every class); 0 where the target is ``ignore_index``."""
    logp = x if log_probs else log_softmax(x)
    valid = target != ignore_index
    nll = -np.take_along_axis(logp, np.where(valid, target, 0)[..., None], -1)[..., 0]
    loss = (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    return np.where(valid, loss, 0).astype(x.dtype)


@derivative("cross_entropy")
def _cross_entropy_vjp(d, n, xs, out, cot):
    """(p - q) cot, or -q cot for log-probabilities, at the positions not ignored."""
    x, target = xs
    xt, a = d.type(x), n.attrs
    classes = xt.shape[-1]
    column = d("reshape", target, shape=tuple(d.type(target).shape) + (1,))
    onehot = d("cast", d("eq", d("arange", n=classes, dtype=d.type(target).dtype), column), dtype=xt.dtype)
    eps = a["label_smoothing"]
    q = d("add", d("mul", onehot, d.const(1 - eps, x)), d.const(eps / classes, x))
    g = d("neg", q) if a["log_probs"] else d("sub", d("softmax", x, axis=-1), q)
    valid = d("ne", column, d.const(np.asarray(a["ignore_index"], d.type(target).dtype), None))
    scaled = d("mul", g, d("reshape", cot, shape=d.type(column).shape))
    return [d("where", valid, scaled, d.const(0.0, x)), None]


def _infer_layer_norm(types, attrs):
    x, gamma, beta = types
    infer_unary([x], attrs)
    d = x.shape[-1]
    for name, t in (("weight", gamma), ("bias", beta)):
        if t.shape != (d,):
            raise ShapeError(f"layer_norm {name} must have shape ({d},), got {t}")
    _same_dtype(types)
    return x


@op("layer_norm", NN, 3, _infer_layer_norm, rows=True, eps=1e-5)
def layer_norm(x, gamma, beta, *, eps=1e-5):
    """(x - mean) / sqrt(var + eps) * gamma + beta over the last axis (biased variance)."""
    mean = np.mean(x, axis=-1, keepdims=True)
    var = np.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _infer_norm_grad(types, attrs):
    x, weight, cot = types
    infer_unary([x], attrs)
    if weight.shape != (x.shape[-1],) or cot != x:
        raise ShapeError(f"a norm's gradient takes x, its weight ({x.shape[-1]},) and the cotangent of x's type, "
                         f"got {x}, {weight}, {cot}")
    _same_dtype(types)
    return x


@op("layer_norm_grad", NN, 3, _infer_norm_grad, rows=True, eps=1e-5)
def layer_norm_grad(x, gamma, cot, *, eps=1e-5):
    """d x of ``layer_norm(x, gamma, beta)`` given the result's cotangent, one row at a time with the
    statistics recomputed: rstd (g - mean(g) - xhat mean(g xhat)), g = cot gamma, xhat = (x - mean) rstd."""
    centered = x - np.mean(x, axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(np.mean(centered * centered, axis=-1, keepdims=True) + eps)
    xhat, g = centered * rstd, cot * gamma
    return rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))


def layer_norm_backward(d, x, gamma, cot, eps):
    """(d x, d gamma, d beta) of ``layer_norm(x, gamma, beta)``: d x one row kernel (``layer_norm_grad``),
    d gamma the sum of cot xhat over the rows (xhat = ``layer_norm(x, 1, 0)``, another), d beta that of cot."""
    ones, zeros = (d("broadcast_like", d.const(v, x), gamma) for v in (1.0, 0.0))
    xhat = d("layer_norm", x, ones, zeros, eps=eps)
    return (d("layer_norm_grad", x, gamma, cot, eps=eps), d.sum_to(d("mul", cot, xhat), gamma), d.sum_to(cot, gamma))


@derivative("layer_norm")
def _layer_norm_vjp(d, n, xs, out, cot):
    return list(layer_norm_backward(d, xs[0], xs[1], cot, n.attrs["eps"]))


def _infer_rms_norm(types, attrs):
    x, weight = types
    infer_unary([x], attrs)
    if weight.shape != (x.shape[-1],):
        raise ShapeError(f"rms_norm weight must have shape ({x.shape[-1]},), got {weight}")
    _same_dtype(types)
    return x


@op("rms_norm", NN, 2, _infer_rms_norm, rows=True, eps=1e-6)
def rms_norm(x, weight, *, eps=1e-6):
    """x / sqrt(mean(x**2) + eps) * weight over the last axis (LLaMA's, T5's norm: no mean, no bias)."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rms_norm_backward(d, x, weight, cot, eps):
    """(d x, d weight) of ``rms_norm(x, weight)``: dx = r (g - xhat mean(g xhat)) with r = rsqrt(mean(x^2) + eps),
    xhat = x r, g = cot weight."""
    last = (-1,)
    r = d("rsqrt", d("add", d("reduce_mean", d("mul", x, x), axes=last, keepdims=True), d.const(eps, x)))
    xhat = d("mul", x, r)
    g = d("mul", cot, weight)
    dx = d("mul", r, d("sub", g, d("mul", xhat, d("reduce_mean", d("mul", g, xhat), axes=last, keepdims=True))))
    return dx, d.sum_to(d("mul", cot, xhat), weight)


@derivative("rms_norm")
def _rms_norm_vjp(d, n, xs, out, cot):
    return list(rms_norm_backward(d, xs[0], xs[1], cot, n.attrs["eps"]))


def _infer_reduce(types, attrs):
    (x,) = types
    axes = {_axis(a, x.rank) for a in attrs["axes"]}
    keep = attrs.get("keepdims", False)
    shape = [1 if i in axes else d for i, d in enumerate(x.shape)] if keep else \
        [d for i, d in enumerate(x.shape) if i not in axes]
    return x.with_shape(shape)


def _reduce(name, fn, doc):
    def ref(x, *, axes, keepdims=False):
        return fn(x, axis=tuple(axes), keepdims=keepdims).astype(x.dtype, copy=False)
    ref.__doc__ = doc
    op(name, REDUCE, 1, _infer_reduce, keepdims=False)(ref)


_reduce("reduce_sum", np.sum, "sum over ``axes``")
_reduce("reduce_mean", np.mean, "mean over ``axes``")
_reduce("reduce_max", np.max, "max over ``axes``")


@derivative("reduce_sum", "reduce_mean", "reduce_max")
def _reduce_vjp(d, n, xs, out, cot):
    """The cotangent spread back over the reduced axes (divided by their size for the mean; for the max,
    to the positions that hold it)."""
    (x,) = xs
    xt = d.type(x)
    axes = {a % xt.rank for a in n.attrs["axes"]}
    kept = d("reshape", cot, shape=tuple(1 if i in axes else s for i, s in enumerate(xt.shape)))
    if n.op == "reduce_max":
        at_max = d("eq", x, d("reshape", out, shape=d.type(kept).shape))
        return [d("where", at_max, d("broadcast_like", kept, x), d.const(0.0, x))]
    spread = d("broadcast_like", kept, x)
    if n.op == "reduce_mean":
        sizes = [xt.shape[a] for a in axes]
        if all(isinstance(s, int) for s in sizes):
            return [d("mul", spread, d.const(1.0 / max(1, int(np.prod(sizes))), x))]
        # a symbolic size: counted by the graph, at run time
        count = d("reduce_sum", d("broadcast_like", d.const(1.0, x), x), axes=tuple(axes), keepdims=True)
        spread = d("div", spread, d("broadcast_like", count, x))
    return [spread]


# ----------------------------------------------------------------------------------------------
# Layout.

def resolve_reshape(in_shape: Sequence[Dim], shape: Sequence[Dim]) -> tuple[Dim, ...]:
    """The target shape of a reshape with at most one -1 resolved; checks the element count."""
    shape = [D.canonical(d) for d in shape]
    total = D.product(in_shape)
    holes = [i for i, d in enumerate(shape) if d == -1]
    if len(holes) > 1:
        raise ShapeError(f"reshape to {tuple(shape)}: at most one -1 allowed")
    if holes:
        known = D.product(d for d in shape if d != -1)
        rest = D.divide(total, known)
        if rest is None:
            raise ShapeError(f"cannot reshape ({', '.join(map(str, in_shape))}) to {tuple(shape)}: "
                             f"{total} elements are not divisible by {known}")
        shape[holes[0]] = rest
    if D.product(shape) != total:
        raise ShapeError(f"cannot reshape ({', '.join(map(str, in_shape))}) "
                         f"to ({', '.join(map(str, shape))}): element counts {total} and "
                         f"{D.product(shape)} differ")
    return tuple(shape)


@op("reshape", LAYOUT, 1, lambda types, attrs: types[0].with_shape(resolve_reshape(types[0].shape, attrs["shape"])))
def reshape(x, *, shape):
    """Reshape (row-major); the target shape's symbolic dims are bound by the interpreter."""
    return np.reshape(x, shape)


@derivative("reshape")
def _reshape_vjp(d, n, xs, out, cot):
    return [d("reshape", cot, shape=d.type(xs[0]).shape)]


def _infer_transpose(types, attrs):
    (x,) = types
    perm = tuple(attrs["perm"])
    if sorted(perm) != list(range(x.rank)):
        raise ShapeError(f"transpose perm {perm} is not a permutation of {x.rank} axes")
    return x.with_shape([x.shape[p] for p in perm])


@op("transpose", LAYOUT, 1, _infer_transpose)
def transpose(x, *, perm):
    """Permute axes."""
    return np.transpose(x, perm)


@derivative("transpose")
def _transpose_vjp(d, n, xs, out, cot):
    perm = tuple(n.attrs["perm"])
    return [d("transpose", cot, perm=tuple(perm.index(a) for a in range(len(perm))))]


def _infer_slice(types, attrs):
    (x,) = types
    axis = _axis(attrs["axis"], x.rank)
    start, stop, step = attrs.get("start", 0), attrs.get("stop"), attrs.get("step", 1)
    size = x.shape[axis]
    stop = size if stop is None else stop
    if step < 1:
        raise ShapeError(f"slice step must be positive, got {step}")
    for name, v in (("start", start), ("stop", stop)):
        if isinstance(v, int) and v < 0:
            raise ShapeError(f"slice {name} {v} is negative; use an explicit offset")
    if isinstance(size, int) and isinstance(stop, int) and stop > size:
        raise ShapeError(f"slice stop {stop} is past the end of axis {axis} of size {size}")
    length = D.sub(stop, start)
    if step != 1:
        if not isinstance(length, int):
            raise ShapeError("a slice with step > 1 needs static bounds")
        length = (length + step - 1) // step
    if isinstance(length, int) and length < 0:
        raise ShapeError(f"slice [{start}:{stop}] is empty or reversed")
    shape = list(x.shape)
    shape[axis] = length
    return x.with_shape(shape)


@op("slice", LAYOUT, 1, _infer_slice, start=0, stop=None, step=1)
def slice_(x, *, axis, start=0, stop=None, step=1):
    """x[..., start:stop:step, ...] along ``axis``; symbolic bounds are bound by the interpreter."""
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop, step)
    return x[tuple(index)]


@derivative("slice")
def _slice_vjp(d, n, xs, out, cot):
    """The cotangent written into zeros of the operand's shape at the slice's place; with a step, first
    spread out: each row followed by step - 1 rows of zeros."""
    (x,) = xs
    xt, ct = d.type(x), d.type(cot)
    axis, start, step = n.attrs["axis"] % xt.rank, n.attrs.get("start", 0), n.attrs.get("step", 1)
    if not isinstance(start, int):
        raise ShapeError(f"the derivative of a slice from the symbolic position {start} is not defined")
    if step != 1:
        rows, before, after = ct.shape[axis], tuple(ct.shape[:axis]), tuple(ct.shape[axis + 1:])
        column = d("reshape", cot, shape=before + (rows, 1) + after)
        gaps = d("broadcast_like", d.const(np.zeros((1,) * axis + (1, step - 1) + (1,) * len(after)), cot), column)
        cot = d("reshape", d("concat", column, gaps, axis=axis + 1), shape=before + (rows * step,) + after)
        room = D.sub(xt.shape[axis], start)
        if not isinstance(room, int) or room < rows * step:
            cot = d("slice", cot, axis=axis, start=0, stop=room)
    zeros = d("broadcast_like", d.const(0.0, cot), x)
    offset = d.const(np.asarray(start, np.int64), None)
    return [d("update_slice", zeros, cot, offset, axis=axis)]


def _infer_concat(types, attrs):
    if not types:
        raise ShapeError("concat needs at least one operand")
    axis = _axis(attrs["axis"], types[0].rank)
    dtype = _same_dtype(types)
    total: Dim = 0
    for t in types:
        if t.rank != types[0].rank or any(a != b for i, (a, b) in enumerate(zip(t.shape, types[0].shape)) if i != axis):
            raise ShapeError(f"concat along axis {axis}: shapes {', '.join(str(t) for t in types)} differ off-axis")
        total = D.add(total, t.shape[axis])
    shape = list(types[0].shape)
    shape[axis] = total
    return TensorType(tuple(shape), dtype)


@op("concat", LAYOUT, None, _infer_concat)
def concat(*xs, axis):
    """Join along ``axis``."""
    return np.concatenate(xs, axis=axis)


@derivative("concat")
def _concat_vjp(d, n, xs, out, cot):
    axis, start, parts = n.attrs["axis"] % d.type(cot).rank, 0, []
    for x in xs:
        size = d.type(x).shape[axis]
        parts.append(d("slice", cot, axis=axis, start=start, stop=D.add(start, size)))
        start = D.add(start, size)
    return parts


def _infer_gather(types, attrs):
    table, idx = types
    if idx.dtype not in ("int32", "int64"):
        raise ShapeError(f"gather indices must be integers, got {idx.dtype}")
    if table.rank < 1:
        raise ShapeError("gather table must have rank >= 1")
    return TensorType(idx.shape + table.shape[1:], table.dtype)


class IndexOutOfRange(IndexError):
    """An index (a token id, say) outside the table it looks up."""


@op("gather", LAYOUT, 2, _infer_gather)
def gather(table, idx):
    """table[idx] along axis 0 (an embedding lookup); an index out of range is an error."""
    if idx.size and (idx.min() < 0 or idx.max() >= table.shape[0]):
        bad = idx[(idx < 0) | (idx >= table.shape[0])].ravel()[0]
        raise IndexOutOfRange(f"index {bad} is out of range for a table of {table.shape[0]} rows")
    return np.take(table, idx, axis=0)


@derivative("gather")
def _gather_vjp(d, n, xs, out, cot):
    table, idx = xs
    return [d("scatter_add", idx, cot, table), None]


def _infer_scatter_add(types, attrs):
    idx, values, table = types
    if idx.dtype not in ("int32", "int64"):
        raise ShapeError(f"scatter_add indices must be integers, got {idx.dtype}")
    if values.shape != idx.shape + table.shape[1:]:
        raise ShapeError(f"scatter_add: values {values} must have the indices' shape {idx} then the rows' {table}")
    return TensorType(table.shape, values.dtype)


@op("scatter_add", LAYOUT, 3, _infer_scatter_add)
def scatter_add(idx, values, table):
    """Zeros of ``table``'s shape with each row of ``values`` added at its index (the derivative of a
    gather: an embedding's gradient); ``table``'s values are not read."""
    out = np.zeros(table.shape, values.dtype)
    np.add.at(out, idx.reshape(-1), values.reshape((-1,) + table.shape[1:]))
    return out


@derivative("scatter_add")
def _scatter_add_vjp(d, n, xs, out, cot):
    idx, values, table = xs
    return [None, d("gather", cot, idx), None]


def _infer_update_slice(types, attrs):
    cache, value, offset = types
    axis = _axis(attrs["axis"], cache.rank)
    if value.rank != cache.rank or any(a != b for i, (a, b) in enumerate(zip(cache.shape, value.shape)) if i != axis):
        raise ShapeError(f"update_slice: value {value} must match cache {cache} off axis {axis}")
    if offset.dtype not in ("int32", "int64") or offset.rank != 0:
        raise ShapeError(f"update_slice: offset must be an integer scalar, got {offset}")
    if cache.dtype != value.dtype:
        raise ShapeError(f"update_slice: cache is {cache.dtype} but value is {value.dtype}")
    return cache


@op("update_slice", LAYOUT, 3, _infer_update_slice)
def update_slice(cache, value, offset, *, axis):
    """``cache`` with ``cache[..., offset:offset+len(value), ...] = value`` along ``axis`` (a KV-cache write).
    Semantically a new tensor; executors may write in place when ``cache`` has no later use."""
    start = int(offset)
    if start < 0 or start + value.shape[axis] > cache.shape[axis]:
        raise IndexOutOfRange(f"writing {value.shape[axis]} entries at offset {start} overflows a cache of "
                              f"{cache.shape[axis]} along axis {axis}")
    out = cache.copy()
    index = [slice(None)] * cache.ndim
    index[axis] = slice(start, start + value.shape[axis])
    out[tuple(index)] = value
    return out
