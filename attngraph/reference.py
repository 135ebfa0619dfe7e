"""The reference interpreter: runs any graph, at any stage of the pipeline, with NumPy.

It is the oracle every optimization and every compiled kernel is checked against, so it stays
small: bind the inputs, walk the nodes in order applying each op's reference function, check each
result's shape against the node's type, drop values after their last use.  Every floating-point
value is held in the dtype asked for (float32, or float64 for verification); a value whose type is a
half-precision one (float16, bfloat16) is rounded to it first, as a compiled kernel stores its result
(computed in float32), so a half-precision graph runs here with the roundings of its build.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from .inputs import bind_dims
from .ir import Graph, Node
from .ir.types import HALF_DTYPES, numpy_dtype
from .ir.ops import DIM_ATTRS, bind_attrs  # noqa: F401  (bind_attrs: re-exported for the op tests)
from .weights import check_params


class InterpreterError(RuntimeError):
    """An op failed while running; the message names the node and the model line that made it."""


def last_uses(g: Graph, order: list[int]) -> dict[int, int]:
    """For each node, the position in ``order`` of its last user (outputs live to the end)."""
    pos = {nid: i for i, nid in enumerate(order)}
    last = {nid: max((pos[u] for u in g.users(nid)), default=pos[nid]) for nid in order}
    for _, o in g.outputs:
        last[o] = len(order)
    return last


def run(g: Graph, inputs: Mapping[str, np.ndarray], params: Mapping[str, np.ndarray], *,
        dtype: str = "float32",
        observe: Callable[[Node, np.ndarray], None] | None = None,
        stats: dict | None = None) -> dict[str, np.ndarray]:
    """Run ``g`` on ``inputs`` and ``params``; returns the outputs by name.

    ``dtype`` is the floating-point type of every computed value; ``observe(node, value)`` is
    called with each node's value (the per-node comparisons of ``attngraph verify`` use it);
    ``stats``, if given, receives ``peak_live_values`` and ``peak_live_bytes``."""
    try:
        dtype = np.dtype(dtype).name
    except TypeError:
        pass
    if dtype not in ("float32", "float64"):
        raise ValueError(f"the interpreter computes in float32 or float64, not {dtype!r}")
    bindings = bind_dims(g.input_types(), inputs)
    check_params(g, params)
    order = g.topo_order()
    last = last_uses(g, order)
    env: dict[int, np.ndarray] = {}
    peak_values = peak_bytes = 0
    for i, nid in enumerate(order):
        n = g.node(nid)
        try:
            if n.op == "input":
                value = np.asarray(inputs[n.name])
            elif n.op == "param":
                value = np.asarray(params[n.name])
            else:
                args = [env[o] for o in g.operands(nid)]
                value = np.asarray(n.opdef.ref(*args, **bind_attrs(n.attrs, bindings)))
            if n.type.dtype in HALF_DTYPES:  # computed in float32 or wider, stored in half precision
                value = value.astype(np.float32, copy=False).astype(numpy_dtype(n.type.dtype)).astype(dtype)
            elif value.dtype.kind == "f":
                value = value.astype(dtype, copy=False)
            elif value.dtype.name != n.type.dtype:
                value = value.astype(n.type.dtype)
            want = n.type.concrete(bindings)
            if value.shape != want:
                raise InterpreterError(f"produced shape {value.shape}, but its type says {n.type} = {want}")
        except Exception as e:  # noqa: BLE001 - re-raised with the node's context
            raise InterpreterError(f"while executing {g.describe(nid)}: {type(e).__name__}: {e}") from e
        env[nid] = value
        peak_values = max(peak_values, len(env))
        peak_bytes = max(peak_bytes, sum(v.nbytes for v in env.values()))
        if observe is not None:
            observe(n, value)
        for o in set(g.operands(nid)):
            if last[o] == i:
                del env[o]
        if last[nid] == i:  # never used: drop at once
            del env[nid]
    if stats is not None:
        stats.update(peak_live_values=peak_values, peak_live_bytes=peak_bytes)
    return {name: env[o] for name, o in g.outputs}
