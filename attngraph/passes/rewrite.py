"""What the rewrite rules are written with: ``Pat``, a pattern matched from an anchor up through its
operands, and the guards and edits every rule uses (a value's other uses, replacing a node)."""

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
    """True when ``nid`` is used once, by ``user``, and is not a graph output: it may disappear in a
    fusion.  Uses are counted, not users: ``attention(q=x, k=x)`` uses x twice."""
    return [u for u, _ in g.uses(nid)] == [user] and not g.is_output(nid)


class Pat:
    """A pattern over a node and the nodes it reads, matched upwards from an anchor (as ONNX Runtime's
    ``match_parent_path``, tinygrad's ``UPat``).  ``op``: an op name, a tuple of them, or None (any
    node); ``operands``: patterns of the operands in order (an op with more operands matches only
    with ``variadic``); ``name``: bind the matched node's id under that name (a name bound twice must
    be the same node); ``where(g, nid)``: a guard; ``commutative``: a two-operand op matches its
    operands in either order.  ``match`` returns the bindings, or None."""

    def __init__(self, op=None, *operands: "Pat", name: str | None = None, where=None, commutative: bool = False,
                 variadic: bool = False):
        self.ops = (op,) if isinstance(op, str) else op
        self.operands, self.name, self.where = operands, name, where
        self.commutative, self.variadic = commutative, variadic

    def match(self, g: Graph, nid: int) -> dict | None:
        bound: dict = {}
        return bound if self._match(g, nid, bound) else None

    def _match(self, g: Graph, nid: int, bound: dict) -> bool:
        if self.ops is not None and g.node(nid).op not in self.ops:
            return False
        if self.where is not None and not self.where(g, nid):
            return False
        if self.operands:
            ops = g.operands(nid)
            if len(ops) < len(self.operands) or len(ops) > len(self.operands) and not self.variadic:
                return False
            orders = [ops, ops[::-1]] if self.commutative and len(ops) == 2 else [ops]
            for order in orders:
                trial = dict(bound)
                if all(p._match(g, o, trial) for p, o in zip(self.operands, order)):
                    bound.update(trial)
                    break
            else:
                return False
        if self.name is not None:
            if bound.get(self.name, nid) != nid:
                return False
            bound[self.name] = nid
        return True


def is_scalar_const(g: Graph, nid: int) -> bool:
    return scalar_const(g, nid) is not None


def first_match(g: Graph, nid: int, *patterns: Pat) -> dict | None:
    """The bindings of the first of ``patterns`` that matches at ``nid``, or None."""
    for p in patterns:
        bound = p.match(g, nid)
        if bound is not None:
            return bound
    return None


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


def anchors(g: Graph, *ops: str):
    """(id, node) of every node of one of ``ops`` in order, skipping those an earlier rewrite removed."""
    for nid in g.topo_order():
        if nid in g and g.node(nid).op in ops:
            yield nid, g.node(nid)


def used_exactly_by(g: Graph, nid: int, users) -> bool:
    """True when the uses of ``nid`` are exactly ``users`` (one use each) and it is not a graph output."""
    return sorted(u for u, _ in g.uses(nid)) == sorted(users) and not g.is_output(nid)


def type_of(g: Graph, op: str, operands, attrs=None):
    """The type ``op(operands)`` would have, without adding it (a ``ShapeError`` where it has none);
    an operand is a node id or a type."""
    from ..ir import TensorType
    from ..ir import ops as O
    opdef = O.get(op)
    types = [o if isinstance(o, TensorType) else g.node(o).type for o in operands]
    return opdef.infer(types, {**opdef.defaults, **(attrs or {})})
