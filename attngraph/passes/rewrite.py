"""Small helpers shared by the rewrite rules: matching a node, checking a value's other uses."""

from __future__ import annotations

import numpy as np

from ..ir import Graph


def node_if(g: Graph, nid: int, *ops: str):
    """The node ``nid`` if its op is one of ``ops``, else None."""
    n = g.node(nid)
    return n if n.op in ops else None


def scalar_const(g: Graph, nid: int):
    """The value of a scalar (or all-equal) const node, else None."""
    n = g.node(nid)
    if n.op != "const":
        return None
    value = np.asarray(n.attrs["value"])
    if value.size == 0 or not np.all(value == value.flat[0]):
        return None
    return float(value.flat[0])


def only_used_by(g: Graph, nid: int, user: int) -> bool:
    """True when ``nid`` feeds ``user`` alone and is not a graph output: it may disappear in a fusion."""
    return g.users(nid) == [user] and not g.is_output(nid)


def replace(g: Graph, old: int, op: str, operands, attrs, anchor_meta=None) -> int:
    """Add ``op(operands)`` carrying ``old``'s name stem and meta, and point ``old``'s uses at it."""
    n = g.node(old)
    meta = dict(anchor_meta if anchor_meta is not None else n.meta)
    new = g.add(op, operands, attrs, name=op, meta=meta)
    g.replace_all_uses(old, new)
    return new


def remove_dead(g: Graph) -> int:
    """Remove every node that no output depends on (inputs stay: they are the signature)."""
    live = set()
    stack = [o for _, o in g.outputs]
    while stack:
        nid = stack.pop()
        if nid in live:
            continue
        live.add(nid)
        stack.extend(g.operands(nid))
    dead = [nid for nid in reversed(g.topo_order()) if nid not in live and g.node(nid).op != "input"]
    for nid in dead:
        g.nx.remove_node(nid)
    return len(dead)


def anchors(g: Graph, op: str):
    """(id, node) of every ``op`` node in order, skipping those an earlier rewrite removed."""
    for nid in g.topo_order():
        if nid in g and g.node(nid).op == op:
            yield nid, g.node(nid)
