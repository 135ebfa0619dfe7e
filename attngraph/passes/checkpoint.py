"""Checkpointing per layer: a training step keeps each layer's input for the backward and recomputes the
rest of the layer's forward from it when the backward reaches the layer, instead of holding every
intermediate value (the projections, the attention's output, the FFN's hidden units, the dropout masks'
products) from the forward to the backward.  Time for memory, as ``torch.utils.checkpoint`` per layer.

A layer is a module scope up to its first numeric component, the ``nn.ModuleList`` convention:
``encoder.layers.3``, ``blocks.0``.  A forward value of a layer is *internal* when nothing outside the
layer's forward reads it (no other layer, no top-level op, no output); the internal values the backward
reads are recomputed: copies of them, and of the internal values they are computed from, are added and
the backward reads the copies.  The layer's boundary values (its input and output) are kept.  Dropout
draws its mask from (seed, element), so a recomputed dropout drops what the forward dropped: the
gradients are the ones without checkpointing, bit for bit.

The copies run where the backward needs them, in the order ``memory.schedule_training`` gives a training
graph at the end of every pipeline.  The pass runs after the fusions (the copies are of fused ops);
common subexpressions leave a node marked ``recompute`` alone.
"""

from __future__ import annotations

import re

from ..ir import Graph
from .memory import SOURCE_OPS, parameter_values

#: a scope's layer: up to and including its first numeric component
_LAYER = re.compile(r"^(.*?(?:^|\.)\d+)(?:\.|$)")


def layer_of(scope: str | None) -> str | None:
    """``encoder.layers.3.self_attn`` -> ``encoder.layers.3``; a scope outside any layer -> None."""
    m = _LAYER.match(scope or "")
    return m.group(1) if m else None


def checkpoint_layers(g: Graph):
    """Recompute each layer's internal values in the backward (see the module); returns (layers
    checkpointed, notes)."""
    order = g.topo_order()
    backward = {nid for nid in order if g.node(nid).meta.get("backward")}
    if not backward:
        return 0, ["no backward in this graph: nothing to recompute"]
    constant = parameter_values(g)
    layer = {}
    for nid in order:
        n = g.node(nid)
        if nid not in backward and n.op not in SOURCE_OPS and nid not in constant:
            if (key := layer_of(n.meta.get("scope"))) is not None:
                layer[nid] = key

    def internal(v: int) -> bool:
        return v in layer and not g.is_output(v) and all(u in backward or layer.get(u) == layer[v]
                                                        for u in g.users(v))

    recompute = [v for v in order if internal(v) and any(u in backward for u in g.users(v))]
    if not recompute:
        return 0, ["no layer value that only its own layer and the backward read"]
    copies: dict[int, int] = {}

    def copy(v: int) -> int:
        if v not in copies:
            n = g.node(v)
            operands = [copy(o) if internal(o) else o for o in g.operands(v)]
            copies[v] = g.add(n.op, operands, dict(n.attrs), name=f"{n.name}_re",
                              meta={**n.meta, "backward": True, "recompute": True})
        return copies[v]

    for v in recompute:
        new = copy(v)
        for user, index in g.uses(v):
            if user in backward:
                g.set_operand(user, index, new)
    return len({layer[v] for v in recompute}), []


__all__ = ["checkpoint_layers", "layer_of"]
