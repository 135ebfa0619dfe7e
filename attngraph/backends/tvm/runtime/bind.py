"""Binding the weights: the weights-only values a run reads (``W*scale``, ``concat(Wq, Wk, Wv)``, packed
panels) computed once, by the float64 interpreter, and rounded once to their dtype."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ....ir import Graph
from ....passes.cleanup import dead_code
from ....passes.memory import weights_only
from ....reference import run as interpret


def precomputed_nodes(g: Graph, order: list[int]) -> list[int]:
    """The weights-only values that a run reads: computed once when the weights are bound."""
    constant = weights_only(g)
    return [nid for nid in order if nid in constant and (any(u not in constant for u in g.users(nid)) or g.is_output(nid))]


def bind_constants(g: Graph, nodes: list[int], params: Mapping[str, np.ndarray]) -> dict[int, np.ndarray]:
    """{node: value} of ``nodes`` (weights-only) for ``params``: parameters as they are, every other value
    computed by the interpreter in float64 and rounded once to its dtype (``W*scale`` is then the
    nearest float32)."""
    values = {nid: np.asarray(params[g.node(nid).name]) for nid in nodes if g.node(nid).op == "param"}
    computed = [nid for nid in nodes if nid not in values]
    if computed:
        sub = g.copy()
        sub.set_outputs([(str(nid), nid) for nid in computed])
        dead_code(sub)
        for i in list(sub.inputs):  # weights-only values never read an input
            sub.remove(i)
        used = sub.params  # a property that walks the graph: once, not per parameter
        out = interpret(sub, {}, {k: v for k, v in params.items() if k in used}, dtype="float64")
        values.update((nid, out[str(nid)]) for nid in computed)
    return {nid: np.asarray(v, dtype=g.node(nid).type.dtype) for nid, v in values.items()}
