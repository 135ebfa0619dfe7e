"""Reverse-mode differentiation as a graph transform: ``grad(graph, loss)`` is a graph in the same IR that
computes the graph's outputs and the gradient of the scalar output ``loss`` with respect to every
parameter (and to the inputs asked for), as outputs ``grad:NAME``.

Each op's derivative is defined with the op (``OpDef.vjp``, ``ir.ops.derivative``): given the result's
cotangent it adds the ops computing each operand's.  The transform walks the graph backwards from the
loss, asks each op on a path from a parameter to the loss for its operands' cotangents and adds up the
cotangents of a value used more than once.  The result is an ordinary graph: the interpreter runs it,
the passes optimize it (forward and backward alike), every target compiles it.  It runs on a graph
before or after the fusions: the fused ops have their derivatives too.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..ir import Graph, TensorType
from ..ir.graph import GraphError
from ..ir.ops import SOURCE_OPS, ShapeError
from .rewrite import remove_dead

GRAD_PREFIX = "grad:"


class AutodiffError(ValueError):
    """A graph that cannot be differentiated as asked (names what and where)."""


class Builder:
    """What a derivative rule writes with: ``d(op, *operands, **attrs)`` adds ``op(operands)`` to the
    graph being differentiated (tagged with the forward node's line and scope) and returns its id.
    ``needs(x)``: whether value ``x`` is on a path from a differentiated parameter or input (its
    cotangent is used)."""

    def __init__(self, g: Graph, meta: dict, needed: set[int] | None = None):
        self.g, self.meta, self.needed = g, meta, needed

    def needs(self, nid: int) -> bool:
        return self.needed is None or nid in self.needed

    def __call__(self, op: str, *operands: int, **attrs) -> int:
        return self.g.add(op, operands, attrs, name=f"d_{op}", meta=self.meta)

    def type(self, nid: int) -> TensorType:
        return self.g.node(nid).type

    def const(self, value, like: int | None = None) -> int:
        """A scalar (or array) constant in the dtype of node ``like`` (the value's own without one)."""
        value = np.asarray(value)
        dtype = self.type(like).dtype if like is not None else value.dtype.name
        return self.g.add("const", (), {"value": value.astype(np.float64 if np.dtype(dtype).kind == "f" else dtype),
                                        "dtype": dtype}, name="d_const", meta=self.meta)

    def swap_last(self, x: int) -> int:
        rank = self.type(x).rank
        return self("transpose", x, perm=tuple(range(rank - 2)) + (rank - 1, rank - 2))

    def sum_to(self, x: int, like) -> int:
        """``x`` summed over the axes along which a value of ``like``'s type (a node id or a type) was
        broadcast to ``x``'s shape: the cotangent of a broadcast operand."""
        want = like if isinstance(like, TensorType) else self.type(like)
        have = self.type(x)
        if have.shape == want.shape:
            return x
        lead = have.rank - want.rank
        axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(want.shape)
                                          if d == 1 and have.shape[lead + i] != 1)
        if axes:
            x = self("reduce_sum", x, axes=axes, keepdims=True)
        return self("reshape", x, shape=want.shape)


def _on_paths(g: Graph, sources: set[int], target: int) -> set[int]:
    """The nodes on some path from one of ``sources`` to ``target`` (both ends included)."""
    down = set(sources)
    for nid in g.topo_order():
        if nid in down or any(o in down for o in g.operands(nid)):
            down.add(nid)
    up, stack = set(), [target]
    while stack:
        nid = stack.pop()
        if nid not in up:
            up.add(nid)
            stack.extend(g.operands(nid))
    return down & up


def grad(graph: Graph, loss: str = "loss", *, wrt=None, inputs=(), keep_outputs: bool = True) -> Graph:
    """The graph computing ``graph``'s outputs (``keep_outputs``) and, as outputs ``grad:NAME``, the
    gradient of its scalar output ``loss`` with respect to the parameters ``wrt`` (names; every parameter
    by default) and the inputs ``inputs``.  A parameter on no path to the loss gets a zero gradient and a
    warning; an op on such a path without a derivative is an ``AutodiffError`` naming it and its line."""
    g = graph.copy()
    outputs = dict(g.outputs)
    if loss not in outputs:
        raise AutodiffError(f"{g.name} has no output {loss!r} to differentiate (its outputs: {', '.join(outputs)})")
    loss_id = outputs[loss]
    lt = g.node(loss_id).type
    if lt.rank != 0 or not lt.is_float:
        raise AutodiffError(f"the loss {loss!r} must be a float scalar, got {lt} ({g.describe(loss_id)}); reduce it "
                            f"first (a mean or a sum)")
    params = g.params
    names = list(params) if wrt is None else list(wrt)
    unknown = [n for n in names if n not in params]
    by_input = {g.node(i).name: i for i in g.inputs}
    unknown += [n for n in inputs if n not in by_input]
    if unknown:
        raise AutodiffError(f"no parameter or input {', '.join(map(repr, unknown))} in {g.name}")
    sources = {params[n]: n for n in names} | {by_input[n]: n for n in inputs}
    for nid, name in sources.items():
        if not g.node(nid).type.is_float:
            raise AutodiffError(f"{name!r} is {g.node(nid).type}: only float values have gradients")
    needed = _on_paths(g, set(sources), loss_id)
    order = [nid for nid in g.topo_order() if nid in needed]
    cot = {loss_id: Builder(g, g.node(loss_id).meta).const(1.0, loss_id)}
    for nid in reversed(order):
        n = g.node(nid)
        if n.op in SOURCE_OPS or nid not in cot:
            continue
        if n.opdef.vjp is None:
            raise AutodiffError(f"op {n.op!r} has no derivative: {g.describe(nid)} is on a path from a parameter to "
                                f"the loss")
        operands = g.operands(nid)
        try:
            grads = n.opdef.vjp(Builder(g, {**n.meta, "backward": True}, needed), n, operands, nid, cot[nid])
        except (ShapeError, GraphError) as e:
            raise AutodiffError(f"differentiating {g.describe(nid)}: {e}") from None
        for o, gr in zip(operands, grads):
            if gr is None or o not in needed:
                continue
            if g.node(gr).type != g.node(o).type:
                raise AutodiffError(f"the derivative of {n.op} gave {g.node(gr).type} for operand %{g.node(o).name}: "
                                    f"{g.node(o).type} ({g.describe(nid)})")
            cot[o] = gr if o not in cot else g.add("add", [cot[o], gr], name="d_add", meta={**n.meta, "backward": True})
    grads_out = []
    for nid, name in sources.items():
        if nid not in cot:
            warnings.warn(f"{name!r} does not reach the loss {loss!r}: its gradient is zero", RuntimeWarning,
                          stacklevel=2)
            t = g.node(nid).type
            zero = Builder(g, {}).const(0.0, nid)
            cot[nid] = g.add("broadcast_like", [zero, nid], name="d_zero") if t.rank else zero
        grads_out.append((GRAD_PREFIX + name, cot[nid]))
    g.set_outputs((list(g.outputs) if keep_outputs else [(loss, loss_id)]) + grads_out)
    remove_dead(g)
    g.validate()
    return g


__all__ = ["AutodiffError", "Builder", "GRAD_PREFIX", "grad"]

