"""Text (SSA) and Graphviz DOT views of a graph.

The text form is stable: nodes in topological order (ties broken by creation order), one line each,
so tests can compare printed IR and a person can read what a pass did::

    %scores = matmul(%q, %kT) : f32[batch, 8, tgt_len, src_len]    # decoder.layers.0.cross_attn
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the graph prints itself with these functions (Graph.__str__)
    from .graph import Graph, Node


def format_attr(value) -> str:
    if isinstance(value, np.ndarray):
        if value.size == 1:
            return repr(value.reshape(()).item())
        from .types import DTYPES
        return f"<{DTYPES.get(value.dtype.name, value.dtype.name)}[{', '.join(map(str, value.shape))}]>"
    if isinstance(value, float):
        return repr(round(value, 8))
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(format_attr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value) if isinstance(value, str) else str(value)


def format_node(g: Graph, n: Node, scope: bool = True) -> str:
    defaults = n.opdef.defaults
    attrs = {k: v for k, v in n.attrs.items()
             if not (n.op in ("input", "param") and k == "type") and not (n.op == "const" and v is None)
             and not (isinstance(v, tuple) and v == () == defaults.get(k))}  # no masks, no fills: said by omission
    head = n.op
    if attrs:
        head += "[" + ", ".join(f"{k}={format_attr(v)}" for k, v in attrs.items()) + "]"
    args = ", ".join(f"%{g.node(o).name}" for o in g.operands(n.id))
    line = f"%{n.name} = {head}({args}) : {n.type}"
    if scope and n.meta.get("scope"):
        line += f"    # {n.meta['scope']}"
    return line


def to_text(g: Graph, scope: bool = True) -> str:
    ins = ", ".join(f"%{g.node(i).name}: {g.node(i).type}" for i in g.inputs)
    lines = [f"graph {g.name}({ins}) {{"]
    for n in g.nodes():
        if n.op == "input":
            continue
        lines.append("  " + format_node(g, n, scope))
    outs = ", ".join(f"{name}=%{g.node(o).name}" for name, o in g.outputs)
    lines.append(f"  return {outs}")
    lines.append("}")
    return "\n".join(lines)


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


_COLORS = {"input": "lightblue", "param": "lightgrey", "const": "lightgrey", "fused": "gold",
           "nn": "palegreen", "layout": "white", "reduce": "lightpink"}


def to_dot(g: Graph) -> str:
    """Graphviz DOT: one box per op (name, op, type), edges labelled with the operand index."""
    lines = [f'digraph "{_dot_escape(g.name)}" {{', "  rankdir=TB;", '  node [shape=box, style=filled, fontname="monospace"];']
    for n in g.nodes():
        color = _COLORS.get(n.op, _COLORS.get(n.opdef.group, "white"))
        label = f"{n.name}\\n{n.op}\\n{_dot_escape(str(n.type))}"
        lines.append(f'  n{n.id} [label="{label}", fillcolor={color}];')
        ops = g.operands(n.id)
        for i, o in enumerate(ops):
            extra = f' [label="{i}"]' if len(ops) > 1 else ""
            lines.append(f"  n{o} -> n{n.id}{extra};")
    for name, o in g.outputs:
        lines.append(f'  out_{_dot_escape(name)} [label="{_dot_escape(name)}", shape=oval, fillcolor=lightblue];')
        lines.append(f"  n{o} -> out_{_dot_escape(name)};")
    lines.append("}")
    return "\n".join(lines)
