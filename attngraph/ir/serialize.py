"""A graph as JSON (and its constant arrays beside it), so an artifact can rebuild it exactly."""

from __future__ import annotations

import hashlib

import numpy as np

from .graph import Graph, Node
from .types import TensorType


def _attr_to_json(key, value, arrays, node_name):
    if isinstance(value, np.ndarray):
        ref = f"__const__.{node_name}.{key}"
        arrays[ref] = value
        return {"array": ref}
    if isinstance(value, TensorType):
        return {"type": value.to_json()}
    if isinstance(value, tuple):
        return {"tuple": [_attr_to_json(key, v, arrays, node_name) for v in value]}
    return value


def _attr_from_json(value, arrays):
    if isinstance(value, dict):
        if "array" in value:
            return arrays[value["array"]]
        if "type" in value:
            return TensorType.from_json(value["type"])
        if "tuple" in value:
            return tuple(_attr_from_json(v, arrays) for v in value["tuple"])
    if isinstance(value, list):
        return [_attr_from_json(v, arrays) for v in value]
    return value


def to_json(g: Graph) -> tuple[dict, dict[str, np.ndarray]]:
    """(a JSON-able dict, {name: array} of the constants it refers to)."""
    arrays: dict[str, np.ndarray] = {}
    nodes = []
    for n in g.nodes():
        nodes.append({"id": n.id, "op": n.op, "name": n.name, "type": n.type.to_json(),
                      "attrs": {k: _attr_to_json(k, v, arrays, n.name) for k, v in n.attrs.items()},
                      "meta": {k: v for k, v in n.meta.items() if isinstance(v, (str, int, float, list, tuple))},
                      "operands": g.operands(n.id)})
    return {"name": g.name, "inputs": g.inputs, "outputs": g.outputs, "meta": g.meta, "nodes": nodes}, arrays


def from_json(obj: dict, arrays) -> Graph:
    g = Graph(obj["name"])
    for item in obj["nodes"]:
        attrs = {k: _attr_from_json(v, arrays) for k, v in item["attrs"].items()}
        node = Node(item["id"], item["op"], item["name"], TensorType.from_json(item["type"]), attrs, dict(item["meta"]))
        g.nx.add_node(node.id, node=node)
        g._names.add(node.name)
        for i, o in enumerate(item["operands"]):
            g.nx.add_edge(o, node.id, index=i)
    g.inputs = list(obj["inputs"])
    g.outputs = [(name, nid) for name, nid in obj["outputs"]]
    g.meta = dict(obj["meta"])
    g._next_id = max(g.nx.nodes, default=-1) + 1
    g.validate()
    return g


def canonical(value):
    """A stable JSON-able form of an attribute or metadata value (arrays by content), for hashing."""
    if isinstance(value, np.ndarray):
        return ["ndarray", value.dtype.str, list(value.shape), hashlib.sha256(value.tobytes()).hexdigest()]
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, float):
        return repr(value)  # exact: 1/sqrt(8) must not round to the same key as a nearby scale
    return value if isinstance(value, (int, str, bool, type(None))) else str(value)
