"""Fusions, written as rewrite rules anchored on the last op of each pattern.

Each rule matches its pattern (``rewrite.Pat``) from the anchor up through the operands, checks its
guard (every value it would swallow has no other use), rewrites, and returns ``(matches,
near_misses)``: a near miss names the node and why it was left alone, so a pattern that fails to
match is never silent.
"""

from __future__ import annotations

import math

import numpy as np

from ..ir import Graph
from .memory import weights_only
from ..ir.fused import elementwise_step_ok
from ..ir.ops import ShapeError
from .rewrite import (Pat, anchors, first_match, is_scalar_const, only_used_by, remove_dead, replace, scalar_const,
                      type_of, used_exactly_by)

NEG_INF = float("-inf")
SWAP_LAST = (0, 1, 3, 2)
HEADS = (0, 2, 1, 3)


def _last_axis(g: Graph, nid: int) -> bool:
    n = g.node(nid)
    return n.attrs["axis"] in (-1, n.type.rank - 1)


def _reduced_last_axis(g: Graph, nid: int) -> bool:
    """A reduction over the last axis alone, keeping it as size 1."""
    n = g.node(nid)
    return tuple(a % n.type.rank for a in n.attrs["axes"]) == (n.type.rank - 1,) and n.attrs["keepdims"]


# x * c, c * x, x / c (c a scalar constant)
SCALED = (Pat("mul", Pat(name="x"), Pat("const", name="c", where=is_scalar_const), commutative=True),
          Pat("div", Pat(name="x"), Pat("const", name="c", where=is_scalar_const)))


def _scale_of(g: Graph, nid: int):
    """(x, factor) when ``nid`` is ``x * c``, ``c * x`` or ``x / c`` with a scalar constant c; else None."""
    m = first_match(g, nid, *SCALED)
    if m is None or g.node(m["x"]).type != g.node(nid).type:  # a constant that broadcasts x is not a scale
        return None
    c = scalar_const(g, m["c"])
    if g.node(nid).op == "div":
        return (m["x"], 1.0 / c) if c else None
    return m["x"], c


# -- softmax written by hand --------------------------------------------------------------------

_EXP_SHIFTED = Pat("exp", Pat("sub", Pat(name="x"), Pat("reduce_max", Pat(name="x"), name="max",
                                                        where=_reduced_last_axis), name="shifted"), name="e")
_EXP = Pat("exp", Pat(name="x"), name="e")
# exp(x - max(x)) / sum(exp(...)): softmax's own definition
HAND_SOFTMAX = Pat("div", _EXP_SHIFTED, Pat("reduce_sum", _EXP_SHIFTED, name="sum", where=_reduced_last_axis))
# exp(x) / sum(exp(x)): another function where every exp of a row underflows (a row masked with finfo.min: 0 / 0,
# NaN) or one overflows (inf / inf), so not rewritten
UNSHIFTED_SOFTMAX = Pat("div", _EXP, Pat("reduce_sum", _EXP, name="sum", where=_reduced_last_axis))
# exp(log_softmax(x))
EXP_LOG_SOFTMAX = Pat("exp", Pat("log_softmax", Pat(name="x"), name="ls", where=_last_axis))


def softmax_by_hand(g: Graph):
    """``exp(x - max(x)) / sum(exp(x - max(x)))`` and ``exp(log_softmax(x))``, over the last axis ->
    ``softmax(x)``, so that the fusions after it see one softmax.  Both mean what softmax means for every
    input (a row of -inf: NaN).  ``exp(x) / sum(exp(x))`` does not (a row whose every exp underflows, as one
    masked with finfo.min, is 0 / 0 there and a uniform row in softmax): kept as written, a near miss."""
    matches, misses = 0, []
    for nid, n in anchors(g, "div", "exp"):
        m = HAND_SOFTMAX.match(g, nid) if n.op == "div" else EXP_LOG_SOFTMAX.match(g, nid)
        if m is None:
            if n.op == "div" and UNSHIFTED_SOFTMAX.match(g, nid) is not None:
                misses.append(f"%{n.name}: exp(x) / sum(exp(x)) without the row max is not softmax where a row's "
                              f"exps all underflow (a row masked with finfo.min: NaN) or one overflows; kept as "
                              f"written (subtract x.max(-1, keepdim=True) first, or call softmax, to fuse it)")
            continue
        # every value the pattern swallows is used by the pattern alone
        expected = {"e": [nid, m.get("sum")], "sum": [nid], "shifted": [m.get("e")], "max": [m.get("shifted")],
                    "ls": [nid]}
        shared = [m[k] for k, users in expected.items() if k in m and not used_exactly_by(g, m[k], users)]
        if shared:
            misses.append(f"%{n.name}: a softmax written by hand, but %{g.node(shared[0]).name} is also used "
                          f"elsewhere; not fused")
            continue
        replace(g, nid, "softmax", [m["x"]], {"axis": -1})
        matches += 1
    remove_dead(g)
    return matches, misses


# -- RMSNorm written by hand ------------------------------------------------------------------------

# x * rsqrt(mean(x * x, -1, keepdim) + eps), times a weight (LLaMA's RMSNorm, Hugging Face's LlamaRMSNorm)
_RMS_NORMED = Pat("mul", Pat(name="x"), Pat("rsqrt", Pat(
    "add", Pat("reduce_mean", Pat("mul", Pat(name="x"), Pat(name="x"), name="square"), name="mean",
               where=_reduced_last_axis), Pat("const", name="eps", where=is_scalar_const),
    name="shifted", commutative=True), name="root"), name="normed", commutative=True)
HAND_RMS_NORM = Pat("mul", _RMS_NORMED, Pat(name="w"), commutative=True)


def rms_norm_by_hand(g: Graph):
    """``x * rsqrt(mean(x * x over the last axis) + eps) * w`` (w of the last axis' size) -> ``rms_norm(x, w)``,
    so the residual fusion and the norm kernels see it.  Returns (matches, misses)."""
    matches, misses = 0, []
    for nid, n in anchors(g, "mul"):
        m = HAND_RMS_NORM.match(g, nid)
        if m is None or m["w"] == m["normed"]:
            continue
        x, w = g.node(m["x"]).type, g.node(m["w"]).type
        if w.rank != 1 or w.shape[0] != x.shape[-1] or n.type != x or w.dtype != x.dtype:
            continue
        expected = {"normed": [nid], "root": [m["normed"]], "shifted": [m["root"]], "mean": [m["shifted"]],
                    "square": [m["mean"]]}
        shared = [m[k] for k, users in expected.items() if not used_exactly_by(g, m[k], users)]
        if shared:
            misses.append(f"%{n.name}: an RMSNorm written by hand, but %{g.node(shared[0]).name} is also used "
                          f"elsewhere; not fused")
            continue
        replace(g, nid, "rms_norm", [m["x"], m["w"]], {"eps": float(scalar_const(g, m["eps"]))})
        matches += 1
    remove_dead(g)
    return matches, misses


# -- scale and masks into one softmax ------------------------------------------------------------

def _fill(g: Graph, nid: int):
    """The fill value of a mask branch: a scalar constant, -inf or a finite number; else None."""
    value = scalar_const(g, nid)
    return value if value is not None and not math.isnan(value) and value != math.inf else None


def _peel_masks(g: Graph, nid: int, anchor: int):
    """Walk from a softmax operand through its masks, outermost first.

    ``where(m, s, fill)`` is a keep mask, ``where(m, fill, s)`` a drop mask (fill -inf, or a large
    negative number: ``masked_fill(pad, -1e9)``), ``s + m`` (m not on the score chain) an additive one.
    Returns (the scores below the masks, [(kind, mask, fill)] in application order, the swallowed
    nodes, a reason if a mask value is shared)."""
    masks, swallowed, user = [], [], anchor
    while True:
        n = g.node(nid)
        if n.op == "where":
            cond, a, b = g.operands(nid)
            if _fill(g, b) is not None:
                kind, mask, inner, fill = "keep", cond, a, _fill(g, b)
            elif _fill(g, a) is not None:
                kind, mask, inner, fill = "drop", cond, b, _fill(g, a)
            else:
                break
            if g.node(inner).type != n.type:  # the mask broadcasts the scores to more: not a mask of them
                break
        elif n.op == "add" and n.type.is_float:
            a, b = g.operands(nid)
            # The scores are the operand that carries the full shape and comes from the product.
            if g.node(a).op in ("matmul", "mul", "div", "where", "add") and g.node(a).type == n.type:
                inner, mask = a, b
            elif g.node(b).type == n.type:
                inner, mask = b, a
            else:
                break
            kind, fill = "additive", 0.0
        else:
            break
        if not only_used_by(g, nid, user):
            return nid, masks[::-1], swallowed, f"%{n.name} ({n.op}) is also used elsewhere"
        masks.append((kind, mask, fill))
        swallowed.append(nid)
        user, nid = nid, inner
    return nid, masks[::-1], swallowed, None


def _pre_scale(g: Graph, product: int):
    """(operand index, a function making the operand without its scale, factor) when the product's Q is
    ``q * c`` or its K^T is ``k^T * c`` or ``(k * c)^T``, the scaled value used by the product alone; else None."""
    q, kt = g.operands(product)
    for i, side in enumerate((q, kt)):
        scaled = _scale_of(g, side)
        if scaled and only_used_by(g, side, product):
            return i, lambda x=scaled[0]: x, scaled[1]
    perm = _perm(g, kt)
    if perm is not None and only_used_by(g, kt, product):
        (inner,) = g.operands(kt)
        scaled = _scale_of(g, inner)
        if scaled and only_used_by(g, inner, kt):
            meta = g.node(kt).meta
            return 1, lambda: g.add("transpose", [scaled[0]], {"perm": perm}, name="kt", meta=meta), scaled[1]
    return None


def _temperature(g: Graph, nid: int):
    """(product, t, op) when ``nid`` is ``product * t`` or ``product / t`` with ``product`` a matmul and
    ``t`` a float tensor that is not a scalar constant and is constant along the keys (its last axis,
    aligned with the scores', is 1): a learned temperature, which can move onto Q."""
    n = g.node(nid)
    if n.op not in ("mul", "div"):
        return None
    a, b = g.operands(nid)
    for product, t in ((a, b), (b, a)) if n.op == "mul" else ((a, b),):
        tt = g.node(t).type
        if g.node(product).op == "matmul" and g.node(product).type == n.type and tt.is_float \
                and not is_scalar_const(g, t) and (tt.rank == 0 or tt.shape[-1] == 1):
            return product, t, n.op
    return None


def softmax_scaling(g: Graph):
    """``softmax(masks((Q @ K^T) * s))`` -> ``scaled_masked_softmax(Q @ K^T, masks; scale=s)``.

    Matches ``mul(x, 1/sqrt(d))``, ``div(x, sqrt(d))``, the scale on Q or on K (before or after its
    transpose), additive / keep / drop masks with -inf or a large negative fill (causal masks are
    keep masks), or none.  A scale that is a tensor (a learned temperature) moves onto Q."""
    matches, misses = 0, []
    for nid, n in anchors(g, "softmax"):
        if not _last_axis(g, nid):
            misses.append(f"%{n.name}: softmax over axis {n.attrs['axis']}, not the last")
            continue
        (x,) = g.operands(nid)
        scores, masks, swallowed, shared = _peel_masks(g, x, nid)
        if shared:
            misses.append(f"%{n.name}: {shared}")
            continue
        user = swallowed[-1] if swallowed else nid  # the node that reads the scores
        scale, scaled = 1.0, _scale_of(g, scores)
        if scaled and only_used_by(g, scores, user):
            user, (scores, scale) = scores, scaled
        temp = _temperature(g, scores)
        if temp is not None and only_used_by(g, scores, user) and only_used_by(g, temp[0], scores):
            product, t, op = temp
            q, kt = g.operands(product)
            try:  # t must not broadcast Q past the scores' own batch
                fits = type_of(g, "matmul", [type_of(g, op, [q, t]), kt]) == g.node(scores).type
            except ShapeError:
                fits = False
            if fits:
                qt = g.add(op, [q, t], name="q_tempered", meta=g.node(product).meta)
                scores = replace(g, scores, "matmul", [qt, kt], {}, g.node(product).meta)
        core = g.node(scores)
        if core.op == "matmul":
            pre = _pre_scale(g, scores)
            if pre is not None and not only_used_by(g, scores, user):
                misses.append(f"%{n.name}: the scores %{core.name} are also used elsewhere, so the scale written "
                              f"on {'QK'[pre[0]]} stays there")
            elif pre is not None:
                side, unscaled, factor = pre
                operands = g.operands(scores)
                operands[side] = unscaled()
                scale *= factor
                scores = replace(g, scores, "matmul", operands, {}, core.meta)
            d = g.node(g.operands(scores)[0]).type.shape[-1]
            if isinstance(d, int) and not math.isclose(scale, 1 / math.sqrt(d), rel_tol=1e-6) and scale != 1.0:
                misses.append(f"%{n.name}: fused, but the scale {scale:.6g} is not 1/sqrt(d_k) = "
                              f"{1 / math.sqrt(d):.6g} (d_k = {d}); kept as written")
        if scale == 1.0 and not masks:
            continue
        attrs = {"scale": float(scale), "mask_kinds": tuple(k for k, _, _ in masks)}
        if any(fill != NEG_INF for kind, _, fill in masks if kind != "additive"):
            attrs["mask_fills"] = tuple(float(f) for _, _, f in masks)
        replace(g, nid, "scaled_masked_softmax", [scores] + [m for _, m, _ in masks], attrs)
        matches += 1
    remove_dead(g)
    return matches, misses


# -- the whole attention -------------------------------------------------------------------------

def _perm(g: Graph, nid: int) -> tuple | None:
    n = g.node(nid)
    return tuple(n.attrs["perm"]) if n.op == "transpose" else None


def _source(g: Graph, nid: int, swap: bool = False) -> tuple[int, tuple]:
    """(X, p) with the bhsd operand equal to ``transpose(X, p)``, X the node under any chain of
    transposes (p the identity when nid is X itself).  ``swap``: nid is K^T, and (X, p) describe K."""
    p = tuple(range(g.node(nid).type.rank))
    while _perm(g, nid) is not None:  # transpose(transpose(X, a), b) = transpose(X, a[b])
        p = tuple(_perm(g, nid)[i] for i in p)
        nid = g.operands(nid)[0]
    if swap:
        p = p[:-2] + (p[-1], p[-2])
    return nid, p


def _bhsd(g: Graph, x: int, p: tuple, meta) -> int:
    """The node ``transpose(x, p)`` (x itself for the identity; an existing node where there is one)."""
    if p == tuple(range(len(p))):
        return x
    for u in g.users(x):
        if _perm(g, u) == p:
            return u
    return g.add("transpose", [x], {"perm": p}, name="bhsd", meta=meta)


def _view(g: Graph, x: int, shape, meta) -> int:
    """``x`` viewed with ``shape`` (a reshape: no copy); a reshape of a reshape reads the original."""
    if g.node(x).op == "reshape":
        x = g.operands(x)[0]
    return g.add("reshape", [x], {"shape": tuple(shape)}, name="view", meta=meta)


def _as_bshd(g: Graph, x: int, p: tuple, meta) -> int | None:
    """The (batch, seq, heads, dim) form of the bhsd operand ``transpose(x, p)``, without a copy: x itself
    when it was split into heads by ``transpose(0, 2, 1, 3)``, a view when it has one head; else None."""
    if p == HEADS:
        return x
    t = g.node(x).type
    if p == (0, 1, 2, 3) and t.shape[1] == 1:
        return _view(g, x, (t.shape[0], t.shape[2], 1, t.shape[3]), meta)
    return None


def attention(g: Graph):
    """``softmax(masks(Q @ K^T * s)) @ V`` (as ``scaled_masked_softmax`` or a plain softmax) ->
    ``fused_attention(Q, K, V, masks)``.  Batch and head axes may broadcast (multi-query attention's
    one key head, learned queries).  When Q, K and V come from the head split (``reshape ->
    transpose(0,2,1,3)``, or have one head) and the result goes back through ``transpose(0,2,1,3)``, the
    transposes are absorbed: the attention reads and writes the projections' (batch, seq, heads, dim)
    layout directly (``layout='bshd'``).  The 3-D form (batch*heads, seq, dim) of fairseq's batched
    products is the same attention with one head."""
    matches, misses = 0, []
    for nid, n in anchors(g, "matmul"):
        p, v = g.operands(nid)
        probs = g.node(p)
        if not (probs.op == "scaled_masked_softmax" or probs.op == "softmax" and _last_axis(g, p)):
            continue
        if n.type.rank not in (3, 4):
            misses.append(f"%{n.name}: attention of rank {n.type.rank}; fused for rank 4 (batch, heads, seq, dim) "
                          f"and 3 (batch*heads, seq, dim)")
            continue
        scores, *masks = g.operands(p)
        if not only_used_by(g, p, nid) or not only_used_by(g, scores, p):
            misses.append(f"%{n.name}: attention probabilities or scores used elsewhere; not fused")
            continue
        if g.node(scores).op != "matmul":
            misses.append(f"%{n.name}: scores are not a matmul ({g.node(scores).op})")
            continue
        q, kt = g.operands(scores)
        rank = n.type.rank
        if {g.node(t).type.rank for t in (q, kt, v)} != {rank}:
            misses.append(f"%{n.name}: q, k and v have ranks {[g.node(t).type.rank for t in (q, kt, v)]}; fused "
                          f"when all are {rank}")
            continue
        attrs = {"scale": float(probs.attrs.get("scale", 1.0)), "mask_kinds": tuple(probs.attrs.get("mask_kinds", ())),
                 "layout": "bhsd"}
        if probs.attrs.get("mask_fills"):
            attrs["mask_fills"] = tuple(probs.attrs["mask_fills"])
        sources = [_source(g, q), _source(g, kt, swap=True), _source(g, v)]
        if rank == 3:  # (batch*heads, seq, dim): viewed as one head; 3-D masks gain the head axis
            views = []
            for x, p_ in sources:
                t = _bhsd(g, x, p_, n.meta)
                views.append(_view(g, t, _one_head(g.node(t).type.shape), n.meta))
            masks = [_view(g, m, _one_head(g.node(m).type.shape), n.meta) if g.node(m).type.rank == 3 else m
                     for m in masks]
            fused = g.add("fused_attention", views + masks, attrs, name="fused_attention", meta=n.meta)
            replace(g, nid, "reshape", [fused], {"shape": n.type.shape}, n.meta)
            matches += 1
            remove_dead(g)
            continue
        last, perm = _transposes_after(g, nid)
        back = perm == HEADS
        bshd = [_as_bshd(g, x, p_, n.meta) for x, p_ in sources] if back else None
        if back and None not in bshd:
            attrs["layout"] = "bshd"
            replace(g, last, "fused_attention", bshd + masks, attrs, n.meta)
        else:
            if back or any(p_ == HEADS for _, p_ in sources):
                misses.append(f"%{n.name}: fused in head-major layout: "
                              + ("q, k or v is not split into heads by transpose(0,2,1,3)" if back else
                                 "the output is not transposed back by a single transpose(0,2,1,3)"))
            operands = [_bhsd(g, x, p_, n.meta) for x, p_ in sources]
            replace(g, nid, "fused_attention", operands + masks, attrs)
        matches += 1
        remove_dead(g)
    return matches, misses


def _transposes_after(g: Graph, nid: int) -> tuple[int, tuple | None]:
    """(the last node, the composed permutation) of the chain of transposes that alone read ``nid`` and
    each other; (nid, None) where none does."""
    last, perm = nid, None
    while True:
        users = g.users(last)
        if len(users) != 1 or _perm(g, users[0]) is None or not only_used_by(g, last, users[0]):
            return last, perm
        step = _perm(g, users[0])
        perm = step if perm is None else tuple(perm[i] for i in step)
        last = users[0]


def _one_head(shape) -> tuple:
    """A 3-D (batch*heads, seq, dim) shape as 4-D with one head: (batch*heads, 1, seq, dim)."""
    return (shape[0], 1) + tuple(shape[1:])


# -- projections ---------------------------------------------------------------------------------

def linear_epilogue(g: Graph):
    """``act(x @ W + b)`` with a 2-D weight -> ``linear(x, W, b; activation)``; a projection without a
    bias (``x @ W``, W a weight: LLaMA, T5, ViTs) becomes ``linear(x, W)`` too, so that the rules on
    projections (folding the softmax scale, merging Q/K/V) see it."""
    matches, misses = 0, []
    constant = weights_only(g)
    for nid, n in anchors(g, "matmul"):
        x, w = g.operands(nid)
        wt = g.node(w).type
        if wt.rank != 2 or n.type.rank < 2:
            continue
        adds = [u for u in g.users(nid) if g.node(u).op == "add"]
        bias = None
        for add in adds:
            a, b = g.operands(add)
            other = b if a == nid else a
            if g.node(other).type.shape == (wt.shape[1],) and other != nid:
                bias = (add, other)
                break
        if bias is not None and not only_used_by(g, nid, bias[0]):
            misses.append(f"%{g.node(bias[0]).name}: the product %{n.name} is used elsewhere; bias not fused")
            bias = None
        if bias is None and w not in constant:
            continue
        activation, anchor = "none", bias[0] if bias else nid
        users = g.users(anchor)
        if len(users) == 1 and only_used_by(g, anchor, users[0]):
            u = g.node(users[0])
            if u.op == "relu":
                activation, anchor = "relu", users[0]
            elif u.op == "gelu":
                activation, anchor = ("gelu_tanh" if u.attrs["approximate"] == "tanh" else "gelu"), users[0]
        replace(g, anchor, "linear", [x, w] + ([bias[1]] if bias else []), {"activation": activation}, n.meta)
        matches += 1
    remove_dead(g)
    return matches, misses


#: norm -> its form with the residual add folded in (operands: a, b, then the norm's own)
RESIDUAL_NORMS = {"layer_norm": "add_layer_norm", "rms_norm": "add_rms_norm"}


def residual_layer_norm(g: Graph):
    """``layer_norm(a + b)`` -> ``add_layer_norm(a, b)`` (and ``rms_norm(a + b)`` -> ``add_rms_norm``) when the
    sum has no other use."""
    matches, misses = 0, []
    for nid, n in anchors(g, *RESIDUAL_NORMS):
        s, *weights = g.operands(nid)
        if g.node(s).op != "add":
            continue
        a, b = g.operands(s)
        if g.node(a).type != g.node(s).type:
            a, b = b, a
        if g.node(a).type != g.node(s).type:
            continue
        if not only_used_by(g, s, nid):
            misses.append(f"%{n.name}: the residual sum %{g.node(s).name} is used elsewhere (pre-LN); not fused")
            continue
        replace(g, nid, RESIDUAL_NORMS[n.op], [a, b, *weights], {"eps": n.attrs["eps"]})
        matches += 1
    remove_dead(g)
    return matches, misses


def _projection_of(g: Graph, nid: int) -> int:
    """The node under a reshape view (the projection an attention operand reads), or nid itself."""
    return g.operands(nid)[0] if g.node(nid).op == "reshape" else nid


def fold_scale_into_q(g: Graph):
    """``fused_attention(reshape(linear(x, Wq, bq)), ...; scale=s)`` -> the same with ``Wq*s, bq*s``
    and scale 1: the softmax scale costs nothing at run time (``Wq*s`` is weights-only)."""
    matches, misses = 0, []
    constant = weights_only(g)
    for nid, n in anchors(g, "fused_attention"):
        if n.attrs["scale"] == 1.0:
            continue
        q, k, v = g.operands(nid)[:3]
        proj = _projection_of(g, q)
        pn = g.node(proj)
        if pn.op != "linear":
            misses.append(f"%{n.name}: Q is not read from a projection (it is %{pn.name}, {pn.op}); scale kept in "
                          f"the kernel")
            continue
        if pn.attrs["activation"] != "none":
            misses.append(f"%{n.name}: the Q projection %{pn.name} has an activation; scale kept in the kernel")
            continue
        if proj in (_projection_of(g, k), _projection_of(g, v)) or q in (k, v):
            misses.append(f"%{n.name}: the Q projection %{pn.name} also gives this attention's K or V (a shared "
                          f"projection); scale kept in the kernel")
            continue
        if not (only_used_by(g, q, nid) and (proj == q or only_used_by(g, proj, q))):
            misses.append(f"%{n.name}: the Q projection %{pn.name} is also used elsewhere; scale kept in the kernel")
            continue
        if not all(w in constant for w in g.operands(proj)[1:]):
            misses.append(f"%{n.name}: the Q projection's weights are not parameters; scale kept in the kernel")
            continue
        scale = g.add("const", (), {"value": np.asarray(n.attrs["scale"], dtype=np.float64),
                                    "dtype": pn.type.dtype}, name="q_scale", meta=pn.meta)
        for i, w in enumerate(g.operands(proj)[1:], start=1):
            g.set_operand(proj, i, g.add("mul", [w, scale], name="scaled_weight", meta=pn.meta))
        n.attrs["scale"] = 1.0
        matches += 1
    return matches, misses


def broadcast_heads(g: Graph):
    """A fused attention's K or V that only repeats another value's heads (or batch) -> that value, read in place
    through the attention's broadcast: ``repeat_kv`` / ``repeat_interleave(n, dim=heads)`` of grouped-query
    attention (``reshape(expand(x[:, :, None]))``: query head j reads head j // n), and ``expand`` of a one-head
    K (multi-query) or of a batch of one.  No copy of the repeated heads is made."""
    matches, misses = 0, []
    for nid, n in anchors(g, "fused_attention"):
        if n.attrs.get("heads"):
            continue
        head_axis = 2 if n.attrs["layout"] == "bshd" else 1
        for i in (1, 2):
            operand = g.operands(nid)[i]
            source = _repeated_heads(g, operand, head_axis)
            if source is not None:
                g.set_operand(nid, i, source)
                matches += 1
    remove_dead(g)
    return matches, misses


def _repeated_heads(g: Graph, nid: int, head_axis: int) -> int | None:
    """The value whose heads ``nid`` (rank 4) repeats, read by an attention as it is: ``x`` of
    ``reshape(broadcast_to(x'; heads, n), heads * n)`` with ``x'`` = x with a unit axis after the heads, or of
    ``broadcast_to(x)`` along size-1 batch and head axes; else None."""
    n = g.node(nid)
    if n.type.rank != 4:
        return None
    if n.op == "broadcast_to":
        (x,) = g.operands(nid)
        xt = g.node(x).type
        if xt.rank == 4 and all(a == b or (a == 1 and axis in (0, head_axis))
                                for axis, (a, b) in enumerate(zip(xt.shape, n.type.shape))):
            return x
        return None
    if n.op != "reshape" or g.node(g.operands(nid)[0]).op != "broadcast_to":
        return None
    (wide,) = g.operands(nid)
    (unit,) = g.operands(wide)
    shape, wide_shape, unit_shape = n.type.shape, g.node(wide).type.shape, g.node(unit).type.shape
    heads = shape[head_axis]
    if len(wide_shape) != 5 or not isinstance(heads, int):
        return None
    kv, group = wide_shape[head_axis], wide_shape[head_axis + 1]
    split = shape[:head_axis] + (kv, group) + shape[head_axis + 1:]
    if not (isinstance(kv, int) and isinstance(group, int) and kv * group == heads and tuple(wide_shape) == split
            and tuple(unit_shape) == split[:head_axis + 1] + (1,) + split[head_axis + 2:]):
        return None
    kv_shape = shape[:head_axis] + (kv,) + shape[head_axis + 1:]
    if g.node(unit).op == "reshape" and g.node(g.operands(unit)[0]).type.shape == kv_shape:
        return g.operands(unit)[0]
    return g.add("reshape", [unit], {"shape": kv_shape}, name="kv_heads", meta=dict(g.node(unit).meta))


def merge_projections(g: Graph):
    """Linear projections of one input whose weights are known when the weights are bound (Q, K and V
    of self-attention; K and V of the encoder memory in cross-attention, of every decoder layer) -> one
    ``linear`` over the concatenated weights, whose result is sliced per projection along the last
    axis.  Projections with the same activation and both with or both without a bias merge."""
    matches, misses = 0, []
    constant = weights_only(g)
    by_input: dict[int, list[int]] = {}
    for nid, n in anchors(g, "linear"):
        by_input.setdefault(g.operands(nid)[0], []).append(nid)
    for x, members in by_input.items():
        if len(members) < 2:
            continue
        groups: dict[tuple, list[int]] = {}
        for m in members:
            mn = g.node(m)
            if not all(w in constant for w in g.operands(m)[1:]):
                misses.append(f"%{mn.name}: projects %{g.node(x).name} as others do, but its weights are not known "
                              f"when the weights are bound; not merged")
                continue
            groups.setdefault((mn.attrs["activation"], len(g.operands(m)), mn.type.dtype), []).append(m)
        if len(groups) > 1:
            kinds = ", ".join(f"{len(ms)} with activation {a} {'and' if n == 3 else 'without'} a bias"
                              for (a, n, _), ms in groups.items())
            misses.append(f"%{g.node(x).name}: its projections differ ({kinds}); merged within each kind")
        for (activation, arity, _), group in groups.items():
            if len(group) < 2:
                continue
            _merge(g, x, group, activation, arity == 3)
            matches += 1
    remove_dead(g)
    return matches, misses


def _merge(g: Graph, x: int, members: list[int], activation: str, bias: bool) -> None:
    meta = dict(g.node(members[0]).meta)
    w = g.add("concat", [g.operands(m)[1] for m in members], {"axis": 1}, name="merged_weight", meta=meta)
    operands = [x, w]
    if bias:
        operands.append(g.add("concat", [g.operands(m)[2] for m in members], {"axis": 0}, name="merged_bias",
                              meta=meta))
    merged = g.add("linear", operands, {"activation": activation}, name="merged_linear", meta=meta)
    start = 0
    for m in members:
        width = g.node(m).type.shape[-1]
        part = g.add("slice", [merged], {"axis": -1, "start": start, "stop": start + width},
                     name="projection", meta=g.node(m).meta)
        g.replace_all_uses(m, part)
        start += width


# -- the loss on log-probabilities ---------------------------------------------------------------

def loss_of_log_softmax(g: Graph):
    """``cross_entropy(log_softmax(x), log_probs=True)`` (through a reshape or not: a model's log-probs flattened
    for the loss) -> ``cross_entropy(x)``: the loss's row pass normalizes the logits itself, so the
    vocabulary-wide log-softmax is neither computed nor differentiated (its backward becomes the loss's
    ``softmax - target``) when nothing else reads it."""
    matches, misses = 0, []
    for nid, n in anchors(g, "cross_entropy"):
        if not n.attrs["log_probs"]:
            continue
        x, target = g.operands(nid)
        view = x if g.node(x).op == "reshape" else None
        ls = g.operands(view)[0] if view is not None else x
        if g.node(ls).op != "log_softmax" or not _last_axis(g, ls):
            continue
        chain = [(view, nid), (ls, view)] if view is not None else [(ls, nid)]
        if not all(only_used_by(g, v, u) for v, u in chain):
            misses.append(f"%{n.name}: the loss reads %{g.node(ls).name}, which is also used elsewhere (or an output); "
                          f"the log-softmax stays")
            continue
        logits = g.operands(ls)[0]
        if view is not None:
            logits = g.add("reshape", [logits], dict(g.node(view).attrs), name="reshape", meta=g.node(view).meta)
        replace(g, nid, "cross_entropy", [logits, target], {**n.attrs, "log_probs": False})
        matches += 1
    remove_dead(g)
    return matches, misses


# -- the cotangent of a value read in slices -------------------------------------------------------

def _zeros(g: Graph, nid: int) -> bool:
    """``broadcast_like(0, x)``: zeros shaped as x."""
    n = g.node(nid)
    return n.op == "broadcast_like" and scalar_const(g, g.operands(nid)[0]) == 0.0


def slice_grads_to_concat(g: Graph):
    """``update_slice(zeros, c1, o1) + update_slice(zeros, c2, o2) + ...`` -> ``concat(c1, c2, ...)`` when the
    slices tile the axis: the cotangent of a value read in slices (a merged Q/K/V projection's output, read
    as q, k and v), which the slice's derivative writes into zeros, one copy of the whole per slice."""
    matches, misses = 0, []
    for nid in reversed(g.topo_order()):
        if nid not in g or g.node(nid).op != "add":
            continue
        if any(g.node(u).op == "add" and only_used_by(g, nid, u) for u in g.users(nid)):
            continue  # an inner add of a sum: its root takes it
        leaves, stack, inner = [], [nid], []
        while stack:
            a = stack.pop()
            for o in g.operands(a):
                if g.node(o).op == "add" and only_used_by(g, o, a) and g.node(o).type == g.node(nid).type:
                    stack.append(o)
                    inner.append(o)
                else:
                    leaves.append(o)
        writes = [w for w in leaves if g.node(w).op == "update_slice" and _zeros(g, g.operands(w)[0])]
        if len(writes) != len(leaves) or len({g.node(w).attrs["axis"] for w in writes}) != 1:
            continue
        axis = g.node(writes[0]).attrs["axis"] % g.node(nid).type.rank
        offsets = [scalar_const(g, g.operands(w)[2]) for w in writes]
        if any(o is None for o in offsets) or any(len(g.users(w)) != 1 or not only_used_by(g, w, g.users(w)[0])
                                                  for w in writes):
            continue
        parts = [g.operands(w)[1] for _, w in sorted(zip(offsets, writes))]
        at, tiled = 0, True
        for off, part in zip(sorted(offsets), parts):
            size = g.node(part).type.shape[axis]
            tiled = tiled and int(off) == at and isinstance(size, int)
            at = at + size if isinstance(size, int) else at
        if not tiled or at != g.node(nid).type.shape[axis]:
            misses.append(f"%{g.node(nid).name}: sums slices written into zeros that do not tile axis {axis}; "
                          f"left as writes")
            continue
        replace(g, nid, "concat", parts, {"axis": axis})
        matches += 1
    remove_dead(g)
    return matches, misses


# -- elementwise chains ---------------------------------------------------------------------------

#: operands of one fused chain at most: a kernel's buffers are bounded (Vulkan: 32 storage buffers a shader on
#: lavapipe, fewer on some devices); a global norm's sum over every gradient stops growing there
MAX_FUSED_OPERANDS = 16


def fuse_elementwise(g: Graph):
    """Chains of elementwise ops -> one ``fused_elementwise`` each.  A value joins its users' chain when
    all its uses are in that one chain, it has the chain's shape (nothing is recomputed per element of a
    broadcast) and it is not a graph output or computed from the weights alone (those are computed once,
    at bind time); what stays outside is read as an operand.  An optimizer's update, a norm's backward
    between its reductions, a mask built from ids: a kernel each instead of one per op."""
    constant = weights_only(g)
    order = g.topo_order()
    root_of: dict[int, int] = {}
    members: dict[int, list[int]] = {}
    reads: dict[int, set[int]] = {}  # root -> what its chain reads from outside
    for nid in reversed(order):
        n = g.node(nid)
        if nid in constant or not elementwise_step_ok(n.op):
            continue
        roots = {root_of.get(u) for u in g.users(nid)}
        root = nid
        if len(roots) == 1 and None not in roots and not g.is_output(nid):
            (candidate,) = roots
            joined = (reads[candidate] - {nid}) | set(g.operands(nid))
            if n.type.shape == g.node(candidate).type.shape and len(joined) <= MAX_FUSED_OPERANDS:
                root = candidate
        root_of[nid] = root
        members.setdefault(root, []).append(nid)
        reads[root] = (reads.get(root, set()) - {nid}) | set(g.operands(nid))
    matches = 0
    for root, ms in members.items():
        if len(ms) < 2:
            continue
        inside = set(ms)
        steps = [m for m in order if m in inside]
        operands = list(dict.fromkeys(o for m in steps for o in g.operands(m) if o not in inside))
        index = {o: i for i, o in enumerate(operands)}
        index.update({m: len(operands) + k for k, m in enumerate(steps)})
        program = tuple((g.node(m).op, tuple(index[o] for o in g.operands(m)), tuple(sorted(g.node(m).attrs.items())))
                        for m in steps)
        replace(g, root, "fused_elementwise", operands, {"program": program})
        matches += 1
    remove_dead(g)
    return matches, []
