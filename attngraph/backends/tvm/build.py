"""Compile a graph for TVM's LLVM (CPU) target and run it in-process.

One PrimFunc per kernel node, deduplicated by (op, attributes, operand and result types), all in
one TVM module.  Weights-only values (``W*scale``, ``concat(Wq, Wk, Wv)``) are computed once when
weights are bound; reshapes are views; every other node is one kernel call.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from ...inputs import bind_dims
from ...ir import Graph
from ...ir.ops import IndexOutOfRange
from ...passes.memory import SOURCE_OPS, weights_only
from ...weights import check_params
from .. import BuildError
from ..reference import DIM_ATTRS, bind_attrs, describe, last_uses
from .lowering import LoweringError, lower
from .shapes import DimVars

VIEW_OPS = ("reshape",)
TARGETS = ("llvm",)


def llvm_target():
    """The host CPU with its real features: plain "llvm" is generic x86-64 without AVX2/FMA."""
    import tvm
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def _key(n, operand_types):
    def norm(v):
        if isinstance(v, np.ndarray):
            return (v.dtype.str, v.shape, v.tobytes())
        if isinstance(v, (list, tuple)):
            return tuple(norm(x) for x in v)
        return v
    return (n.op, tuple(sorted((k, norm(v)) for k, v in n.attrs.items())), tuple(operand_types), n.type)


def kernel_nodes(g: Graph, constant: set[int]) -> list[int]:
    return [nid for nid in g.topo_order()
            if g.node(nid).op not in SOURCE_OPS + VIEW_OPS and nid not in constant]


def _symbolic_attrs_ok(n) -> bool:
    # Symbolic attribute values must be visible to the kernel through a buffer shape.
    return all(not isinstance(n.attrs.get(k), str) for k in DIM_ATTRS if k not in ("shape", "n", "stop"))


def build_module(g: Graph, target=None):
    """(the compiled TVM module, {node id: function name}) for every kernel node of ``g``."""
    import tvm
    from tvm import te
    if os.environ.get("TVM_NUM_THREADS") is None:
        os.environ["TVM_NUM_THREADS"] = str(os.cpu_count() or 1)
    target = target or llvm_target()
    constant = weights_only(g)
    dv = DimVars()
    funcs, symbol_of, by_key = {}, {}, {}
    for nid in kernel_nodes(g, constant):
        n = g.node(nid)
        types = [g.node(o).type for o in g.operands(nid)]
        key = _key(n, types)
        if key not in by_key:
            name = f"k{len(by_key)}_{n.op}"
            phs = [te.placeholder(dv.shape(t.shape), t.dtype, name=f"in{i}") for i, t in enumerate(types)]
            try:
                if not _symbolic_attrs_ok(n):
                    raise LoweringError("symbolic slice starts are not lowered")
                out = lower(n.op, n.attrs, phs, n.type, dv, name="out")
                funcs[name] = te.create_prim_func(phs + [out]).with_attr("global_symbol", name)
            except Exception as e:  # noqa: BLE001 - re-raised with the node's context
                raise BuildError(f"cannot lower {describe(g, n)}: {type(e).__name__}: {e}") from e
            by_key[key] = name
        symbol_of[nid] = by_key[key]
    module = tvm.compile(tvm.IRModule(funcs), target=target) if funcs else None
    return module, symbol_of


class CompiledModel:
    """A graph compiled for the CPU: call it with NumPy inputs, get NumPy outputs."""

    def __init__(self, g: Graph, params: Mapping[str, np.ndarray], module, symbol_of: Mapping[int, str]):
        import tvm

        from ...passes.cleanup import dead_code
        from ..reference import run as interpret
        check_params(g, params)
        self.graph = g
        self.module, self.symbol_of = module, dict(symbol_of)
        self.order = g.topo_order()
        self.last = last_uses(g, self.order)
        self.constant = weights_only(g)
        # Weights-only values, once: a graph of just them, run by the interpreter.
        self.values = {}
        wanted = [nid for nid in self.constant if any(u not in self.constant for u in g.users(nid)) or g.is_output(nid)]
        if wanted:
            sub = g.copy()
            sub.set_outputs([(str(nid), nid) for nid in wanted])
            dead_code(sub)
            for i in list(sub.inputs):  # weights-only values never read an input
                sub.remove(i)
            computed = interpret(sub, {}, {k: v for k, v in params.items() if k in sub.params})
            for nid in wanted:
                value = np.require(computed[str(nid)].astype(g.node(nid).type.dtype), requirements="C")
                self.values[nid] = tvm.runtime.tensor(value)
        self.funcs = {name: self.module[name] for name in set(self.symbol_of.values())} if self.module else {}

    @property
    def kernel_count(self) -> int:
        return len(self.symbol_of)

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm
        g = self.graph
        bindings = bind_dims(g.input_types(), inputs)
        env = dict(self.values)
        for i, nid in enumerate(self.order):
            n = g.node(nid)
            if nid in env or nid in self.constant:
                pass  # bound with the weights (or only feeding other weights-only values)
            elif n.op == "input":
                env[nid] = tvm.runtime.tensor(np.require(np.asarray(inputs[n.name]).astype(n.type.dtype), requirements="C"))
            elif n.op in VIEW_OPS:
                shape = bind_attrs(n.attrs, bindings)["shape"]
                env[nid] = env[g.operands(nid)[0]]._create_view(n.type.concrete(bindings) if -1 in shape else shape)
            else:
                args = [env[o] for o in g.operands(nid)]
                if n.op == "gather":
                    self._check_indices(n, args[0].shape[0], args[1])
                if n.op == "update_slice":
                    self._check_offset(n, args)
                out = tvm.runtime.empty(n.type.concrete(bindings), n.type.dtype)
                self.funcs[self.symbol_of[nid]](*args, out)
                env[nid] = out
            for o in set(g.operands(nid)):
                if self.last[o] == i and o not in self.values:
                    env.pop(o, None)
        return {name: env[o].numpy() for name, o in g.outputs}

    def _check_indices(self, n, rows, idx):
        # Checked on the host before the call: an out-of-range id must never read past the table.
        values = idx.numpy()
        if values.size and (values.min() < 0 or values.max() >= rows):
            bad = values[(values < 0) | (values >= rows)].ravel()[0]
            raise IndexOutOfRange(f"{describe(self.graph, n)}: index {bad} is out of range for a table of {rows} rows")

    def _check_offset(self, n, args):
        cache, value, offset = args
        axis = n.attrs["axis"] % len(cache.shape)
        start = int(offset.numpy())
        if start < 0 or start + value.shape[axis] > cache.shape[axis]:
            raise IndexOutOfRange(f"{describe(self.graph, n)}: writing {value.shape[axis]} entries at offset "
                                  f"{start} overflows a cache of {cache.shape[axis]}")


def compile_graph(g: Graph, params: Mapping[str, np.ndarray], target: str = "llvm") -> CompiledModel:
    """Compile ``g`` (at whatever stage the passes left it) for ``target`` and bind ``params``."""
    if target not in TARGETS:
        raise BuildError(f"unknown or not yet supported target {target!r}; available here: {', '.join(TARGETS)}")
    return CompiledModel(g, params, *build_module(g))
