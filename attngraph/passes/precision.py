"""A model in half precision: ``to_dtype(graph, "float16" | "bfloat16")`` is the graph with its float32
parameters, inputs, constants and casts in that type; every op's result type follows from its operands,
so activations and weights are stored in it.  The arithmetic stays float32, as PyTorch's autocast keeps
it: each lowering computes in float32 from operands read into float32 (products accumulate, softmax
and norm statistics are held in float32) and rounds its result to the storage type once; the
interpreter rounds each op's result the same way (``reference.run``), so a build and its oracle make the
same roundings."""

from __future__ import annotations

import copy

import numpy as np

from ..ir import Graph, TensorType
from ..ir.types import HALF_DTYPES, numpy_dtype


class PrecisionError(ValueError):
    """A model that cannot be converted to the asked precision (names what and where)."""


#: ``graph.meta[STATE]``: the inputs that are state a model hands back to itself (a decoder's caches and
#: encoder memory, ``generate.trace_entries``); in half precision they are stored in the type, as its outputs.
STATE = "state_inputs"


def to_dtype(graph: Graph, dtype: str, *, master: bool = False) -> Graph:
    """``graph`` with its float32 parameters, constants and casts in ``dtype``; a float32 input stays
    float32 (the model's interface is unchanged) and is cast to ``dtype`` where it enters, except the
    state inputs (``STATE``), which are stored in ``dtype`` as the outputs they come from.

    ``master``: mixed-precision training's graph (PyTorch's autocast with float32 weights): the parameters stay
    float32 too, each cast to ``dtype`` where it enters, and every ``dtype`` output is cast back to float32, so the
    loss and the parameters' gradients (the cast's derivative casts them back) are float32 while the forward and
    the backward compute in ``dtype``."""
    if dtype not in HALF_DTYPES:
        raise PrecisionError(f"a model converts to {' or '.join(HALF_DTYPES)}, not {dtype!r}")
    others = sorted({n.type.dtype for n in graph.nodes() if n.op in ("param", "input") and n.type.is_float}
                    - {"float32"})
    if others:
        raise PrecisionError(f"{graph.name} has {', '.join(others)} parameters or inputs: only float32 ones convert "
                             f"to {dtype}")
    g = Graph(graph.name)
    g.meta = copy.deepcopy(graph.meta)
    state = set(graph.meta.get(STATE, ()))
    new: dict[int, int] = {}
    for nid in graph.topo_order():
        n = graph.node(nid)
        attrs = dict(n.attrs)
        f32 = n.type.dtype == "float32"
        stored = f32 and (n.op == "param" and not master or n.op == "input" and n.name in state)  # kept in dtype
        entering = f32 and (n.op == "param" and master or n.op == "input" and n.name not in state)  # cast at use
        if stored:
            attrs["type"] = TensorType(n.type.shape, dtype)
        elif n.op == "const" and n.type.dtype == "float32":
            attrs["dtype"] = dtype
        elif n.op == "cast" and attrs.get("dtype") == "float32":
            attrs["dtype"] = dtype
        new[nid] = g.add(n.op, [new[o] for o in graph.operands(nid)], attrs, name=n.name, meta=n.meta)
        if entering:
            new[nid] = g.add("cast", [new[nid]], {"dtype": dtype}, name=f"{n.name}_{dtype}", meta=n.meta)
    outputs = [(name, new[o]) for name, o in graph.outputs]
    if master:
        outputs = [(name, g.add("cast", [o], {"dtype": "float32"}, name=f"{name}_float32", meta=g.node(o).meta)
                    if g.node(o).type.dtype == dtype else o) for name, o in outputs]
    g.set_outputs(outputs)
    return g


def params_in(params, graph: Graph) -> dict:
    """``params`` in the dtypes ``graph`` stores them in (float32 weights rounded to its half type)."""
    types = graph.param_types()
    return {k: np.asarray(v).astype(numpy_dtype(types[k].dtype)) if k in types and types[k].dtype in HALF_DTYPES
            else v for k, v in params.items()}
