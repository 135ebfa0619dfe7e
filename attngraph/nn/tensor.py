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
from ..ir.dims import Dim
from .spec import InputSpec


class TraceError(RuntimeError):
    """Misuse of the DSL: a tensor op outside a trace, a bad output, a tensor from another trace."""


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
            nid = self.graph.add("const", (), {"value": b.value}, name=self.buffer_names[id(b)],
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
        if like is not None and not isinstance(x, np.ndarray):
            dtype = np.dtype(like.dtype)
            if dtype.kind == "f" and isinstance(x, (float, np.floating)):
                # a Python float keeps its float64 value (a float64 run of the interpreter computes with it
                # exactly) and takes the other operand's type
                return tracer.emit("const", (), {"value": value.astype(np.float64), "dtype": dtype.name})
            value = value.astype(dtype)
        elif value.dtype == np.float64:
            value = value.astype(np.float32)
        return tracer.emit("const", (), {"value": value})
    raise TraceError(f"cannot use {type(x).__name__} {x!r} as a tensor")


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
        return self.type.shape

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
    # NumPy's spellings (axis, keepdims) and PyTorch's (dim, keepdim) both work.
    def softmax(self, axis=-1, *, dim=None): return self._unary("softmax", axis=axis if dim is None else dim)
    def log_softmax(self, axis=-1, *, dim=None): return self._unary("log_softmax", axis=axis if dim is None else dim)
    def astype(self, dtype): return self._unary("cast", dtype=dtype)
    def float(self): return self.astype("float32")
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
        """``reshape`` (the graph has no strides: a view and a reshape are the same op)."""
        return self.reshape(*shape)

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
