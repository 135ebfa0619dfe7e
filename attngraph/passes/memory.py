"""Liveness and the memory plan: first and last use of every value, then buffer reuse."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from ..ir import Graph
from ..ir.types import numpy_dtype

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


def parameter_values(g: Graph) -> set[int]:
    """``weights_only`` and, in a training step (whose parameters are inputs marked ``param``), the values
    of its parameters and constants alone: not activations, whatever the batch."""
    constant = set(weights_only(g))
    for nid in g.topo_order():
        n = g.node(nid)
        if n.meta.get("param") or g.operands(nid) and n.op != "arange" and all(o in constant for o in g.operands(nid)):
            constant.add(nid)
    return constant


def activation_bytes(g: Graph, bindings: Mapping[str, int]) -> int | None:
    """Bytes of the forward's values computed from the batch that the backward reads (nodes tagged
    ``backward`` by ``passes.autodiff``): what a training step holds from its forward until its backward
    has used it, the memory that recomputation (checkpointing) would trade for time.  Values of the
    parameters alone (a merged projection's concatenated weights, in a step whose parameters are inputs
    marked ``param``) are not counted.  None for a graph without a backward."""
    backward = {n.id for n in g.nodes() if n.meta.get("backward")}
    if not backward:
        return None
    constant = parameter_values(g)

    def base(nid: int) -> int:
        while g.node(nid).op in VIEW_OPS:
            nid = g.operands(nid)[0]
        return nid
    kept = {base(o) for b in backward for o in g.operands(b) if o not in backward}
    return sum(int(np.prod(g.node(v).type.concrete(bindings), dtype=np.int64)) * numpy_dtype(g.node(v).type.dtype).itemsize
               for v in kept if g.node(v).op not in SOURCE_OPS and v not in constant and v not in backward)


def schedule_training(g: Graph) -> int:
    """Renumber a training graph (one with ``backward`` nodes) so that the executors, which follow
    ``topo_order``, run its nodes depth first from the outputs, the deepest operand first: the backward's
    chain from the loss before the values a backward op computes from forward values alone (a recomputed
    pre-activation or softmax, a checkpoint's copies of a layer), which then run just before their use
    instead of at the end of the forward, held until the backward reaches their layer.  The outputs are
    taken shallowest first: the last layer's parameter updates as soon as the backward has their
    gradients.  Returns how many nodes moved (0: not a training graph)."""
    order = g.topo_order()
    if not any(g.node(nid).meta.get("backward") for nid in order):
        return 0
    pos = {nid: i for i, nid in enumerate(order)}
    height: dict[int, int] = {}
    for nid in order:
        height[nid] = 1 + max((height[o] for o in g.operands(nid)), default=0)
    deepest_last = lambda nid: (height[nid], pos[nid])  # noqa: E731
    seen, sequence = set(), []
    for root in sorted({o for _, o in g.outputs}, key=deepest_last):
        stack = [(root, False)]
        while stack:
            nid, done = stack.pop()
            if done:
                sequence.append(nid)
            elif nid not in seen:
                seen.add(nid)
                stack.append((nid, True))
                stack += [(o, False) for o in sorted(set(g.operands(nid)), key=deepest_last) if o not in seen]
    sequence += [nid for nid in order if nid not in seen]
    moved = sum(a != b for a, b in zip(sequence, order))
    g.renumber(sequence)
    return moved


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
    """Place every computed value in a buffer that no value alive at the same time uses.

    Views (reshapes) share their operand's buffer, which then lives until the views' last use.  The values
    are placed largest first (greedy by size, as TFLite's arena planner): each in the smallest buffer none
    of whose values is alive while it is, else in a new buffer of its size, so the small values fill the
    gaps between the large ones' lives instead of pinning buffers of their own.  A value made by a kernel
    may not share a buffer with that kernel's operands (its life starts where theirs end).  The
    ``in_place`` updates (see ``in_place_candidates``) live in their input's memory: they get no buffer."""
    order = order or g.topo_order()
    live = liveness(g, order)
    constant = weights_only(g)
    owner: dict[int, int] = {}           # planned value -> the value whose buffer it is (a view's: its operand's)
    life: dict[int, list[int]] = {}      # owning value -> [made, last use of it or of a view of it]
    for nid in order:
        n = g.node(nid)
        if n.op in SOURCE_OPS or nid in constant or nid in in_place:
            continue
        if n.op in VIEW_OPS and g.operands(nid)[0] in owner:
            owner[nid] = owner[g.operands(nid)[0]]
            life[owner[nid]][1] = max(life[owner[nid]][1], live[nid][1])
        else:
            owner[nid] = nid
            life[nid] = list(live[nid])
    size = {v: int(np.prod(g.node(v).type.concrete(bindings), dtype=np.int64)) * numpy_dtype(g.node(v).type.dtype).itemsize
            for v in life}
    plan = MemoryPlan(naive_bytes=sum(size.values()))
    lives: list[list[tuple[int, int]]] = []   # per buffer, the lives placed in it, sorted; buffers by size, largest first
    buffer_of: dict[int, int] = {}
    for v in sorted(life, key=lambda v: (-size[v], life[v][0])):
        start, end = life[v]
        for b in range(len(lives) - 1, -1, -1):   # the smallest buffer first
            i = bisect.bisect(lives[b], (start, end))
            if (i == 0 or lives[b][i - 1][1] < start) and (i == len(lives[b]) or end < lives[b][i][0]):
                break
        else:
            b = len(lives)
            lives.append([])
            plan.buffer_bytes.append(size[v])
        bisect.insort(lives[b], (start, end))
        buffer_of[v] = b
    plan.buffer_of = {nid: buffer_of[owner[nid]] for nid in order if nid in owner}
    return plan
