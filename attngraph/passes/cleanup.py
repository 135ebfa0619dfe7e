"""Clean-ups: dead code elimination, common subexpression elimination, constant folding."""

from __future__ import annotations

import numpy as np

from ..ir import Graph
from ..ir.types import numpy_dtype
from .rewrite import remove_dead

#: Constant folding never materializes more than this many bytes for one value (a table of
#: positions is fine; a broadcast to a huge shape is better left to the kernels).
FOLD_LIMIT_BYTES = 64 << 20


def dead_code(g: Graph):
    """Remove values no output depends on."""
    return remove_dead(g), []


def _attr_key(value):
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_attr_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _attr_key(v)) for k, v in value.items()))
    return value


def common_subexpressions(g: Graph):
    """Merge nodes that apply the same op with the same attributes to the same operands
    (``x@W`` computed twice, the positional table built for source and target)."""
    seen, merged = {}, 0
    for nid in g.topo_order():
        n = g.node(nid)
        if n.op in ("input", "param") or n.meta.get("recompute"):  # a checkpoint's copy stays a copy
            continue
        key = (n.op, _attr_key(n.attrs), tuple(g.operands(nid)))
        if key in seen and g.node(seen[key]).type == n.type:
            g.replace_all_uses(nid, seen[key])
            merged += 1
        else:
            seen[key] = nid
    remove_dead(g)
    return merged, []


def _static(value) -> bool:
    if isinstance(value, str):
        return False
    if isinstance(value, (list, tuple)):
        return all(_static(v) for v in value)
    return True


def _wide(value):
    value = np.asarray(value)
    return value.astype(np.float64) if value.dtype.kind == "f" else value


def constant_fold(g: Graph):
    """Evaluate ops whose operands are all constants (the sinusoidal table, masks from constants,
    ``1/sqrt(d)`` written as ``rsqrt(const)``), replacing each with one ``const``."""
    folded, misses = 0, []
    for nid in g.topo_order():
        n = g.node(nid)
        operands = g.operands(nid)
        if n.op in ("input", "param", "const") or not all(g.node(o).op == "const" for o in operands):
            continue
        if n.op == "arange" and not _static(n.attrs.get("n")):
            continue
        if not all(isinstance(d, int) for d in n.type.shape) or not _static(list(n.attrs.values())):
            continue
        size = int(np.prod(n.type.shape, dtype=np.int64)) * numpy_dtype(n.type.dtype).itemsize
        if size > FOLD_LIMIT_BYTES:
            misses.append(f"%{n.name}: {n.op} of constants left alone: its value would take {size} bytes")
            continue
        # Fold in float64 and keep that precision (the const's type still says its dtype).
        args = [_wide(g.node(o).attrs["value"]) for o in operands]
        value = np.asarray(n.opdef.ref(*args, **n.attrs))
        value = value.astype(np.float64 if n.type.is_float else n.type.dtype, copy=False)
        new = g.add("const", (), {"value": value, "dtype": n.type.dtype}, name=n.name + "_folded", meta=n.meta)
        g.replace_all_uses(nid, new)
        folded += 1
    remove_dead(g)
    return folded, misses


__all__ = ["dead_code", "common_subexpressions", "constant_fold"]


def fold_transposes(g: Graph):
    """Transposes of transposes: ``transpose(transpose(x))`` -> ``x`` (or one transpose with the two
    permutations composed), and ``transpose(weight_grad(x, g))`` -> ``weight_grad(g, x)`` (x^T g transposed is
    g^T x).  A derivative makes both: a tied output projection (``h @ E^T``) has ``E^T^T`` in its input
    gradient and ``(h^T g)^T`` as the table's gradient, each a full copy of the weight."""
    from .rewrite import only_used_by, replace
    matches = 0
    for nid in g.topo_order():
        if nid not in g or g.node(nid).op != "transpose":
            continue
        (src,) = g.operands(nid)
        s = g.node(src)
        perm = g.node(nid).attrs["perm"]
        if s.op == "transpose":
            composed = tuple(s.attrs["perm"][p] for p in perm)
            if composed == tuple(range(len(composed))):
                g.replace_all_uses(nid, g.operands(src)[0])
            else:
                replace(g, nid, "transpose", [g.operands(src)[0]], {"perm": composed})
            matches += 1
        elif s.op == "weight_grad" and perm == (1, 0) and only_used_by(g, src, nid):
            x, cot = g.operands(src)
            replace(g, nid, "weight_grad", [cot, x], {})
            matches += 1
    remove_dead(g)
    return matches, []
