"""The llvm target's layout pass: a ``linear`` (or ``matmul``) whose weight is known when the weights are
bound reads it as column panels, ``linear_packed(x, pack_panels(W; width))``.  The packing is a
weights-only value, so executors compute it once at bind time; the projection kernel then streams
each panel contiguously instead of packing it on every call (the cost that dominates when the
product has few rows, as in a decode step)."""

from __future__ import annotations

from .....ir import Graph
from .....passes.memory import weights_only
from .....passes.rewrite import replace
from . import ops  # noqa: F401  (registers pack_panels and linear_packed)
from .tiles import PANEL_WIDTH


def _static_2d(t) -> bool:
    return t.rank == 2 and all(isinstance(d, int) for d in t.shape)


def pack_weights(g: Graph, width: int = PANEL_WIDTH, dtype: str | None = None):
    """``linear(x, W, b)`` and ``matmul(x, W)`` with a weights-only 2-D ``W`` ->
    ``linear_packed(x, pack_panels(W), b; n=N)``, the panels stored as ``dtype`` if given (float16:
    half the bytes to read, computed in x's dtype).  Returns (matches, misses) like the other rules."""
    constant = weights_only(g)
    packed: dict[int, int] = {}  # W -> its panels, shared by every product reading W
    matches, misses = 0, []
    for nid in list(g.topo_order()):
        n = g.node(nid)
        if n.op not in ("linear", "matmul") or nid in constant:
            continue
        x, w, *bias = g.operands(nid)
        wt = g.node(w).type
        if w not in constant or not _static_2d(wt) or g.node(x).type.rank < 2 and n.op == "matmul":
            if n.op == "linear":
                misses.append(f"%{n.name}: its weight is not known at bind time; packed per call")
            continue
        if w not in packed:
            packed[w] = g.add("pack_panels", [w], {"width": width, "dtype": dtype}, name=f"{g.node(w).name}_panels",
                              meta=dict(g.node(w).meta))
        attrs = {"activation": n.attrs.get("activation", "none"), "n": wt.shape[1]}
        replace(g, nid, "linear_packed", [x, packed[w]] + bias, attrs)
        g.remove(nid)
        matches += 1
    return matches, misses
