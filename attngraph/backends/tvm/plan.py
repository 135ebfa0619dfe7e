"""The kernel plan: which nodes of a graph run as kernels, and the distinct kernels they share.

Every node that is not a source, a view (reshape) or a weights-only value is one kernel call.  Calls
with identical (op, attributes, operand and result types) share one kernel, so the 6 (or 12) layers
of a Transformer compile a few dozen distinct kernels.  A kernel may have other forms built beside
it (``IN_PLACE``, ``FEW_ROWS``, ``ONE_ROW``), which the executor calls where they apply."""

from __future__ import annotations

import json
from typing import NamedTuple

from ...ir import Graph, TensorType
from ...ir.ops import DIM_ATTRS
from ...passes.memory import SOURCE_OPS, VIEW_OPS, weights_only
from .. import BuildError
from ...ir.serialize import canonical

#: The form of an ``update_slice`` kernel that writes only the new entries, into the cache it is
#: given as output (the executor passes the donated cache input as both).
IN_PLACE = "__inplace"
#: The form of a kernel for at most ``FEW_ROWS_MAX`` rows (``tile_rows``): a decode step's one
#: token per sequence.
FEW_ROWS, FEW_ROWS_MAX = "__few", 8
#: The form of a kernel for exactly one row: batch-1 greedy decoding, where a tile of one row reads
#: the weights once with no clamped second row (preferred over ``FEW_ROWS`` where both exist).
ONE_ROW = "__one"
FORMS = (IN_PLACE, FEW_ROWS, ONE_ROW)


class KernelSpec(NamedTuple):
    """One distinct kernel: what it computes and on which types (its dims symbolic)."""
    name: str
    op: str
    attrs: dict
    in_types: tuple
    out_type: TensorType


def tile_rows(op: str, attrs: dict, out_shape: tuple) -> int:
    """The rows a kernel tiles (and pads to whole tiles): a projection's output rows, attention's query length."""
    if op == "fused_attention":
        return int(out_shape[1] if attrs.get("layout") == "bshd" else out_shape[2])
    rows = 1
    for d in out_shape[:-1]:
        rows *= int(d)
    return rows


def kernel_nodes(g: Graph, constant: set[int] | None = None) -> list[int]:
    """The nodes of ``g`` that run as kernels, in execution order."""
    constant = weights_only(g) if constant is None else constant
    return [nid for nid in g.topo_order() if g.node(nid).op not in SOURCE_OPS + VIEW_OPS and nid not in constant]


def _dedup_key(op, attrs, in_types, out_type) -> str:
    return json.dumps([op, canonical(attrs), [str(t) for t in in_types], str(out_type)], sort_keys=True)


def plan_kernels(g: Graph) -> tuple[list[KernelSpec], dict[int, str]]:
    """(the distinct kernels of ``g``, {node id: kernel name}) for every kernel node."""
    specs: dict[str, KernelSpec] = {}
    symbol_of = {}
    for nid in kernel_nodes(g):
        n = g.node(nid)
        in_types = tuple(g.node(o).type for o in g.operands(nid))
        for key in DIM_ATTRS:
            # Symbolic sizes reach a kernel only through its buffers' shapes; a symbolic start does not.
            if key not in ("shape", "n", "stop") and isinstance(n.attrs.get(key), str):
                raise BuildError(f"cannot lower {g.describe(nid)}: a symbolic {key!r} is not supported by the TVM backend")
        key = _dedup_key(n.op, n.attrs, in_types, n.type)
        if key not in specs:
            specs[key] = KernelSpec(f"k{len(specs)}_{n.op}", n.op, dict(n.attrs), in_types, n.type)
        symbol_of[nid] = specs[key].name
    return list(specs.values()), symbol_of
