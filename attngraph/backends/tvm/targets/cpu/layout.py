"""The llvm target's layout pass: a ``linear`` (or ``matmul``) whose weight is known when the weights are
bound reads it as column panels, ``linear_packed(x, pack_panels(W; width))``.  The packing is a
weights-only value, so executors compute it once at bind time; the projection kernel then streams
each panel contiguously instead of packing it on every call (the cost that dominates when the
product has few rows, as in a decode step)."""

from __future__ import annotations

from .....ir import Graph
from .....passes.memory import weights_only
from .....passes.rewrite import only_used_by, remove_dead, replace
from . import ops  # noqa: F401  (registers pack_panels and linear_packed)
from .tiles import PANEL_WIDTH


def _static_2d(t) -> bool:
    return t.rank == 2 and all(isinstance(d, int) for d in t.shape)


def pack_weights(g: Graph, width: int = PANEL_WIDTH, dtype: str | None = None, groups: dict | None = None,
                 quantize: str | None = None, int8_group: int = ops.INT8_GROUP):
    """``linear(x, W, b)`` and ``matmul(x, W)`` with a weights-only 2-D ``W`` ->
    ``linear_packed(x, pack_panels(W), b; n=N)``, the panels stored as ``dtype`` if given (float16:
    half the bytes to read, computed in x's dtype).  ``groups``: {dtype: group} of the CPU's dot products (bfloat16:
    2); a product whose x and panels are of such a dtype gets panels of K values in groups of that many
    (``pack_panels(interleave=)``), where K divides into them.  ``quantize="int8"``: a float32 product ->
    ``linear_int8(x, quantize_panels(W), column_scales(W), b)`` instead (``ops.py``), the panels in groups of
    ``int8_group`` K values (the CPU's integer dot product's), where K divides into them.  Returns (matches, misses)
    like the other rules."""
    constant = weights_only(g)
    packed: dict[tuple, int] = {}  # (W, group) -> its panels, shared by every product reading W in that layout
    matches, misses = 0, []
    for nid in list(g.topo_order()):
        n = g.node(nid)
        if n.op not in ("linear", "matmul") or nid in constant:
            continue
        x, w, *bias = g.operands(nid)
        wt = g.node(w).type
        if w not in constant or not _static_2d(wt) or g.node(x).type.rank < 2 and n.op == "matmul":
            if n.op == "linear":
                misses.append(f"%{n.name}: its weight is not known at bind time; packed per call")
            continue
        if quantize == "int8":
            if str(g.node(x).type.dtype) == "float32" and wt.shape[0] % int8_group == 0:
                _to_int8(g, nid, x, w, bias, width, int8_group, packed)
                matches += 1
                continue
            misses.append(f"%{n.name}: not quantized (int8 takes float32 x and K a multiple of {int8_group}, got "
                          f"{g.node(x).type} and K={wt.shape[0]})")
        stored = dtype or str(wt.dtype)
        group = (groups or {}).get(stored, 1) if str(g.node(x).type.dtype) == stored else 1
        if wt.shape[0] % group:
            misses.append(f"%{n.name}: K={wt.shape[0]} is not a multiple of {group}; its {stored} product runs "
                          f"without the dot-product instruction")
            group = 1
        if (w, group) not in packed:
            packed[w, group] = g.add("pack_panels", [w], {"width": width, "dtype": dtype, "interleave": group},
                                     name=f"{g.node(w).name}_panels", meta=dict(g.node(w).meta))
        attrs = {"activation": n.attrs.get("activation", "none"), "n": wt.shape[1]}
        replace(g, nid, "linear_packed", [x, packed[w, group]] + bias, attrs)
        g.remove(nid)
        matches += 1
    return matches, misses


def _to_int8(g: Graph, nid: int, x: int, w: int, bias: list, width: int, group: int, packed: dict) -> None:
    """Node ``nid`` (x @ W [+ b]) -> ``linear_int8``, W's quantized panels (in groups of ``group`` K values) and
    scales shared by its other products."""
    if (w, "int8") not in packed:
        meta = dict(g.node(w).meta)
        packed[w, "int8"] = (g.add("quantize_panels", [w], {"width": width, "interleave": group},
                                   name=f"{g.node(w).name}_int8", meta=meta),
                             g.add("column_scales", [w], {}, name=f"{g.node(w).name}_scales", meta=meta))
    n = g.node(nid)
    attrs = {"activation": n.attrs.get("activation", "none"), "n": g.node(w).type.shape[1]}
    replace(g, nid, "linear_int8", [x, *packed[w, "int8"]] + bias, attrs)
    g.remove(nid)


#: ``fused_elementwise`` programs that are ``silu(gate) * value`` of its two operands: (program, gate's operand)
_GATED = {(("silu", (0,), ()), ("mul", (2, 1), ())): 0, (("silu", (0,), ()), ("mul", (1, 2), ())): 0,
          (("silu", (1,), ()), ("mul", (2, 0), ())): 1, (("silu", (1,), ()), ("mul", (0, 2), ())): 1}


def _gate_and_value(g: Graph, nid: int):
    """(gate, value) when node ``nid`` is ``silu(gate) * value`` (one fused elementwise kernel, or a ``mul`` of a
    ``silu`` that nothing else reads), else None."""
    n = g.node(nid)
    if n.op == "fused_elementwise" and len(g.operands(nid)) == 2:
        gate = _GATED.get(tuple((op, tuple(args), tuple(a)) for op, args, a in n.attrs["program"]))
        if gate is None:
            return None
        operands = g.operands(nid)
        return operands[gate], operands[1 - gate]
    if n.op == "mul":
        for i, s in enumerate(g.operands(nid)):
            if g.node(s).op == "silu" and only_used_by(g, s, nid):
                return g.operands(s)[0], g.operands(nid)[1 - i]
    return None


def _half_of(g: Graph, nid: int):
    """(projection, which half: 0 or 1, width) when ``nid`` is the first or second half of a packed projection's
    last axis, else None."""
    n = g.node(nid)
    if n.op != "slice" or n.attrs["axis"] not in (-1, n.type.rank - 1) or n.attrs.get("step", 1) != 1:
        return None
    (p,) = g.operands(nid)
    if g.node(p).op != "linear_packed" or g.node(p).attrs["activation"] != "none" \
            or g.node(g.operands(p)[1]).type.rank != 3:  # grouped panels (a dot-product kernel's): not gated
        return None
    both, start, stop = g.node(p).attrs["n"], n.attrs["start"], n.attrs["stop"]
    if not (isinstance(both, int) and both % 2 == 0 and stop - start == both // 2 and start in (0, both // 2)):
        return None
    return p, start // (both // 2), both // 2


def gate_projections(g: Graph, width: int = PANEL_WIDTH):
    """``silu(P[..., :n]) * P[..., n:]`` (or the gate the second half) of one packed projection ``P`` (SwiGLU's gate
    and value, merged into one projection by ``merge-projections``) -> ``swiglu_packed(x, panels; n, gate)``: the gate applied as the kernel writes
    the product back, neither half written out.  Guard: the projection and its halves read by the gate alone, and
    n a whole number of panels (the kernel keeps a gate panel and its value panel in one register tile)."""
    matches, misses = 0, []
    for nid in list(g.topo_order()):
        if nid not in g.nx:  # removed with a gate rewritten before it
            continue
        pair = _gate_and_value(g, nid)
        if pair is None:
            continue
        halves = [_half_of(g, s) for s in pair]
        name = f"%{g.node(nid).name}"
        if None in halves or halves[0][0] != halves[1][0] or halves[0][1] == halves[1][1]:
            continue  # not the two halves of one projection: another silu * x
        p, _, n = halves[0]
        if not all(only_used_by(g, s, nid) for s in pair) or sorted(u for u, _ in g.uses(p)) != sorted(pair) \
                or g.is_output(p):
            misses.append(f"{name}: the projection %{g.node(p).name} or its halves are read elsewhere (a training "
                          f"step's backward); not gated in the kernel")
            continue
        if n % width:
            misses.append(f"{name}: {n} columns are not a whole number of {width}-column panels; not gated in the "
                          f"kernel")
            continue
        replace(g, nid, "swiglu_packed", g.operands(p), {"n": n, "gate": halves[0][1]})
        matches += 1
    remove_dead(g)
    return matches, misses
