"""Liveness and the memory plan: first and last use of every value, then buffer reuse."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from ..ir import Graph

#: Ops whose result is a view of their operand's buffer (no kernel, no storage of its own).
VIEW_OPS = ("reshape",)
SOURCE_OPS = ("input", "param", "const")


def weights_only(g: Graph) -> set[int]:
    """Nodes that depend on parameters and constants alone.  Executors compute them once, when the
    weights are bound (``W*scale``, ``concat(Wq, Wk, Wv)``), so they are neither kernels nor
    intermediate memory at run time.  A value whose shape holds a symbolic dim (a constant table sliced
    to the sequence length) depends on the run's sizes: it is computed at run time."""
    out: set[int] = set()
    for nid in g.topo_order():
        n = g.node(nid)
        if n.op in ("param", "const") or (n.op not in ("input", "arange") and g.operands(nid)
                                         and all(o in out for o in g.operands(nid))
                                         and all(isinstance(d, int) for d in n.type.shape)):
            out.add(nid)
    return out


def in_place_candidates(g: Graph) -> set[int]:
    """``update_slice`` nodes that may write into their cache operand: the cache is a graph input
    read by nothing else (a decode step's KV cache), so the update can write just the new entries
    into the caller's tensor and return it, instead of copying the whole cache."""
    return {nid for nid in g.topo_order() if g.node(nid).op == "update_slice"
            and (cache := g.operands(nid)[0]) in g.inputs and g.users(cache) == [nid] and not g.is_output(cache)}


def liveness(g: Graph, order: list[int] | None = None) -> dict[int, tuple[int, int]]:
    """node -> (position where it is made, position of its last use); outputs live to the end."""
    order = order or g.topo_order()
    pos = {nid: i for i, nid in enumerate(order)}
    live = {}
    for nid in order:
        last = max((pos[u] for u in g.users(nid)), default=pos[nid])
        live[nid] = (pos[nid], len(order) if g.is_output(nid) else last)
    return live


def activation_bytes(g: Graph, bindings: Mapping[str, int]) -> int | None:
    """Bytes of the forward's values computed from the batch that the backward reads (nodes tagged
    ``backward`` by ``passes.autodiff``): what a training step holds from its forward until its backward
    has used it, the memory that recomputation (checkpointing) would trade for time.  Values of the
    parameters alone (a merged projection's concatenated weights, in a step whose parameters are inputs
    marked ``param``) are not counted.  None for a graph without a backward."""
    backward = {n.id for n in g.nodes() if n.meta.get("backward")}
    if not backward:
        return None
    constant = set(weights_only(g))
    for nid in g.topo_order():  # the parameters' own values, where they are inputs (a training step)
        n = g.node(nid)
        if n.meta.get("param") or g.operands(nid) and n.op != "arange" and all(o in constant for o in g.operands(nid)):
            constant.add(nid)

    def base(nid: int) -> int:
        while g.node(nid).op in VIEW_OPS:
            nid = g.operands(nid)[0]
        return nid
    kept = {base(o) for b in backward for o in g.operands(b) if o not in backward}
    return sum(int(np.prod(g.node(v).type.concrete(bindings), dtype=np.int64)) * np.dtype(g.node(v).type.dtype).itemsize
               for v in kept if g.node(v).op not in SOURCE_OPS and v not in constant and v not in backward)


@dataclass
class MemoryPlan:
    buffer_of: dict[int, int] = field(default_factory=dict)
    buffer_bytes: list[int] = field(default_factory=list)
    naive_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        return sum(self.buffer_bytes)


def plan_memory(g: Graph, bindings: Mapping[str, int], order: list[int] | None = None,
                in_place: set[int] = frozenset()) -> MemoryPlan:
    """Place every computed value in a buffer, reusing a buffer once all values it held are dead.

    Views (reshapes) share their operand's buffer; a buffer is free only after the last use of
    every value placed in it.  Best fit among free buffers, else a new one.  The ``in_place``
    updates (see ``in_place_candidates``) live in their input's memory: they get no buffer."""
    order = order or g.topo_order()
    live = liveness(g, order)
    plan = MemoryPlan()
    constant = weights_only(g)
    holders: dict[int, list[int]] = {}   # buffer -> values placed in it
    free: list[int] = []
    for i, nid in enumerate(order):
        n = g.node(nid)
        if n.op in SOURCE_OPS or nid in constant or nid in in_place:
            continue
        if n.op in VIEW_OPS and g.operands(nid)[0] in plan.buffer_of:
            buf = plan.buffer_of[g.operands(nid)[0]]
        else:
            size = int(np.prod(n.type.concrete(bindings), dtype=np.int64)) * np.dtype(n.type.dtype).itemsize
            plan.naive_bytes += size
            fits = [b for b in free if plan.buffer_bytes[b] >= size]
            if fits:
                buf = min(fits, key=lambda b: plan.buffer_bytes[b])
                free.remove(buf)
            else:
                buf = len(plan.buffer_bytes)
                plan.buffer_bytes.append(size)
        plan.buffer_of[nid] = buf
        holders.setdefault(buf, []).append(nid)
        # Release the buffers whose every value has had its last use at this step.
        for b in {plan.buffer_of[o] for o in g.operands(nid) if o in plan.buffer_of} | {buf}:
            if b not in free and all(live[v][1] <= i for v in holders[b]):
                free.append(b)
    return plan
