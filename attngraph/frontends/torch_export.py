"""PyTorch models as they are: a ``torch.export`` program mapped onto attngraph's ops.

``from_torch(module, example_args, dynamic_shapes=...)`` exports the module (``torch.export.export``, the
pinned torch) and ``from_exported(program)`` maps its graph onto the DSL: each ATen op is one entry of
``ATEN`` (its DSL spelling, usually one line: PyTorch's ops are the DSL's surface), so the graph that comes
out is the one a user would have written in the DSL, and the passes fuse it the same way (attention however
the model spells it, ``x @ W + b`` projections, norms).

The program is read in export's inference opset without decompositions (``run_decompositions({})``: functional,
the ATen ops the module calls kept whole: ``linear``, ``layer_norm``, ``scaled_dot_product_attention``, ``view``,
...): those ops are the DSL's, and a decomposition would only take apart what the passes fuse again.

- Parameters and buffers become params and constants under the module's own names (``layers.0.linear1.weight``).
- ``dynamic_shapes`` become symbolic dims, named as the ``torch.export.Dim``s given (``Dim("batch")``:
  ``batch``); a dim without a name (a saved program's) is named after its input and axis (``src_0``).
- Every node keeps the module path and the user's source line that made it (``attngraph show``), and an op
  with no entry is an error naming every such op of the program at once, each with its module and line.
"""

from __future__ import annotations

import logging
import operator
import os
import re
import warnings
from collections.abc import Callable, Mapping

import numpy as np

from ..ir import dims as D
from ..nn import functional as F
from ..nn.module import Buffer, Module, Parameter
from ..nn.tensor import Tensor, TraceError, as_tensor, current_tracer, trace
from ..passes.rewrite import scalar_const


class TorchImportError(TraceError):
    """A PyTorch program attngraph cannot take: its unsupported ops (each with its module and source line), or an
    op whose arguments the DSL refuses."""


#: torch dtypes by name -> the DSL's
DTYPES = {"float32": "float32", "float64": "float64", "float16": "float16", "bfloat16": "bfloat16",
          "int64": "int64", "int32": "int32", "bool": "bool"}

#: what export passes for "to the end" in a slice
_END = 2 ** 63 - 1


def _dtype(torch_dtype, where: str) -> str:
    name = str(torch_dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise TorchImportError(f"{where}: dtype {name} has no attngraph type (supported: {', '.join(DTYPES)})")
    return DTYPES[name]


# -- the ops ----------------------------------------------------------------------------------------------

def _linear(x, weight, bias=None):
    y = as_tensor(x) @ as_tensor(weight).t()
    return y if bias is None else y + bias


def _slice(x, dim=0, start=None, end=None, step=1):
    x = as_tensor(x)
    dim %= x.ndim
    end = None if end is not None and isinstance(end, int) and end >= _END else end
    return x[(slice(None),) * dim + (slice(start, end, step),)]


def _select(x, dim, index):
    x = as_tensor(x)
    return x[(slice(None),) * (dim % x.ndim) + (index,)]


def _in(x, dtype_or_half):
    """``x`` in the type a softmax is asked to compute in: ``softmax.int``'s dtype, ``_softmax``'s half_to_float."""
    if dtype_or_half is True:
        return as_tensor(x).astype("float32")
    return as_tensor(x).astype(_dtype(dtype_or_half, "softmax")) if _is_torch_dtype(dtype_or_half) else x


def _softmax(x, dim, dtype_or_half=None):
    return F.softmax(_in(x, dtype_or_half), dim=dim)


def _log_softmax(x, dim, dtype_or_half=None):
    return F.log_softmax(_in(x, dtype_or_half), dim=dim)


def _dropout(x, p, train):
    return F.dropout(x, p, True) if train else x


def _to(x, *args, dtype=None, **kwargs):
    dtype = dtype if dtype is not None else next((a for a in args if _is_torch_dtype(a)), None)
    return x if dtype is None else as_tensor(x).astype(_dtype(dtype, "to"))


def _is_torch_dtype(value) -> bool:
    return type(value).__name__ == "dtype" and type(value).__module__ == "torch"


def _arange(*args, dtype=None, **kwargs):
    start, end, step = (0, args[0], 1) if len(args) == 1 else (args + (1,))[:3]
    if step != 1:
        raise ValueError(f"arange with step {step}: only step 1 is supported")
    r = F.arange(D.sub(end, start), _dtype(dtype, "arange") if dtype is not None else "int64")
    return r if isinstance(start, int) and start == 0 else r + start


def _gather(x, dim, index, sparse_grad=False):
    """``torch.gather`` where every other axis of ``x`` has size 1 (Hugging Face BERT's token types, read from a
    buffer at the positions): the rows of ``x`` flattened, at ``index``."""
    x = as_tensor(x)
    dim %= x.ndim
    if any(size != 1 for axis, size in enumerate(x.shape) if axis != dim):
        raise ValueError(f"gather along axis {dim} of a {tuple(x.shape)} tensor: supported where every other axis "
                         f"has size 1")
    return F.gather(x.reshape([x.shape[dim]]), index)


def _filled(value, size, dtype, like=None):
    """A tensor of ``size`` (dims may be symbolic) holding ``value``: a scalar constant broadcast, not stored."""
    name = _dtype(dtype, "full") if dtype is not None else as_tensor(like).dtype if like is not None else \
        "float32" if isinstance(value, float) else "int64" if not isinstance(value, bool) else "bool"
    scalar = F.const(np.asarray(value), name)
    return scalar.reshape([1] * len(size)).expand(*size) if len(size) else scalar


def _index(x, indices):
    """``x[i0]`` or ``x[i0, i1]`` (``aten.index.Tensor``: index tensors on the leading axes, broadcast together), as
    Hugging Face's mask builders read a padding mask at (batch, key) positions: the rows at ``i0`` gathered, then
    each element at ``i1`` picked along the next axis by comparing ``i1`` with that axis' positions (a one-hot
    selection, exact: the other entries are zeros, never multiplied)."""
    x = as_tensor(x)
    if not indices or len(indices) > 2 or any(i is None for i in indices) or len(indices) == 2 and x.ndim != 2:
        raise ValueError(f"indexing a rank-{x.ndim} tensor with {len(indices)} index tensors (or a None among them): "
                         f"supported are one index tensor, or two into a matrix")
    if len(indices) == 2:
        runs = [_run_axis(as_tensor(i), size) for i, size in zip(indices, x.shape)]
        rank = max(as_tensor(i).ndim for i in indices)
        axes = [a + rank - as_tensor(i).ndim for a, i in zip(runs, indices) if a is not None]
        if len(axes) == 2 and axes[0] < axes[1]:  # every (row, column) in order: x itself, viewed with their axes
            shape = [1] * rank
            shape[axes[0]], shape[axes[1]] = x.shape
            return x.reshape(shape)
    rows = F.gather(x, indices[0])  # i0.shape + x.shape[1:]
    if len(indices) == 1:
        return rows
    picked = F.arange(x.shape[1]).eq(as_tensor(indices[1]).unsqueeze(-1))  # i1.shape + (columns,)
    wide = rows.astype("int64") if rows.dtype == "bool" else rows
    out = F.where(picked, wide, 0).sum(dim=-1)
    return out.astype("bool") if rows.dtype == "bool" else out


def _arange_plus(index) -> tuple[int, int | None] | None:
    """(the ``arange`` node, the node added to it or None) where the traced ``index`` is ``arange(n)`` or
    ``arange(n) + offset`` (seen through reshapes, which keep its order); else None."""
    g = index.tracer.graph
    nid = index.id
    while g.node(nid).op == "reshape":
        nid = g.operands(nid)[0]
    if g.node(nid).op == "arange":
        return nid, None
    if g.node(nid).op == "add":
        a, b = g.operands(nid)
        for run, other in ((a, b), (b, a)):
            if g.node(run).op == "arange":
                return run, other
    return None


def _run_axis(index, size) -> int | None:
    """The axis along which ``index`` is ``0 .. size-1`` (an ``arange(size)``, plus 0, viewed with that axis alone
    not of size 1), else None: the mask builders' ``arange(batch)[:, None, None, None]``."""
    g = index.tracer.graph
    found = _arange_plus(index)
    if found is None:
        return None
    run, offset = found
    if offset is not None and not (g.node(offset).op == "const" and g.node(offset).type.rank == 0
                                   and scalar_const(g, offset) == 0):
        return None
    if D.canonical(g.node(run).attrs["n"]) != D.canonical(size):
        return None
    wide = [a for a, d in enumerate(index.shape) if not (isinstance(d, int) and d == 1)]
    return wide[0] if len(wide) == 1 and D.canonical(index.shape[wide[0]]) == D.canonical(size) else None


def _index_copy(x, dim, index, source):
    """``x.index_copy(dim, index, source)`` where ``index`` is a run of positions, ``arange(n)`` or ``arange(n) +
    offset`` (a KV cache written at the positions a step decodes): an ``update_slice`` at ``offset``.  Any other
    index is refused: an update_slice would be wrong for it."""
    index = as_tensor(index)
    found = _arange_plus(index)
    if found is None or found[1] is not None and index.tracer.graph.node(found[1]).type.rank != 0:
        raise ValueError("index_copy with an index that is not arange(n) or arange(n) + offset: only a run of "
                         "consecutive positions is supported")
    offset = F.const(np.int64(0), "int64") if found[1] is None else Tensor(index.tracer, found[1])
    return F.update_slice(x, source, offset.astype("int64"), dim % as_tensor(x).ndim)


def _identity(x, *args, **kwargs):
    return x


def _nothing(*args, **kwargs):
    return None


def _binary(fn):
    def op(a, b, *, alpha=1):
        if alpha != 1:
            b = b * alpha
        return fn(a, b)
    return op


def _reduce(method):
    def op(x, dim=None, keepdim=False, *, dtype=None):
        return getattr(as_tensor(x), method)(dim=dim, keepdim=keepdim)
    return op


#: ATen op -> its DSL spelling; the arguments are export's, with every tensor a traced one and every SymInt a dim
ATEN: dict[str, Callable] = {
    # projections, norms, attention, activations
    "aten.linear.default": _linear,
    "aten.layer_norm.default": lambda x, shape, weight=None, bias=None, eps=1e-5, cudnn=True:
        F.layer_norm(x, list(shape), weight, bias, eps),
    "aten.rms_norm.default": lambda x, shape, weight=None, eps=None: F.rms_norm(x, list(shape), weight, eps),
    "aten.scaled_dot_product_attention.default": F.scaled_dot_product_attention,
    "aten.matmul.default": operator.matmul,
    "aten.addmm.default": lambda bias, a, b, beta=1, alpha=1: (a @ b) * alpha + (bias if beta == 1 else bias * beta)
    if alpha != 1 else a @ b + (bias if beta == 1 else bias * beta),
    "aten.bmm.default": operator.matmul,
    "aten.mm.default": operator.matmul,
    "aten.embedding.default": lambda weight, ids, *args: F.embedding(ids, weight),
    "aten.gather.default": _gather,
    "aten.index.Tensor": _index,
    "aten.index_copy.default": _index_copy,
    "aten.relu.default": F.relu,
    "aten.gelu.default": lambda x, approximate="none": F.gelu(x, approximate),
    "aten.silu.default": F.silu,
    "aten.sigmoid.default": F.sigmoid,
    "aten.tanh.default": F.tanh,
    "aten.exp.default": F.exp,
    "aten.log.default": F.log,
    "aten.sqrt.default": F.sqrt,
    "aten.rsqrt.default": F.rsqrt,
    "aten.sin.default": F.sin,
    "aten.cos.default": F.cos,
    "aten.abs.default": F.abs,
    "aten.neg.default": operator.neg,
    "aten.softmax.int": _softmax,
    "aten._softmax.default": _softmax,
    "aten.log_softmax.int": _log_softmax,
    "aten._log_softmax.default": _log_softmax,
    "aten.dropout.default": _dropout,
    # arithmetic and comparisons
    "aten.add.Tensor": _binary(operator.add),
    "aten.add.Scalar": _binary(operator.add),
    "aten.sub.Tensor": _binary(operator.sub),
    "aten.sub.Scalar": _binary(operator.sub),
    "aten.rsub.Scalar": lambda a, b, alpha=1: b - a * alpha,
    "aten.mul.Tensor": operator.mul,
    "aten.mul.Scalar": operator.mul,
    "aten.div.Tensor": operator.truediv,
    "aten.div.Scalar": operator.truediv,
    "aten.pow.Tensor_Scalar": operator.pow,
    "aten.square.default": lambda x: x * x,
    "aten.clamp.default": lambda x, min=None, max=None: as_tensor(x).clamp(min, max),
    "aten.minimum.default": F.minimum,
    "aten.maximum.default": F.maximum,
    "aten.eq.Scalar": lambda a, b: as_tensor(a).eq(b),
    "aten.eq.Tensor": lambda a, b: as_tensor(a).eq(b),
    "aten.ne.Scalar": lambda a, b: as_tensor(a).ne(b),
    "aten.ne.Tensor": lambda a, b: as_tensor(a).ne(b),
    "aten.lt.Scalar": operator.lt,
    "aten.lt.Tensor": operator.lt,
    "aten.le.Scalar": operator.le,
    "aten.le.Tensor": operator.le,
    "aten.gt.Scalar": operator.gt,
    "aten.gt.Tensor": operator.gt,
    "aten.ge.Scalar": operator.ge,
    "aten.ge.Tensor": operator.ge,
    "aten.logical_not.default": operator.invert,
    "aten.bitwise_not.default": operator.invert,
    "aten.logical_and.default": operator.and_,
    "aten.__and__.Tensor": operator.and_,
    "aten.__or__.Tensor": operator.or_,
    "aten.bitwise_and.Tensor": operator.and_,
    "aten.logical_or.default": operator.or_,
    "aten.bitwise_or.Tensor": operator.or_,
    "aten.where.self": F.where,
    "aten.masked_fill.Scalar": lambda x, mask, value: as_tensor(x).masked_fill(mask, value),
    "aten.masked_fill.Tensor": lambda x, mask, value: as_tensor(x).masked_fill(mask, value),
    "aten.mean.dim": _reduce("mean"),
    "aten.sum.dim_IntList": _reduce("sum"),
    "aten.sum.default": lambda x, *, dtype=None: as_tensor(x).sum(),
    "aten.mean.default": lambda x, *, dtype=None: as_tensor(x).mean(),
    "aten.amax.default": _reduce("amax"),
    "aten.triu.default": F.triu,
    "aten.tril.default": F.tril,
    # shapes
    "aten.view.default": lambda x, shape: as_tensor(x).reshape(list(shape)),
    "aten.reshape.default": lambda x, shape: as_tensor(x).reshape(list(shape)),
    "aten._unsafe_view.default": lambda x, shape: as_tensor(x).reshape(list(shape)),
    "aten.transpose.int": lambda x, a, b: as_tensor(x).transpose(a, b),
    "aten.permute.default": lambda x, dims: as_tensor(x).permute(*dims),
    "aten.t.default": lambda x: as_tensor(x).t(),
    "aten.unsqueeze.default": lambda x, dim: as_tensor(x).unsqueeze(dim),
    "aten.squeeze.dim": lambda x, dim: as_tensor(x).squeeze(dim),
    "aten.squeeze.dims": lambda x, dims: as_tensor(x).squeeze(tuple(dims)),
    "aten.unflatten.int": lambda x, dim, sizes: as_tensor(x).unflatten(dim, list(sizes)),
    "aten.flatten.using_ints": lambda x, start=0, end=-1: as_tensor(x).flatten(start, end),
    "aten.expand.default": lambda x, sizes, implicit=False: as_tensor(x).expand(*sizes),
    "aten.repeat_interleave.self_int": lambda x, repeats, dim=None, output_size=None:
        as_tensor(x).repeat_interleave(repeats, dim),
    "aten.slice.Tensor": _slice,
    "aten.select.int": _select,
    "aten.cat.default": lambda tensors, dim=0: F.cat(list(tensors), dim),
    "aten.stack.default": lambda tensors, dim=0: F.stack(list(tensors), dim),
    "aten.split.Tensor": lambda x, size, dim=0: as_tensor(x).split(size, dim),
    "aten.split_with_sizes.default": lambda x, sizes, dim=0: as_tensor(x).split(list(sizes), dim),
    "aten.chunk.default": lambda x, chunks, dim=0: as_tensor(x).chunk(chunks, dim),
    "aten.unbind.int": lambda x, dim=0: as_tensor(x).unbind(dim),
    "aten.contiguous.default": _identity,
    "aten.clone.default": _identity,
    "aten.alias.default": _identity,
    "aten.detach.default": _identity,
    "aten.lift_fresh_copy.default": _identity,
    "aten.to.dtype": _to,
    "aten.to.device": _to,
    "aten.to.dtype_layout": _to,
    "aten._to_copy.default": _to,
    "aten.type_as.default": lambda x, other: as_tensor(x).astype(as_tensor(other).dtype),
    "aten.arange.default": _arange,
    "aten.full.default": lambda size, value, *, dtype=None, **kwargs: _filled(value, size, dtype),
    "aten.new_ones.default": lambda x, size, *, dtype=None, **kwargs: _filled(1, size, dtype, x),
    "aten.new_zeros.default": lambda x, size, *, dtype=None, **kwargs: _filled(0, size, dtype, x),
    "aten.zeros_like.default": lambda x, *, dtype=None, **kwargs: _filled(0, as_tensor(x).shape, dtype, x),
    "aten.ones_like.default": lambda x, *, dtype=None, **kwargs: _filled(1, as_tensor(x).shape, dtype, x),
    "aten.full_like.default": lambda x, value, *, dtype=None, **kwargs: _filled(value, as_tensor(x).shape, dtype, x),
    "aten.ones.default": lambda size, *, dtype=None, **kwargs: _filled(1, size, dtype or "torch.float32"),
    "aten.zeros.default": lambda size, *, dtype=None, **kwargs: _filled(0, size, dtype or "torch.float32"),
    "aten.arange.start": _arange,
    "<built-in function getitem>": operator.getitem,
    # checks export leaves in the program: nothing to compute
    "aten._assert_tensor_metadata.default": _nothing,
    "aten._assert_scalar.default": _nothing,
    "aten.sym_constrain_range_for_size.default": _nothing,
}


# -- the program as a DSL module --------------------------------------------------------------------------

class _Missing:
    """The value of a node that could not be mapped (an unsupported op, or a node reading one)."""


def _location(node) -> tuple[str, str]:
    """(module path, ``file:line in function``) where export says ``node`` was made."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    path = "" if path.startswith("L[") or path.startswith("_") else path
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', node.meta.get("stack_trace") or "")
    if not frames:
        return path, ""
    file, line, function = frames[-1]
    relative = os.path.relpath(file)
    return path, f"{file if relative.startswith('..') else relative}:{line} in {function}"


class ExportedProgram(Module):
    """A ``torch.export.ExportedProgram`` as a DSL module: its parameters and buffers under their names, and a
    ``forward`` that runs the program's graph through ``ATEN``."""

    def __init__(self, program, dim_names: Mapping[str, str]):
        super().__init__()
        # export's inference opset: functional (in-place ops as their out-of-place forms, the mutated values
        # threaded through), eval-mode dropout gone, and no op decomposed (an empty table: linear, layer_norm and
        # scaled_dot_product_attention stay whole)
        with warnings.catch_warnings():  # torch's own deprecations inside it (pytree's LeafSpec) are not the user's
            warnings.simplefilter("ignore", FutureWarning)
            program = program.run_decompositions({})
        sig = program.graph_signature
        object.__setattr__(self, "program", program)
        object.__setattr__(self, "dim_names", dict(dim_names))  # export's symbol -> the DSL's dim name
        params, buffers, values, inputs = {}, {}, {}, {}
        state = program.state_dict
        for spec in sig.input_specs:
            kind, name = spec.kind.name, spec.arg.name
            if kind == "PARAMETER":
                t = state[spec.target]
                params[name] = (spec.target, Parameter(tuple(t.shape), _dtype(t.dtype, spec.target)))
                values[spec.target] = t.detach().cpu().numpy()
            elif kind in ("BUFFER", "CONSTANT_TENSOR"):
                t = state[spec.target] if spec.target in state else program.constants[spec.target]
                buffers[name] = (spec.target, Buffer(t.detach().cpu().numpy()))
            elif kind == "USER_INPUT":
                inputs[name] = None
            else:
                raise TorchImportError(f"input {name!r} of kind {kind} is not supported")
        mutated = [spec.target or spec.arg.name for spec in sig.output_specs if spec.kind.name != "USER_OUTPUT"]
        if mutated:  # the graph would return them as outputs of its own
            raise TorchImportError(f"the program updates {', '.join(map(str, mutated))} in place (a cache, running "
                                   f"statistics): a module that mutates its buffers is not supported")
        object.__setattr__(self, "torch_params", params)  # placeholder -> (name, Parameter)
        object.__setattr__(self, "torch_buffers", buffers)
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "input_names", list(inputs))

    def default_params(self, seed: int = 0) -> dict[str, np.ndarray]:
        """The program's own weights (``seed`` unused: nothing is random)."""
        return dict(self.values)

    def default_dims(self) -> dict[str, int]:
        """Each symbolic dim at the size of the example the program was exported with."""
        dims = {}
        for node in self.program.graph.nodes:
            if node.op == "placeholder" and node.name in self.input_names:
                for size in node.meta["val"].shape:
                    dim = self.dim(size)
                    if isinstance(dim, str) and dim.isidentifier() and getattr(size.node, "hint", None) is not None:
                        dims[dim] = int(size.node.hint)
        return dims

    def named_parameters(self, prefix: str = ""):
        return iter(self.torch_params.values())

    def named_buffers(self, prefix: str = ""):
        return iter(self.torch_buffers.values())

    def input_specs(self) -> dict:
        """Each user input's (shape, dtype), its dynamic dims by name."""
        specs = {}
        for node in self.program.graph.nodes:
            if node.op == "placeholder" and node.name in self.input_names:
                val = node.meta["val"]
                specs[node.name] = (tuple(self.dim(d) for d in val.shape), _dtype(val.dtype, f"input {node.name}"))
        return specs

    def dim(self, size):
        """A torch size (an int or a SymInt) as a DSL dim."""
        if isinstance(size, (int, np.integer)):
            return int(size)
        expr = size.node.expr
        if expr.is_Integer:
            return int(expr)
        text = re.sub(r"\b[a-z]\d+\b", lambda m: self.dim_names.get(m.group(0), m.group(0)), str(expr))
        if not re.fullmatch(r"[A-Za-z_0-9*+\- ]+", text):
            raise TorchImportError(f"the symbolic size {expr} is not a polynomial of the dims attngraph can carry")
        return text

    def forward(self, **inputs):
        tracer = current_tracer()
        graph = tracer.graph
        env: dict[str, object] = {}
        unsupported: dict[str, list[str]] = {}
        outputs = None
        for node in self.program.graph.nodes:
            if node.op == "placeholder":
                if node.name in self.torch_params:
                    env[node.name] = self.torch_params[node.name][1]
                elif node.name in self.torch_buffers:
                    env[node.name] = self.torch_buffers[node.name][1]
                else:
                    env[node.name] = inputs[node.name]
                continue
            if node.op == "output":
                outputs = self._values(node.args[0], env)
                continue
            if node.op != "call_function":
                raise TorchImportError(f"node {node.name} ({node.op}) of the exported program is not supported")
            val = node.meta.get("val")
            if val is not None and type(val).__name__ in ("SymInt", "int") and not isinstance(val, bool):
                env[node.name] = self.dim(val)  # a size computed from the input shapes (sym_size, a product)
                continue
            args, kwargs = self._values(node.args, env), self._values(node.kwargs, env)
            op = str(node.target)
            path, where = _location(node)
            fn = ATEN.get(op)
            if fn is None:
                unsupported.setdefault(op, []).append(f"{path or 'the top module'} ({where or 'no source line'})")
            if fn is None or any(isinstance(v, _Missing) for v in _flat((args, kwargs))):
                env[node.name] = _Missing()  # the rest of the program is still read: every unsupported op named
                continue
            first = graph._next_id
            try:
                env[node.name] = fn(*args, **kwargs)
            except Exception as e:  # the DSL refused the arguments: name the op, its module and the user's line
                raise TorchImportError(f"{op} in {path or 'the top module'} at {where or '?'}: {type(e).__name__}: "
                                       f"{e}") from e
            for nid in range(first, graph._next_id):  # the nodes this op made: its module and line
                if nid not in graph:
                    continue
                meta = graph.node(nid).meta
                meta["loc"] = f"{where} ({op})" if where else op
                if path:
                    meta["scope"] = path
        if unsupported:
            lines = "\n".join(f"  {op}: {', '.join(sorted(set(at))[:3])}" + (f" and {len(set(at)) - 3} more"
                                                                          if len(set(at)) > 3 else "")
                              for op, at in sorted(unsupported.items()))
            raise TorchImportError(f"{len(unsupported)} op(s) of {tracer.graph.name} have no attngraph "
                                   f"mapping (attngraph.frontends.torch_export.ATEN):\n{lines}")
        names = _output_names(self.program, len(outputs))
        if names is not None:
            return dict(zip(names, outputs))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def _values(self, value, env):
        if isinstance(value, (list, tuple)):
            return type(value)(self._values(v, env) for v in value)
        if isinstance(value, dict):
            return {k: self._values(v, env) for k, v in value.items()}
        if type(value).__name__ == "Node":
            return env[value.name]
        return value


def _output_names(program, count: int) -> list[str] | None:
    """The names of a program's outputs where the module returned a dict or a ``ModelOutput`` of tensors
    (``last_hidden_state``, ``logits``); None for a tensor or a tuple (then ``output``, ``output0``, ...)."""
    spec = program.call_spec.out_spec
    names = spec.context if spec is not None else None
    if isinstance(names, list) and len(names) == count and all(isinstance(n, str) and n.isidentifier() for n in names) \
            and all(child.is_leaf() for child in spec.children()):
        return names
    return None


def _flat(value):
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _flat(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flat(v)
    else:
        yield value


# -- the entry points -------------------------------------------------------------------------------------

def _dim_names(program, dynamic_shapes) -> dict[str, str]:
    """Export's symbols (``s0``) -> dim names: the ``torch.export.Dim``'s name where ``dynamic_shapes`` gave
    one for the axis the symbol first sizes, else ``<input>_<axis>``."""
    user = [n for n in program.graph.nodes if n.op == "placeholder"
            and any(s.arg.name == n.name and s.kind.name == "USER_INPUT" for s in program.graph_signature.input_specs)]
    specs = {}
    if isinstance(dynamic_shapes, Mapping):
        specs = dict(dynamic_shapes)
    elif isinstance(dynamic_shapes, (list, tuple)):
        specs = {n.name: s for n, s in zip(user, dynamic_shapes)}
    names: dict[str, str] = {}
    for position, node in enumerate(user):
        spec = specs.get(node.name, specs.get(position))
        listed = re.fullmatch(r"(.+)_(\d+)", node.name)  # an element of a list argument: export names it <arg>_<i>
        if spec is None and listed and isinstance(specs.get(listed[1]), (list, tuple)) \
                and int(listed[2]) < len(specs[listed[1]]):
            spec = specs[listed[1]][int(listed[2])]
        for axis, size in enumerate(node.meta["val"].shape):
            if isinstance(size, int):
                continue
            symbol = str(size.node.expr)
            if symbol in names or not re.fullmatch(r"[a-z]\d+", symbol):
                continue
            given = spec.get(axis) if isinstance(spec, Mapping) else \
                spec[axis] if isinstance(spec, (list, tuple)) and axis < len(spec) else None
            name = getattr(given, "__name__", None)
            names[symbol] = name if name and re.fullmatch(r"[A-Za-z_][A-Za-z_0-9]*", name) else f"{node.name}_{axis}"
    return names


def load(path: str, name: str | None = None) -> ExportedProgram:
    """The program saved at ``path`` (``torch.export.save``) as a DSL module, its dims named after their inputs."""
    try:
        import torch
    except ImportError:
        raise TorchImportError(f"reading {path} needs PyTorch: pip install torch") from None
    quiet = logging.getLogger("torch.export")  # it logs the reader's error before raising it: said once, below
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        program = torch.export.load(path)
    except Exception as e:  # not a .pt2, damaged, or of another torch
        raise TorchImportError(f"{path} is not a torch.export program this torch ({torch.__version__}) can read: "
                               f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    finally:
        quiet.level = level
    module = ExportedProgram(program, _dim_names(program, None))
    module.name = name or os.path.splitext(os.path.basename(path))[0]
    return module


def from_exported(program, dynamic_shapes=None, name: str | None = None):
    """(Graph, params) of a ``torch.export.ExportedProgram``: the graph traced through ``ATEN`` (symbolic dims named
    from ``dynamic_shapes`` where given, see ``_dim_names``), the params by the module's own names as NumPy."""
    module = ExportedProgram(program, _dim_names(program, dynamic_shapes))
    graph = trace(module, module.input_specs(), name=name or "exported")
    return graph, {k: v for k, v in module.values.items() if k in graph.params}


def from_torch(module, example_args=(), dynamic_shapes=None, example_kwargs=None, name: str | None = None):
    """(Graph, params) of a PyTorch module: ``torch.export.export(module, example_args, example_kwargs,
    dynamic_shapes=...)`` in eval mode, then ``from_exported``.  ``dynamic_shapes`` as ``torch.export`` takes it
    (``{"x": {0: Dim("batch"), 1: Dim("seq")}}``); each named ``Dim`` becomes a symbolic dim of that name, so one
    build serves every batch and length."""
    import torch
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_torch takes a torch.nn.Module, got {type(module).__name__}")
    was_training = module.training
    module.eval()
    try:
        program = torch.export.export(module, tuple(example_args), example_kwargs, dynamic_shapes=dynamic_shapes)
    finally:
        module.train(was_training)
    return from_exported(program, dynamic_shapes, name=name or type(module).__name__)
