"""The metadata a graph and its nodes may carry: every key written down once, with its type, who writes it
and who reads it, and checked when a graph is validated (``Graph.validate``).

Metadata never changes what a graph computes (the op, its operands and attributes do); it says where a node
came from, how to make example inputs, and what the backward and the memory planner may assume.  A frontend
(the tracer today, torch.export next) writes what it knows; every key is optional.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Key:
    """One metadata key: the Python types its value may have, and what it means (writer -> readers)."""
    types: tuple
    meaning: str


_INT = (int,)
_STR = (str,)
_FLAG = (bool,)

#: Keys of ``Node.meta``.
NODE = {
    "loc": Key(_STR, "the user's source line that made the node, 'file.py:12' (tracer -> error messages)"),
    "scope": Key(_STR, "the module path the node was made in, 'encoder.layers.0.self_attn' (tracer -> "
                       "error messages, the printer, checkpoint-layers' grouping by layer)"),
    "init": Key((tuple, list), "a parameter's initializer and its arguments, ('xavier_uniform',), ('normal', 0.02) "
                               "(tracer -> init_params)"),
    "buffer": Key(_STR, "the name a constant was registered under (Module.register_buffer) (tracer -> printer)"),
    "low": Key(_INT, "an integer input's smallest valid value (InputSpec) (tracer -> example inputs)"),
    "high": Key((int, str), "an integer input's bound, one past its largest valid value: a number, or a dim "
                            "expression, 'cache - step + 1' (tracer -> example inputs)"),
    "kind": Key(_STR, "what an input holds: 'tokens', 'position', 'padding_mask', 'attention_mask', "
                      "'indices', 'seed' (tracer -> example inputs, tools)"),
    "nonnegative": Key(_FLAG, "an input whose values are never negative: an optimizer's second moment "
                              "(training_graph -> example inputs)"),
    "param": Key(_FLAG, "an input that was a parameter (Graph.param_to_input) (-> memory planner: "
                        "computed once where its value is bound)"),
    "backward": Key(_FLAG, "a node of the backward pass (autodiff -> schedule-training, memory planner, "
                           "checkpoint-layers)"),
    "recompute": Key(_FLAG, "a forward value recomputed in the backward (checkpoint-layers -> cse, which "
                            "must not merge it back into the forward's)"),
}

#: Keys of ``Graph.meta``.
GRAPH = {
    "dims": Key((dict,), "the default size of each symbolic dim, {'batch': 2, 'seq': 16} (tracer, from "
                         "Module.default_dims -> example inputs, verify, memory plans)"),
    "state_inputs": Key((list, tuple), "the inputs a model hands back to itself (a decoder's caches), stored in "
                                       "the half type by to_dtype (trace_entries -> passes.precision)"),
}


def problems(graph) -> list[str]:
    """What in ``graph``'s metadata is not in the schema above, or has a value of another type."""
    out = []

    def check(where: str, meta: dict, schema: dict) -> None:
        for key, value in meta.items():
            if key not in schema:
                out.append(f"{where}: metadata key {key!r} is not in attngraph.ir.meta (known: {', '.join(schema)})")
            elif not isinstance(value, schema[key].types) or isinstance(value, bool) and bool not in schema[key].types:
                out.append(f"{where}: metadata {key!r} is {value!r}, expected "
                           f"{' or '.join(t.__name__ for t in schema[key].types)}")

    check(f"graph {graph.name!r}", graph.meta, GRAPH)
    for nid in graph.nx.nodes:  # in any order: a graph with a cycle has no topological one
        n = graph.node(nid)
        check(f"%{n.name}", n.meta, NODE)
    return out


__all__ = ["GRAPH", "Key", "NODE", "problems"]
