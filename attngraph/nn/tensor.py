"""Tracing: symbolic tensors that record ops into the graph being built.

Inside ``attngraph.trace`` every operation on a ``Tensor`` (``+``, ``@``, ``softmax``, ...) adds a
node to the current graph, tagged with the user's source line and the module it runs in.  Outside a
trace, tensors do not exist: the DSL only describes computation.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from ..ir import Graph, GraphError, TensorType
from ..ir.types import numpy_dtype
from ..ir import dims as D
from ..ir.dims import Dim
from .spec import InputSpec


class TraceError(RuntimeError):
    """Misuse of the DSL: a tensor op outside a trace, a bad output, a tensor from another trace."""


class SymDim(str):
    """A symbolic size as the DSL hands it out (``x.shape[1]``, ``x.size(-1)``): the name or expression of the
    graph's dims (a ``str``, as every symbolic dim), with the arithmetic of PyTorch's sizes: ``k_len - q_len``,
    ``2 * seq``, ``seq + 1``, ``n // 2`` (where it divides), ``-seq``.  Sizes anywhere in the DSL take it."""

    def __add__(self, other): return _sym(D.add(str(self), _plain(other)))
    def __radd__(self, other): return _sym(D.add(_plain(other), str(self)))
    def __sub__(self, other): return _sym(D.sub(str(self), _plain(other)))
    def __rsub__(self, other): return _sym(D.sub(_plain(other), str(self)))
    def __mul__(self, other): return _sym(D.mul(str(self), _plain(other)))
    def __rmul__(self, other): return _sym(D.mul(_plain(other), str(self)))
    def __neg__(self): return _sym(D.mul(-1, str(self)))

    def __floordiv__(self, other):
        quotient = D.divide(str(self), _plain(other))
        if quotient is None:
            raise TraceError(f"{self} // {other} at {_user_location()}: a symbolic size divides only where the quotient "
                             f"is exact for every size (as {self} = {other} * k); give a static size")
        return _sym(quotient)

    def __truediv__(self, other):
        raise TraceError(f"{self} / {other} at {_user_location()}: a symbolic size has no float value while tracing; "
                         f"use // where it divides exactly")

    def _compare(self, other, op: str, spelled: str):
        if isinstance(other, str):  # names and expressions of dims compare as text
            return getattr(str, op)(self, other)
        raise TraceError(f"{self} {spelled} {other!r} at {_user_location()}: a symbolic size has no value while "
                         f"tracing (one graph serves every {self}); give that input a fixed size, or compute with "
                         f"tensors")

    def __lt__(self, other): return self._compare(other, "__lt__", "<")
    def __le__(self, other): return self._compare(other, "__le__", "<=")
    def __gt__(self, other): return self._compare(other, "__gt__", ">")
    def __ge__(self, other): return self._compare(other, "__ge__", ">=")
    __hash__ = str.__hash__


def _plain(dim):
    if isinstance(dim, (int, np.integer)) and not isinstance(dim, bool):
        return int(dim)
    if isinstance(dim, str):
        return str(dim)
    raise TraceError(f"{dim!r} at {_user_location()} is not a size (an int or a symbolic dim)")


def _sym(dim):
    """A dim as the DSL hands it out: an int, or a ``SymDim``."""
    return SymDim(dim) if isinstance(dim, str) else dim


_TRACERS: list["Tracer"] = []
_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Frames from these files are machinery, not the model: the recorded line is the first frame
# outside them (a layer in nn/layers.py counts as model code: it is where the op was written).
_MACHINERY = {os.path.join(_PKG_DIR, "nn", f) for f in ("tensor.py", "functional.py", "module.py")}


def _user_location() -> str:
    """``file:line in function`` of the op; for an op written in one of attngraph's own layers, called
    from the user's code, also that call (``... (called from my_model.py:12 in forward)``)."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_filename in _MACHINERY
                                 or frame.f_code.co_filename.startswith(os.path.join(_PKG_DIR, "ir"))):
        frame = frame.f_back
    if frame is None:
        return ""
    where = _frame_text(frame)
    if frame.f_code.co_filename.startswith(_PKG_DIR + os.sep):
        caller = frame.f_back
        while caller is not None and caller.f_code is not trace.__code__ \
                and caller.f_code.co_filename.startswith(_PKG_DIR + os.sep):
            caller = caller.f_back
        if caller is not None and caller.f_code is not trace.__code__:
            where += f" (called from {_frame_text(caller)})"
    return where


def _users_line(error: BaseException) -> str:
    """``file:line in function`` of the innermost frame of ``error``'s traceback outside attngraph's
    package (and outside the Python installation's own modules); "" if there is none."""
    where, tb = "", error.__traceback__
    while tb is not None:
        path = tb.tb_frame.f_code.co_filename
        if not path.startswith((_PKG_DIR + os.sep, sys.prefix, sys.base_prefix, "<frozen")):
            where = _frame_text(tb.tb_frame, tb.tb_lineno)
        tb = tb.tb_next
    return where


def _frame_text(frame, line: int | None = None) -> str:
    path = frame.f_code.co_filename
    rel = os.path.relpath(path) if not path.startswith("<") else path
    if not rel.startswith(".."):
        path = rel
    return f"{path}:{line or frame.f_lineno} in {frame.f_code.co_name}"


#: the graph input a training graph with dropout takes: a different value each step
DROPOUT_SEED = "dropout_seed"


class Tracer:
    """The state of one trace: the graph, the parameter nodes made so far, the module scope."""

    def __init__(self, graph: Graph, param_names: Mapping[int, str], module_names: Mapping[int, str],
                 buffer_names: Mapping[int, str] | None = None):
        self.graph = graph
        self.param_names = dict(param_names)
        self.module_names = dict(module_names)
        self.buffer_names = dict(buffer_names or {})
        self.param_nodes: dict[int, "Tensor"] = {}
        self.buffer_nodes: dict[int, "Tensor"] = {}
        self.scope: list[str] = []
        self.seed: "Tensor | None" = None
        self.dropout_sites = 0

    def dropout_seed(self) -> tuple["Tensor", int]:
        """The step's random seed (the graph input ``dropout_seed``, made at the first dropout) and a salt
        of the dropout site asking, different for every site."""
        if self.seed is None:
            nid = self.graph.add("input", (), {"type": TensorType((), "int64")}, name=DROPOUT_SEED,
                                 meta={"low": 0, "high": 2 ** 31, "kind": "seed"})
            self.seed = Tensor(self, nid)
        self.dropout_sites += 1
        return self.seed, self.dropout_sites

    def emit(self, op: str, operands: Sequence["Tensor"] = (), attrs: dict | None = None,
             name: str | None = None) -> "Tensor":
        ids = []
        for t in operands:
            if t.tracer is not self:
                raise TraceError(f"{op}: operand %{t.node.name} belongs to another trace")
            ids.append(t.id)
        meta = {"loc": _user_location()}
        if self.scope and self.scope[-1]:
            meta["scope"] = self.scope[-1]
        nid = self.graph.add(op, ids, attrs, name=name, meta=meta)
        return Tensor(self, nid)

    def param(self, p) -> "Tensor":
        if id(p) not in self.param_nodes:
            if id(p) not in self.param_names:
                raise TraceError("a Parameter that is not an attribute of the traced module (or of one "
                                 "of its submodules) was used; assign it to a module attribute")
            name = self.param_names[id(p)]
            nid = self.graph.add("param", (), {"type": TensorType(p.shape, p.dtype)}, name=name,
                                 meta={"init": p.init})
            self.param_nodes[id(p)] = Tensor(self, nid)
        return self.param_nodes[id(p)]

    def buffer(self, b) -> "Tensor":
        if id(b) not in self.buffer_nodes:
            if id(b) not in self.buffer_names:
                raise TraceError("a Buffer that is not an attribute of the traced module (or of one of its "
                                 "submodules) was used; register it with register_buffer")
            nid = self.graph.add("const", (), const_attrs(b.value), name=self.buffer_names[id(b)],
                                 meta={"buffer": self.buffer_names[id(b)]})
            self.buffer_nodes[id(b)] = Tensor(self, nid)
        return self.buffer_nodes[id(b)]


def current_tracer() -> Tracer:
    if not _TRACERS:
        raise TraceError("tensor operations only work while tracing; call attngraph.trace(module)")
    return _TRACERS[-1]


def as_tensor(x, like: "Tensor | None" = None) -> "Tensor":
    """A traced tensor for ``x``: a Tensor, a Parameter, or a Python/NumPy constant."""
    if isinstance(x, Tensor):
        return x
    if hasattr(x, "_traced"):
        return x._traced()
    tracer = current_tracer()
    if isinstance(x, (bool, int, float, np.number, np.ndarray)):
        value = np.asarray(x)
        if like is not None and not isinstance(x, np.ndarray):  # a Python number takes the other operand's type
            return tracer.emit("const", (), const_attrs(value, like.dtype if not (
                isinstance(x, (float, np.floating)) and not like.type.is_float) else None))
        return tracer.emit("const", (), const_attrs(value))
    raise TraceError(f"cannot use {type(x).__name__} {x!r} as a tensor")


def const_attrs(value, dtype: str | None = None) -> dict:
    """A ``const`` node's attributes for ``value`` of type ``dtype`` (default: its own, float64 taken as float32,
    the DSL's float).  A float value is held in float64 whatever its type, so a float64 run of the interpreter
    computes with the constant as the program wrote it (a scale, a table of positions, a float64 buffer) and a
    float32 run rounds it once, as PyTorch would."""
    value = np.asarray(value)
    if dtype is None:
        dtype = "float32" if value.dtype == np.float64 else str(value.dtype)
    if value.dtype.kind == "f" and TensorType((), dtype).is_float:
        return {"value": value.astype(np.float64), "dtype": dtype}
    return {"value": value.astype(numpy_dtype(dtype)) if str(value.dtype) != dtype else value}


def where(cond, a, b) -> "Tensor":
    """``cond ? a : b``; a Python scalar takes the other branch's dtype."""
    if isinstance(a, (int, float)) and not isinstance(b, (int, float)):
        a = as_tensor(a, like=as_tensor(b))
    if isinstance(b, (int, float)) and not isinstance(a, (int, float)):
        b = as_tensor(b, like=as_tensor(a))
    ts = [as_tensor(x) for x in (cond, a, b)]
    return current_tracer().emit("where", ts)


class TensorOps:
    """Operators and methods shared by ``Tensor`` and ``Parameter``; each records one or more ops."""

    # NumPy arrays must defer to our reflected operators (``array @ tensor`` records a matmul).
    __array_ufunc__ = None

    def _traced(self) -> "Tensor":  # pragma: no cover - overridden
        raise NotImplementedError

    # properties
    @property
    def type(self) -> TensorType:
        return self._traced().node.type

    @property
    def shape(self) -> tuple[Dim, ...]:
        """The sizes: ints, and ``SymDim`` for symbolic ones (which do arithmetic as PyTorch's sizes)."""
        return tuple(_sym(d) for d in self.type.shape)

    @property
    def dtype(self) -> str:
        return self.type.dtype

    @property
    def ndim(self) -> int:
        return self.type.rank

    # arithmetic
    def _binary(self, op, other, reverse=False):
        a = self._traced()
        b = as_tensor(other, like=a)
        return a.tracer.emit(op, (b, a) if reverse else (a, b))

    def __add__(self, o): return self._binary("add", o)
    def __radd__(self, o): return self._binary("add", o, True)
    def __sub__(self, o): return self._binary("sub", o)
    def __rsub__(self, o): return self._binary("sub", o, True)
    def __mul__(self, o): return self._binary("mul", o)
    def __rmul__(self, o): return self._binary("mul", o, True)
    def __truediv__(self, o): return self._binary("div", o)
    def __rtruediv__(self, o): return self._binary("div", o, True)
    def __matmul__(self, o): return self._binary("matmul", o)
    def __rmatmul__(self, o): return self._binary("matmul", o, True)
    def __lt__(self, o): return self._binary("lt", o)
    def __le__(self, o): return self._binary("le", o)
    def __gt__(self, o): return self._binary("gt", o)
    def __ge__(self, o): return self._binary("ge", o)
    def eq(self, o): return self._binary("eq", o)
    def ne(self, o): return self._binary("ne", o)
    # ``mask == 0`` is an op, as in PyTorch and NumPy (the Annotated Transformer's masked_fill(mask == 0, ...))
    def __eq__(self, o): return self._binary("eq", o)
    def __ne__(self, o): return self._binary("ne", o)
    __hash__ = object.__hash__  # defining __eq__ would drop it: tensors and parameters key dicts by identity
    def __and__(self, o): return self._binary("logical_and", o)
    def __or__(self, o): return self._binary("logical_or", o)
    def __rand__(self, o): return self._binary("logical_and", o, True)
    def __ror__(self, o): return self._binary("logical_or", o, True)
    def __invert__(self):
        """``~mask``: logical not of a bool tensor, as PyTorch's."""
        t = self._traced()
        if t.dtype != "bool":
            raise TraceError(f"~ on %{t.node.name}: {t.type} at {_user_location()}: ~ is the logical not of a bool "
                             f"tensor here (a bitwise not of integers is not supported)")
        return t.tracer.emit("logical_not", (t,))

    def __bool__(self):
        raise TraceError(f"a traced tensor has no truth value (`if t:`, `bool(t)`, `and`/`or`) at {_user_location()}: "
                         f"its value is only known when the graph runs; compute with F.where or masks instead")

    def __neg__(self):
        t = self._traced()
        return t.tracer.emit("neg", (t,))

    def __pow__(self, exponent):
        """``x ** p`` (``torch.pow``): ``x * x`` for 2, ``sqrt`` for 0.5, ``rsqrt`` for -0.5, ``1 / x`` for -1,
        ``x`` for 1, 1 for 0 (what they compute exactly, spelled as the passes see any other spelling); else
        the ``pow`` op."""
        t = self._traced()
        if isinstance(exponent, (int, float)) and not isinstance(exponent, bool) and t.type.is_float:
            p = float(exponent)
            if p == 2.0:
                return t * t
            if p == 1.0:
                return t
            if p == 0.5:
                return t.sqrt()
            if p == -0.5:
                return t.rsqrt()
            if p == -1.0:
                return 1.0 / t
            if p == 0.0:
                return _full_like(t, 1.0)
        return self._binary("pow", exponent)

    def __rpow__(self, base): return self._binary("pow", base, True)
    def pow(self, exponent): return self ** exponent

    def __abs__(self): return self._unary("abs")
    def abs(self): return self._unary("abs")
    def minimum(self, other): return self._binary("minimum", other)
    def maximum(self, other): return self._binary("maximum", other)

    def clamp(self, min=None, max=None):  # noqa: A002 - PyTorch's keyword names
        """``torch.clamp``: ``min(max(x, min), max)`` (a bound may be a number or a tensor; at least one given)."""
        if min is None and max is None:
            raise TraceError(f"clamp of %{self._traced().node.name} at {_user_location()}: give min, max or both")
        out = self._traced()
        if min is not None:
            out = out.maximum(min)
        if max is not None:
            out = out.minimum(max)
        return out

    clip = clamp
    def clamp_min(self, min): return self.clamp(min=min)  # noqa: A002
    def clamp_max(self, max): return self.clamp(max=max)  # noqa: A002

    def _unary(self, op, **attrs):
        t = self._traced()
        return t.tracer.emit(op, (t,), attrs)

    def exp(self): return self._unary("exp")
    def log(self): return self._unary("log")
    def sqrt(self): return self._unary("sqrt")
    def rsqrt(self): return self._unary("rsqrt")
    def tanh(self): return self._unary("tanh")
    def relu(self): return self._unary("relu")
    def sigmoid(self): return self._unary("sigmoid")
    def silu(self): return self._unary("silu")
    def sin(self): return self._unary("sin")
    def cos(self): return self._unary("cos")
    def square(self): return self ** 2
    # NumPy's spellings (axis, keepdims) and PyTorch's (dim, keepdim) both work.
    def softmax(self, axis=-1, *, dim=None): return self._unary("softmax", axis=axis if dim is None else dim)
    def log_softmax(self, axis=-1, *, dim=None): return self._unary("log_softmax", axis=axis if dim is None else dim)
    def astype(self, dtype):
        dtype = _dtype_name(dtype)
        return self._traced() if dtype == self.dtype else self._unary("cast", dtype=dtype)

    def float(self): return self.astype("float32")
    def half(self): return self.astype("float16")
    def bfloat16(self): return self.astype("bfloat16")
    def double(self): return self.astype("float64")
    def long(self): return self.astype("int64")
    def int(self): return self.astype("int32")
    def bool(self): return self.astype("bool")

    def type_as(self, other):
        """This tensor in ``other``'s dtype (``torch.Tensor.type_as``)."""
        return self.astype(as_tensor(other).dtype)

    def to(self, *args, dtype=None, **kwargs):
        """``torch.Tensor.to``: a dtype (``torch.float16``, ``"float16"``, a NumPy dtype) or another tensor's dtype;
        a device (``"cpu"``, ``x.device``) changes nothing here: where a graph runs is its target's choice."""
        target = dtype
        for a in args:
            if isinstance(a, TensorOps):
                target = a.dtype
            elif not _is_device(a):
                target = a
        return self._traced() if target is None else self.astype(target)

    @property
    def device(self) -> str:
        """``"graph"``: a traced value lives wherever its compiled model runs (``to(x.device)`` is a no-op)."""
        return "graph"

    def new_zeros(self, *size): return _filled(self, _sizes(size), 0)
    def new_ones(self, *size): return _filled(self, _sizes(size), 1)
    def new_full(self, size, fill_value): return _filled(self, _sizes((size,)), fill_value)
    def matmul(self, o): return self._binary("matmul", o)

    def contiguous(self):
        """The tensor itself (the graph has no strides: every value is contiguous), as PyTorch's."""
        return self._traced()

    def sum(self, axes=None, keepdims=False, *, dim=None, keepdim=None):
        return self._reduce("reduce_sum", axes, keepdims, dim, keepdim)

    def mean(self, axes=None, keepdims=False, *, dim=None, keepdim=None):
        return self._reduce("reduce_mean", axes, keepdims, dim, keepdim)

    def max(self, axes=None, keepdims=False, *, dim=None, keepdim=None):
        return self._reduce("reduce_max", axes, keepdims, dim, keepdim)

    def amax(self, dim=None, keepdim=False):
        return self._reduce("reduce_max", dim, keepdim)

    def min(self, axes=None, keepdims=False, *, dim=None, keepdim=None):
        return 0 - (0 - self._traced())._reduce("reduce_max", axes, keepdims, dim, keepdim)

    def amin(self, dim=None, keepdim=False):
        return self.min(dim, keepdim)

    def argmax(self, dim=None, keepdim=False):
        """The index of the largest value along ``dim`` (of the flattened tensor when None), the first on a tie,
        a NaN counting as the largest (``torch.argmax``); int64."""
        x = self._traced()
        if dim is None:
            x, dim = x.reshape(-1), 0
        self._check_axes("argmax", (dim,), x.ndim)
        dim %= x.ndim
        top = x.max(dim, keepdims=True)
        hit = (x == top) | ((top != top) & (x != x))  # NaN equals nothing: a NaN row's first NaN
        index = _arange_along(x, dim)
        # the first hit: the largest -index among the hits (int32-safe, as a target that narrows int64 holds it)
        return 0 - where(hit, 0 - index, as_tensor(-(2 ** 30), like=index)).max(dim, keepdims=keepdim)

    def argmin(self, dim=None, keepdim=False):
        return (0 - self._traced()).argmax(dim, keepdim)

    def _reduce(self, op, axes, keepdims, dim=None, keepdim=None):
        axes = axes if dim is None else dim
        keepdims = keepdims if keepdim is None else keepdim
        if axes is None:  # every axis
            axes = tuple(range(self.ndim))
        axes = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
        return self._unary(op, axes=tuple(int(a) for a in axes), keepdims=bool(keepdims))

    def masked_fill(self, mask, value):
        """``value`` where ``mask`` is True, else this tensor (as ``torch.Tensor.masked_fill``)."""
        return where(mask, value, self)

    def size(self, dim=None):
        """The shape (``dim``: one size), as ``torch.Tensor.size``; symbolic dims are strings."""
        return self.shape if dim is None else self.shape[dim]

    # layout
    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return self._unary("reshape", shape=tuple(shape))

    def view(self, *shape):
        """``reshape`` (the graph has no strides: a view and a reshape are the same op); ``view(dtype)`` is not."""
        if len(shape) == 1 and not isinstance(shape[0], (tuple, list, int, np.integer, str)):
            raise TraceError(f"view({shape[0]!r}) of %{self._traced().node.name} at {_user_location()}: a view as "
                             f"another dtype (its bytes reinterpreted) is not supported; view takes a shape")
        return self.reshape(*shape)

    def _dim(self, method: str, dim, rank: int | None = None) -> int:
        """``dim`` in ``[0, rank)`` (negative counted from the end), else a ``TraceError`` naming the line."""
        rank = self.ndim if rank is None else rank
        self._check_axes(method, (dim,), rank)
        return int(dim) % rank

    def flatten(self, start_dim: int = 0, end_dim: int = -1):
        """Axes ``start_dim..end_dim`` as one (``torch.flatten``)."""
        if self.ndim == 0:
            return self.reshape(1)
        a, b = self._dim("flatten", start_dim), self._dim("flatten", end_dim)
        if a > b:
            raise TraceError(f"flatten({start_dim}, {end_dim}) of %{self._traced().node.name} at {_user_location()}: "
                             f"start_dim comes after end_dim")
        shape = list(self.shape)
        return self.reshape(shape[:a] + [D.product(shape[a:b + 1])] + shape[b + 1:])

    def unflatten(self, dim: int, sizes):
        """Axis ``dim`` as ``sizes`` (one may be -1; ``torch.unflatten``)."""
        dim = self._dim("unflatten", dim)
        shape = list(self.shape)
        sizes = list(sizes)
        if sizes.count(-1) == 1:
            known = D.product(d for d in sizes if d != -1)
            rest = D.divide(shape[dim], known)
            if rest is None:
                raise TraceError(f"unflatten({dim}, {tuple(sizes)}) of %{self._traced().node.name}: {self.type} at "
                                 f"{_user_location()}: {shape[dim]} is not divisible by {known}")
            sizes[sizes.index(-1)] = rest
        return self.reshape(shape[:dim] + sizes + shape[dim + 1:])

    def squeeze(self, dim=None):
        """The size-1 axes removed (``dim``: those of them, an axis of another size left as it is, as
        ``torch.squeeze``).  A symbolic axis is refused: whether it is 1 is known only when the graph runs."""
        shape = list(self.shape)
        dims = range(self.ndim) if dim is None else [dim] if isinstance(dim, (int, np.integer)) else list(dim)
        dims = {self._dim("squeeze", d) for d in dims}
        symbolic = [d for d in sorted(dims) if isinstance(shape[d], str)]
        if symbolic and dim is not None:
            raise TraceError(f"squeeze({dim}) of %{self._traced().node.name}: {self.type} at {_user_location()}: axis "
                             f"{symbolic[0]} is symbolic ({shape[symbolic[0]]}): whether it is 1 is known only at run "
                             f"time; index it ([:, 0]) or reshape")
        keep = [s for i, s in enumerate(shape) if not (i in dims and s == 1)]
        return self._traced() if len(keep) == len(shape) else self.reshape(keep)

    def expand(self, *sizes):
        """This tensor along its size-1 axes (and new leading ones) at ``sizes``, -1 keeping a size
        (``torch.Tensor.expand``)."""
        sizes = _sizes(sizes)
        x = self._traced()
        return x.tracer.emit("broadcast_to", (x,), {"shape": tuple(sizes)})

    def expand_as(self, other):
        return self.expand(*as_tensor(other).shape)

    def broadcast_to(self, *sizes):
        return self.expand(*sizes)

    def repeat(self, *sizes):
        """This tensor tiled ``sizes`` times along each axis (``torch.Tensor.repeat``; more sizes than axes add
        leading axes): each axis a new one beside it, expanded, then merged."""
        sizes = _sizes(sizes)
        if len(sizes) < self.ndim:
            raise TraceError(f"repeat{tuple(sizes)} of %{self._traced().node.name}: {self.type} at {_user_location()}: "
                             f"give at least one size per axis ({self.ndim})")
        shape = [1] * (len(sizes) - self.ndim) + list(self.shape)
        x = self.reshape([d for s in shape for d in (1, s)])
        x = x.expand(*[d for r, s in zip(sizes, shape) for d in (r, s)])
        return x.reshape([D.mul(r, s) for r, s in zip(sizes, shape)])

    def repeat_interleave(self, repeats, dim=None):
        """Each element ``repeats`` times in a row along ``dim`` (of the flattened tensor when None;
        ``torch.repeat_interleave`` with an int count): a new axis after ``dim``, expanded, then merged."""
        if not isinstance(repeats, (int, np.integer)) or repeats < 0:
            raise TraceError(f"repeat_interleave({repeats!r}) of %{self._traced().node.name} at {_user_location()}: "
                             f"repeats must be a non-negative int (a tensor of counts makes a data-dependent shape)")
        x = self._traced()
        if dim is None:
            x, dim = x.reshape(-1), 0
        dim = x._dim("repeat_interleave", dim)
        shape = list(x.shape)
        x = x.unsqueeze(dim + 1).expand(*shape[:dim + 1], int(repeats), *shape[dim + 1:])
        return x.reshape(shape[:dim] + [D.mul(shape[dim], int(repeats))] + shape[dim + 1:])

    def split(self, split_size_or_sections, dim: int = 0):
        """Pieces along ``dim`` (``torch.split``): of ``split_size_or_sections`` each (the last one shorter), or of
        the sizes in a list, which must add up to the axis."""
        dim = self._dim("split", dim)
        size = self.shape[dim]
        sections = split_size_or_sections
        if isinstance(sections, (int, np.integer)):
            if not isinstance(size, int):
                raise TraceError(f"split({sections}, dim={dim}) of %{self._traced().node.name}: {self.type} at "
                                 f"{_user_location()}: axis {dim} is symbolic ({size}): the number of pieces would be "
                                 f"known only at run time; give the sizes as a list")
            if sections < 1:
                raise TraceError(f"split({sections}) at {_user_location()}: the piece size must be positive")
            sections = [min(int(sections), size - start) for start in range(0, size, int(sections))] or [0]
        sections = list(sections)
        if _dim_sum(sections) != D.canonical(size):
            raise TraceError(f"split({sections}, dim={dim}) of %{self._traced().node.name}: {self.type} at "
                             f"{_user_location()}: the sizes add up to {_dim_sum(sections)}, not to the axis' {size}")
        pieces, start = [], 0
        for n in sections:
            index = [slice(None)] * self.ndim
            stop = D.add(start, n)
            index[dim] = slice(start, stop)
            pieces.append(self[tuple(index)])
            start = stop
        return tuple(pieces)

    def chunk(self, chunks: int, dim: int = 0):
        """``chunks`` pieces along ``dim`` of ``ceil(size / chunks)`` each, the last shorter, fewer where they run
        out (``torch.chunk``)."""
        dim = self._dim("chunk", dim)
        size = self.shape[dim]
        if not isinstance(chunks, (int, np.integer)) or chunks < 1:
            raise TraceError(f"chunk({chunks!r}) at {_user_location()}: chunks must be a positive int")
        if not isinstance(size, int):
            quotient = D.divide(size, int(chunks))
            if quotient is None:
                raise TraceError(f"chunk({chunks}, dim={dim}) of %{self._traced().node.name}: {self.type} at "
                                 f"{_user_location()}: axis {dim} is symbolic ({size}) and not a multiple of {chunks}")
            return self.split([quotient] * int(chunks), dim)
        return self.split(-(-size // int(chunks)), dim)

    def unbind(self, dim: int = 0):
        """The slices along ``dim``, that axis removed (``torch.unbind``)."""
        dim = self._dim("unbind", dim)
        return tuple(p.squeeze(dim) for p in self.split(1, dim))

    def triu(self, diagonal: int = 0):
        """The elements on and above diagonal ``diagonal`` of the last two axes, zeros below (``torch.triu``)."""
        return self._band("triu", diagonal)

    def tril(self, diagonal: int = 0):
        """The elements on and below diagonal ``diagonal`` of the last two axes, zeros above (``torch.tril``)."""
        return self._band("tril", diagonal)

    def _band(self, which: str, diagonal: int):
        x = self._traced()
        if x.ndim < 2:
            raise TraceError(f"{which} of %{x.node.name}: {x.type} at {_user_location()}: needs at least 2 axes")
        rows = _arange_along(x, x.ndim - 2)
        cols = _arange_along(x, x.ndim - 1)
        offset = cols - rows  # column minus row: the diagonal each element is on
        keep = offset >= int(diagonal) if which == "triu" else offset <= int(diagonal)
        return where(keep, x, as_tensor(False if x.dtype == "bool" else 0, like=x))

    def _check_axes(self, method: str, axes, rank: int) -> None:
        """Axes in ``[-rank, rank)``, as PyTorch requires (a Python list would wrap some and fail on others)."""
        for axis in axes:
            if not isinstance(axis, (int, np.integer)) or not -rank <= axis < rank:
                raise TraceError(f"{method}({', '.join(map(str, axes))}) of %{self._traced().node.name}: {self.type} at "
                                 f"{_user_location()}: axis {axis} is out of range [{-rank}, {rank})")

    def permute(self, *perm):
        if len(perm) == 1 and isinstance(perm[0], (tuple, list)):
            perm = tuple(perm[0])
        return self._unary("transpose", perm=tuple(perm))

    def transpose(self, a: int, b: int):
        """Swap two axes (as ``torch.Tensor.transpose``)."""
        self._check_axes("transpose", (a, b), self.ndim)
        perm = list(range(self.ndim))
        perm[a], perm[b] = perm[b], perm[a]
        return self.permute(perm)

    def t(self):
        """The transpose of a matrix (as ``torch.Tensor.t``; a vector as it is)."""
        if self.ndim > 2:
            raise TraceError(f"t() of %{self._traced().node.name}: {self.type} at {_user_location()}: t() expects a "
                             f"tensor of at most 2 dims; use transpose(a, b) or .mT")
        return self.permute(1, 0) if self.ndim == 2 else self

    @property
    def T(self):
        """Every axis reversed (as ``torch.Tensor.T``: a matrix transposed)."""
        return self.permute(tuple(reversed(range(self.ndim))))

    @property
    def mT(self):
        """The last two axes swapped (as ``torch.Tensor.mT``)."""
        if self.ndim < 2:
            raise TraceError(f".mT of %{self._traced().node.name}: {self.type} at {_user_location()}: needs 2 or more dims")
        return self.transpose(-2, -1)

    def unsqueeze(self, axis: int):
        self._check_axes("unsqueeze", (axis,), self.ndim + 1)
        shape = list(self.shape)
        axis = axis % (len(shape) + 1)
        shape.insert(axis, 1)
        return self.reshape(shape)

    def __getitem__(self, index):
        """Basic indexing: slices (step >= 1), integers, ``None`` and ``...``."""
        t = self._traced()
        index = index if isinstance(index, tuple) else (index,)
        if sum(i is Ellipsis for i in index) > 1:
            raise TraceError("only one ... allowed in an index")
        explicit = sum(i is not None and i is not Ellipsis for i in index)
        if explicit > t.ndim:
            raise TraceError(f"too many indices for a tensor of rank {t.ndim}")
        rest = (slice(None),) * (t.ndim - explicit)
        at = next((k for k, i in enumerate(index) if i is Ellipsis), len(index))
        index = index[:at] + rest + index[at + 1:]
        out, axis, new_shape = t, 0, []
        for i in index:
            if i is None:
                new_shape.append(1)
                continue
            size = t.shape[axis]
            if isinstance(i, slice):
                start, stop, step = i.start or 0, i.stop, i.step or 1
                symbolic = [v for v in (start, stop) if isinstance(v, str)]
                if isinstance(size, int) and not symbolic:
                    start, stop, step = slice(start, stop, step).indices(size)
                    stop = max(stop, start)
                elif any(isinstance(v, int) and v < 0 for v in (start, stop)):
                    raise TraceError(f"index [{i.start}:{i.stop}] of axis {axis} ({size}) at {_user_location()}: "
                                     f"a negative bound with a symbolic one; write it as an offset from 0")
                if (start, stop, step) != (0, size, 1) and not (start == 0 and stop is None and step == 1):
                    out = out.tracer.emit("slice", (out,), {"axis": axis, "start": start, "stop": stop, "step": step})
                new_shape.append(out.shape[axis])
            elif isinstance(i, (int, np.integer)):
                i = int(i)
                if isinstance(size, int):
                    if not -size <= i < size:
                        raise TraceError(f"index {i} is out of range for axis {axis} of size {size}")
                    i %= size
                elif i < 0:
                    raise TraceError(f"negative index {i} on symbolic axis {axis} ({size})")
                out = out.tracer.emit("slice", (out,), {"axis": axis, "start": i, "stop": i + 1})
            else:
                raise TraceError(f"unsupported index {i!r}; use slices, ints, None or ...")
            axis += 1
        if tuple(new_shape) != out.shape:
            out = out.reshape(new_shape)
        return out


def _dtype_name(dtype) -> str:
    """A dtype as attngraph names it: ``"float16"``, ``np.float16``, ``torch.float16`` (by its name: no torch
    import), ``float`` / ``int`` / ``bool`` (PyTorch's defaults: float32, int64)."""
    if isinstance(dtype, str):
        name = dtype
    elif dtype is float:
        name = "float32"
    elif dtype is int:
        name = "int64"
    elif dtype is bool:
        name = "bool"
    elif type(dtype).__module__.startswith("torch"):
        name = str(dtype).removeprefix("torch.")
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            raise TraceError(f"{dtype!r} at {_user_location()} is not a dtype") from None
    aliases = {"float": "float32", "half": "float16", "double": "float64", "long": "int64", "int": "int32"}
    return aliases.get(name, name)


def _is_device(value) -> bool:
    """A device as ``Tensor.to`` takes it: ``"cpu"``, ``"cuda:0"``, ``torch.device``, ``x.device``."""
    if type(value).__name__ == "device":
        return True
    return isinstance(value, str) and value.split(":")[0] in ("cpu", "cuda", "mps", "xpu", "meta", "graph")


def _sizes(sizes) -> list:
    """Sizes given as ``f(2, 3)`` or ``f((2, 3))`` / ``f([2, 3])``, or ``f(x.shape)``."""
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = sizes[0]
    return [int(d) if isinstance(d, (int, np.integer)) else d for d in sizes]


def _dim_sum(sizes) -> Dim:
    total: Dim = 0
    for d in sizes:
        total = D.add(total, d)
    return total


def _arange_along(x, axis: int):
    """0, 1, ... along ``axis`` of ``x``, shaped to broadcast against it (int64)."""
    n = x.shape[axis]
    index = x.tracer.emit("arange", (), {"n": n, "dtype": "int64"})
    return index.reshape([n if i == axis else 1 for i in range(x.ndim)])


def _filled(like, shape, value):
    """``value`` at ``shape`` (symbolic dims allowed) in ``like``'s dtype."""
    return as_tensor(value, like=like._traced()).expand(*shape) if shape else as_tensor(value, like=like._traced())


def _full_like(x, value):
    return _filled(x, list(x.shape), value)


class Tensor(TensorOps):
    """A value in the graph being traced."""

    __slots__ = ("tracer", "id")

    def __init__(self, tracer: Tracer, nid: int):
        self.tracer = tracer
        self.id = nid

    def _traced(self) -> "Tensor":
        return self

    @property
    def node(self):
        return self.tracer.graph.node(self.id)

    def __repr__(self) -> str:
        return f"Tensor(%{self.node.name}: {self.node.type})"

    def __iter__(self):
        raise TraceError("a traced Tensor cannot be iterated; index it explicitly")


def _normalize_spec(name, spec) -> tuple[TensorType, dict]:
    try:
        if isinstance(spec, InputSpec):
            ty, meta = spec.type, spec.meta()
        elif isinstance(spec, TensorType):
            ty, meta = spec, {}
        elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], (tuple, list)):
            ty, meta = TensorType(tuple(spec[0]), spec[1]), {}
        else:
            raise TraceError(f"input {name!r}: expected an InputSpec, a TensorType or (shape, dtype), got {spec!r}")
    except (TypeError, ValueError) as e:  # a bad dtype or dim
        raise TraceError(f"input {name!r}: {e}") from None
    for axis, dim in enumerate(ty.shape):
        if isinstance(dim, int) and dim < 1:
            raise TraceError(f"input {name!r} ({ty}): axis {axis} has the fixed size {dim}; sizes are at least 1")
    return ty, meta


def trace(module, inputs: Mapping[str, Any] | None = None, name: str | None = None,
          method: str = "forward") -> Graph:
    """Trace ``module.forward`` (or another entry ``method``) into a ``Graph``.

    ``inputs`` maps each argument to an ``InputSpec``/``TensorType``/``(shape, dtype)``; shapes may
    use symbolic dims (``"batch"``, ``"seq"``).  Without it, ``module.input_specs()`` is used (for
    another entry, ``module.input_specs(method)``).  The entry returns a tensor (output
    ``"output"``), a tuple (``output0``, ...) or a dict of named tensors.
    """
    if inputs is None:
        if not hasattr(module, "input_specs"):
            raise TraceError(f"{type(module).__name__} has no input_specs(); pass inputs= to trace()")
        inputs = module.input_specs() if method == "forward" else module.input_specs(method)
    entry = getattr(module, method, None)
    if not callable(entry):
        raise TraceError(f"{type(module).__name__} has no entry {method!r}")
    graph = Graph(name or getattr(module, "name", None) or type(module).__name__)
    if method != "forward":
        graph.name += f".{method}"
    param_names = {id(p): n for n, p in module.named_parameters()}
    module_names: dict[int, str] = {}
    for n, m in module.named_modules():
        module_names.setdefault(id(m), n)  # a shared module keeps its first path
    tracer = Tracer(graph, param_names, module_names, {id(b): n for n, b in module.named_buffers()})
    args = {}
    for arg, spec in inputs.items():
        ty, meta = _normalize_spec(arg, spec)
        nid = graph.add("input", (), {"type": ty}, name=arg, meta=meta)
        args[arg] = Tensor(tracer, nid)
    _TRACERS.append(tracer)
    try:
        if method == "forward":
            out = module(**args)
        else:  # entered like __call__: the module's own scope
            tracer.scope.append("")
            out = entry(**args)
    except (TraceError, GraphError):
        raise
    except Exception as e:
        # A Python error in the user's model code (``if x.shape[0] > 3`` on a symbolic dim, a typo):
        # named with the user's line.  An error inside attngraph's own code keeps its traceback.
        where = _users_line(e)
        if not where:
            raise
        hint = ""
        if isinstance(e, TypeError) and "'str'" in str(e):
            hint = (" (a traced tensor's shape holds its symbolic dims as names, such as 'seq': Python cannot "
                    "compare or compute with them; give that input a fixed size, or compute with tensors)")
        raise TraceError(f"tracing {graph.name} failed at {where}: {type(e).__name__}: {e}{hint}") from e
    finally:
        _TRACERS.pop()
    if isinstance(out, Tensor):
        outs = [("output", out)]
    elif isinstance(out, (tuple, list)):
        outs = [(f"output{i}", o) for i, o in enumerate(out)]
    elif isinstance(out, dict):
        outs = list(out.items())
    else:
        raise TraceError(f"forward must return a Tensor, a tuple or a dict of Tensors, got {type(out).__name__}")
    for oname, o in outs:
        if not isinstance(o, TensorOps):
            raise TraceError(f"output {oname!r} is {type(o).__name__}, not a Tensor")
    graph.set_outputs((oname, o._traced().id) for oname, o in outs)
    if hasattr(module, "default_dims"):
        graph.meta["dims"] = dict(module.default_dims() if method == "forward" else module.default_dims(method))
    graph.validate()
    return graph
