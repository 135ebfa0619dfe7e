"""The dataflow graph: nodes in a ``networkx.MultiDiGraph``, operand order on the edges.

A node is an op applied to operands (other nodes), with attributes, an inferred ``TensorType``
and free-form ``meta`` (the user's source line, the module scope, anything passes attach).
Edges run operand -> user and carry ``index``, the operand position, so ``x + x`` is two edges.
"""

from __future__ import annotations

import copy as _copy
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import networkx as nx

from . import ops as O
from .meta import problems as meta_problems
from .types import TensorType


class GraphError(ValueError):
    """A malformed graph, or an op applied to operands it does not accept."""


@dataclass
class Node:
    id: int
    op: str
    name: str
    type: TensorType
    attrs: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def opdef(self) -> O.OpDef:
        return O.get(self.op)

    def where(self) -> str:
        """Where the node came from, for error messages: the user's line and the module scope."""
        parts = []
        if self.meta.get("loc"):
            parts.append(f"created at {self.meta['loc']}")
        if self.meta.get("scope"):
            parts.append(f"in module {self.meta['scope']}")
        return ", ".join(parts)


class Graph:
    """A model as a graph of ops, with named inputs, parameters and outputs."""

    def __init__(self, name: str = "graph"):
        self.name = name
        self.nx = nx.MultiDiGraph()
        self.inputs: list[int] = []
        self.outputs: list[tuple[str, int]] = []
        #: free-form graph-level facts, e.g. ``dims``: default sizes for the symbolic dims.
        self.meta: dict = {}
        self._next_id = 0
        self._names: set[str] = set()

    # -- building ---------------------------------------------------------------------------

    def unique_name(self, base: str) -> str:
        if base not in self._names:
            return base
        i = 1
        while f"{base}_{i}" in self._names:
            i += 1
        return f"{base}_{i}"

    def add(self, op: str, operands: Sequence[int] = (), attrs: dict | None = None, *,
            name: str | None = None, meta: dict | None = None) -> int:
        """Add ``op(operands)`` with its type inferred; returns the new node's id.

        A type error is raised as ``GraphError`` naming the op, the operand types and (when
        ``meta['loc']`` is given) the user's line.
        """
        opdef = O.get(op)
        attrs = {**opdef.defaults, **(attrs or {})}
        meta = dict(meta or {})
        operands = list(operands)
        if opdef.arity is not None and len(operands) != opdef.arity:
            raise GraphError(f"{op} takes {opdef.arity} operands, got {len(operands)}")
        types = [self.node(o).type for o in operands]
        try:
            ty = opdef.infer(types, attrs)
        except (O.ShapeError, TypeError, ValueError) as e:
            where = f" in module {meta['scope']}," if meta.get("scope") else ""
            where += f" at {meta['loc']}" if meta.get("loc") else ""
            args = ", ".join(f"%{self.node(o).name}: {t}" for o, t in zip(operands, types))
            raise GraphError(f"{op}({args}){where}: {e}") from None
        nid = self._next_id
        self._next_id += 1
        name = self.unique_name(name or op)
        self._names.add(name)
        self.nx.add_node(nid, node=Node(nid, op, name, ty, attrs, meta))
        for i, o in enumerate(operands):
            self.nx.add_edge(o, nid, index=i)
        if op == "input":
            self.inputs.append(nid)
        return nid

    def set_outputs(self, outputs: Iterable[tuple[str, int]]) -> None:
        self.outputs = list(outputs)

    # -- reading ----------------------------------------------------------------------------

    def node(self, nid: int) -> Node:
        return self.nx.nodes[nid]["node"]

    def __contains__(self, nid: int) -> bool:
        return nid in self.nx

    def __len__(self) -> int:
        return self.nx.number_of_nodes()

    def operands(self, nid: int) -> list[int]:
        edges = sorted(self.nx.in_edges(nid, data="index"), key=lambda e: e[2])
        return [src for src, _, _ in edges]

    def uses(self, nid: int) -> list[tuple[int, int]]:
        """(user, operand index) pairs, in user order."""
        return sorted((dst, idx) for _, dst, idx in self.nx.out_edges(nid, data="index"))

    def users(self, nid: int) -> list[int]:
        return sorted({dst for _, dst in self.nx.out_edges(nid)})

    def is_output(self, nid: int) -> bool:
        return any(o == nid for _, o in self.outputs)

    def topo_order(self) -> list[int]:
        return list(nx.lexicographical_topological_sort(self.nx))

    def nodes(self) -> Iterator[Node]:
        for nid in self.topo_order():
            yield self.node(nid)

    @property
    def params(self) -> dict[str, int]:
        """Parameter name -> node id."""
        return {n.name: n.id for n in self.nodes() if n.op == "param"}

    def input_types(self) -> dict[str, TensorType]:
        return {self.node(i).name: self.node(i).type for i in self.inputs}

    def param_types(self) -> dict[str, TensorType]:
        return {name: self.node(i).type for name, i in self.params.items()}

    def output_types(self) -> dict[str, TensorType]:
        return {name: self.node(o).type for name, o in self.outputs}

    def describe(self, nid: int) -> str:
        """``%name = op(%a, %b) (created at file:line, in module scope)``: a node in an error message."""
        n = self.node(nid)
        args = ", ".join(f"%{self.node(o).name}" for o in self.operands(nid))
        where = n.where()
        return f"%{n.name} = {n.op}({args})" + (f" ({where})" if where else "")

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes():
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items()))

    # -- rewriting --------------------------------------------------------------------------

    def set_operand(self, user: int, index: int, new: int) -> None:
        for src, dst, key, idx in list(self.nx.in_edges(user, keys=True, data="index")):
            if idx == index:
                self.nx.remove_edge(src, dst, key)
        self.nx.add_edge(new, user, index=index)

    def replace_all_uses(self, old: int, new: int) -> None:
        """Point every use of ``old`` (operands and graph outputs) at ``new``."""
        if self.node(old).type != self.node(new).type:
            raise GraphError(f"cannot replace %{self.node(old).name}: {self.node(old).type} "
                             f"with %{self.node(new).name}: {self.node(new).type}")
        for user, idx in self.uses(old):
            self.set_operand(user, idx, new)
        self.outputs = [(name, new if o == old else o) for name, o in self.outputs]

    def param_to_input(self, nid: int) -> None:
        """Make the parameter ``nid`` an input of the same name and type, its meta ``param`` set (a training
        step's parameters: state passed in and returned updated, instead of weights bound once)."""
        n = self.node(nid)
        if n.op != "param":
            raise GraphError(f"%{n.name} is a {n.op}, not a param")
        n.op, n.attrs = "input", {"type": n.type}
        n.meta["param"] = True
        self.inputs.append(nid)

    def renumber(self, order: Sequence[int]) -> None:
        """Give the nodes the ids 0, 1, ... in ``order`` (a topological order of every node), so that
        ``topo_order()`` (the order executors run the nodes in) is ``order``."""
        if sorted(order) != sorted(self.nx.nodes) or len(set(order)) != len(order):
            raise GraphError("renumber needs every node of the graph exactly once")
        new = {old: i for i, old in enumerate(order)}
        if any(new[src] >= new[dst] for src, dst in self.nx.edges()):
            raise GraphError("renumber needs a topological order: an operand after its user")
        self.nx = nx.relabel_nodes(self.nx, new, copy=True)
        for nid in self.nx.nodes:
            self.nx.nodes[nid]["node"].id = nid
        self.inputs = [new[i] for i in self.inputs]
        self.outputs = [(name, new[o]) for name, o in self.outputs]
        self._next_id = len(order)

    def remove(self, nid: int) -> None:
        if self.users(nid) or self.is_output(nid):
            raise GraphError(f"cannot remove %{self.node(nid).name}: it is still used")
        self._names.discard(self.node(nid).name)
        if nid in self.inputs:
            self.inputs.remove(nid)
        self.nx.remove_node(nid)

    def copy(self) -> "Graph":
        g = Graph(self.name)
        g.nx = self.nx.copy()
        for nid in g.nx.nodes:
            n = g.nx.nodes[nid]["node"]
            g.nx.nodes[nid]["node"] = Node(n.id, n.op, n.name, n.type, dict(n.attrs), _copy.copy(n.meta))
        g.inputs = list(self.inputs)
        g.outputs = list(self.outputs)
        g.meta = _copy.deepcopy(self.meta)
        g._next_id = self._next_id
        g._names = set(self._names)
        return g

    # -- checking ---------------------------------------------------------------------------

    def validate(self) -> None:
        """Raise ``GraphError`` listing every structural or type problem found."""
        problems = []
        if not nx.is_directed_acyclic_graph(self.nx):
            problems.append("the graph has a cycle")
        names = {}
        for nid in self.nx.nodes:
            n = self.node(nid)
            label = f"%{n.name}"
            if n.name in names:
                problems.append(f"{label}: name used by two nodes")
            names[n.name] = nid
            indices = sorted(idx for _, _, idx in self.nx.in_edges(nid, data="index"))
            if indices != list(range(len(indices))):
                problems.append(f"{label}: operand indices {indices} are not 0..{len(indices) - 1}")
            try:
                opdef = O.get(n.op)
            except KeyError as e:
                problems.append(f"{label}: {e}")
                continue
            if opdef.arity is not None and len(indices) != opdef.arity:
                problems.append(f"{label}: {n.op} takes {opdef.arity} operands, has {len(indices)}")
                continue
            try:
                ty = opdef.infer([self.node(o).type for o in self.operands(nid)], n.attrs)
            except Exception as e:  # noqa: BLE001 - reported, not raised
                problems.append(f"{label} = {n.op}: {e}")
                continue
            if ty != n.type:
                problems.append(f"{label} = {n.op}: recorded type {n.type} but operands give {ty}")
        for i in self.inputs:
            if i not in self.nx or self.node(i).op != "input":
                problems.append(f"graph input {i} is not an input node")
        if sorted(self.inputs) != sorted(n for n in self.nx.nodes if self.node(n).op == "input"):
            problems.append("the input list and the input nodes differ")
        if not self.outputs:
            problems.append("the graph has no outputs")
        for name, o in self.outputs:
            if o not in self.nx:
                problems.append(f"output {name!r} refers to a missing node")
        problems += meta_problems(self)
        if problems:
            raise GraphError(f"invalid graph {self.name!r}:\n  " + "\n  ".join(problems))

    def __str__(self) -> str:
        from .printer import to_text
        return to_text(self)
