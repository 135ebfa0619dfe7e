"""Fusions, written as rewrite rules anchored on the last op of each pattern.

Each rule walks up from its anchor, checks that every value it would swallow has no other use,
rewrites, and returns ``(matches, near_misses)``: a near miss names the node and why it was left
alone, so a pattern that silently fails to match is never silent.
"""

from __future__ import annotations

import math

import numpy as np

from ..ir import Graph
from .memory import weights_only
from .rewrite import anchors, node_if, only_used_by, remove_dead, replace, scalar_const

NEG_INF = float("-inf")


def _peel_masks(g: Graph, nid: int, anchor: int):
    """Walk from a softmax operand through its masks, outermost first.

    ``where(m, s, -inf)`` is a keep mask, ``where(m, -inf, s)`` a drop mask, ``s + m`` (m not on
    the score chain) an additive one.  Returns (the scores below the masks, [(kind, mask)] in
    application order, the swallowed nodes, a reason if a mask value is shared)."""
    masks, swallowed, user = [], [], anchor
    while True:
        n = g.node(nid)
        if n.op == "where":
            cond, a, b = g.operands(nid)
            if scalar_const(g, b) == NEG_INF:
                kind, mask, inner = "keep", cond, a
            elif scalar_const(g, a) == NEG_INF:
                kind, mask, inner = "drop", cond, b
            else:
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
            kind = "additive"
        else:
            break
        if not only_used_by(g, nid, user):
            return nid, masks[::-1], swallowed, f"%{n.name} ({n.op}) is also used elsewhere"
        masks.append((kind, mask))
        swallowed.append(nid)
        user, nid = nid, inner
    return nid, masks[::-1], swallowed, None


def _scale_of(g: Graph, nid: int):
    """If ``nid`` is ``s * c``, ``c * s`` or ``s / c`` with a scalar constant ``c``: (s, factor)."""
    n = g.node(nid)
    if n.op == "mul":
        a, b = g.operands(nid)
        if scalar_const(g, b) is not None:
            return a, scalar_const(g, b)
        if scalar_const(g, a) is not None:
            return b, scalar_const(g, a)
    if n.op == "div":
        a, b = g.operands(nid)
        c = scalar_const(g, b)
        if c:
            return a, 1.0 / c
    return None


def softmax_scaling(g: Graph):
    """``softmax(masks((Q @ K^T) * s))`` -> ``scaled_masked_softmax(Q @ K^T, masks; scale=s)``.

    Matches ``mul(x, 1/sqrt(d))``, ``div(x, sqrt(d))``, the scale on Q or K before the product,
    additive / keep / drop masks (causal masks are keep masks), or none."""
    matches, misses = 0, []
    for nid, n in anchors(g, "softmax"):
        if n.attrs["axis"] not in (-1, n.type.rank - 1):
            misses.append(f"%{n.name}: softmax over axis {n.attrs['axis']}, not the last")
            continue
        (x,) = g.operands(nid)
        scores, masks, swallowed, shared = _peel_masks(g, x, nid)
        if shared:
            misses.append(f"%{n.name}: {shared}")
            continue
        scale, scaled = 1.0, _scale_of(g, scores)
        user = swallowed[-1] if swallowed else nid
        if scaled and only_used_by(g, scores, user):
            scores, scale = scaled
        core = g.node(scores)
        if core.op == "matmul":
            # The scale may sit on Q or on K^T before the product.
            a, b = g.operands(scores)
            for i, side in enumerate((a, b)):
                pre = _scale_of(g, side)
                if pre and only_used_by(g, side, scores):
                    operands = [a, b]
                    operands[i] = pre[0]
                    scale *= pre[1]
                    scores = replace(g, scores, "matmul", operands, {}, core.meta)
                    break
            d = g.node(g.operands(scores)[0]).type.shape[-1]
            if isinstance(d, int) and not math.isclose(scale, 1 / math.sqrt(d), rel_tol=1e-6) and scale != 1.0:
                misses.append(f"%{n.name}: fused, but the scale {scale:.6g} is not 1/sqrt(d_k) = "
                              f"{1 / math.sqrt(d):.6g} (d_k = {d}); kept as written")
        if scale == 1.0 and not masks:
            continue
        replace(g, nid, "scaled_masked_softmax", [scores] + [m for _, m in masks],
                {"scale": float(scale), "mask_kinds": tuple(k for k, _ in masks)})
        matches += 1
    remove_dead(g)
    return matches, misses


def _is_perm(g, nid, perm):
    n = g.node(nid)
    return n.op == "transpose" and tuple(n.attrs["perm"]) == perm


SWAP_LAST = (0, 1, 3, 2)
HEADS = (0, 2, 1, 3)


def attention(g: Graph):
    """``scaled_masked_softmax(Q @ K^T) @ V`` -> ``fused_attention(Q, K, V, masks)``; when Q, K and V
    come from the head split (``reshape -> transpose(0,2,1,3)``) and the result goes back through
    ``transpose(0,2,1,3)``, the transposes are absorbed: the attention reads and writes the
    projections' (batch, seq, heads, dim) layout directly (``layout='bshd'``)."""
    matches, misses = 0, []
    for nid, n in anchors(g, "matmul"):
        p, v = g.operands(nid)
        sms = node_if(g, p, "scaled_masked_softmax")
        if sms is None or n.type.rank != 4:
            continue
        scores, *masks = g.operands(p)
        if not only_used_by(g, p, nid) or not only_used_by(g, scores, p):
            misses.append(f"%{n.name}: attention probabilities or scores used elsewhere; not fused")
            continue
        if g.node(scores).op != "matmul":
            misses.append(f"%{n.name}: scores are not a matmul ({g.node(scores).op})")
            continue
        q, kt = g.operands(scores)
        if not (_is_perm(g, kt, SWAP_LAST) and only_used_by(g, kt, scores)):
            misses.append(f"%{n.name}: K^T is not a transpose of the last two axes")
            continue
        (k,) = g.operands(kt)
        attrs = {"scale": sms.attrs["scale"], "mask_kinds": sms.attrs["mask_kinds"], "layout": "bhsd"}
        out_users = g.users(nid)
        head_major = all(_is_perm(g, t, HEADS) for t in (q, k, v))
        absorbed = head_major and len(out_users) == 1 and _is_perm(g, out_users[0], HEADS) \
            and not g.is_output(nid)
        if absorbed:
            qkv = [g.operands(t)[0] for t in (q, k, v)]
            attrs["layout"] = "bshd"
            replace(g, out_users[0], "fused_attention", qkv + masks, attrs, n.meta)
        else:
            if head_major:
                misses.append(f"%{n.name}: fused in head-major layout: the output is not transposed back "
                              f"by a single transpose(0,2,1,3)")
            replace(g, nid, "fused_attention", [q, k, v] + masks, attrs)
        matches += 1
        remove_dead(g)
    return matches, misses


def linear_epilogue(g: Graph):
    """``act(x @ W + b)`` with a 2-D weight -> ``linear(x, W, b; activation)``."""
    matches, misses = 0, []
    for nid, n in anchors(g, "add"):
        a, b = g.operands(nid)
        mm, bias = (a, b) if g.node(a).op == "matmul" else (b, a)
        if g.node(mm).op != "matmul":
            continue
        x, w = g.operands(mm)
        wt, bt = g.node(w).type, g.node(bias).type
        if wt.rank != 2 or bt.shape != (wt.shape[1],):
            continue
        if not only_used_by(g, mm, nid):
            misses.append(f"%{n.name}: the product %{g.node(mm).name} is used elsewhere; bias not fused")
            continue
        activation, anchor = "none", nid
        users = g.users(nid)
        if len(users) == 1 and not g.is_output(nid):
            u = g.node(users[0])
            if u.op == "relu":
                activation, anchor = "relu", users[0]
            elif u.op == "gelu":
                activation, anchor = ("gelu_tanh" if u.attrs["approximate"] == "tanh" else "gelu"), users[0]
        replace(g, anchor, "linear", [x, w, bias], {"activation": activation}, g.node(mm).meta)
        matches += 1
    remove_dead(g)
    return matches, misses


def residual_layer_norm(g: Graph):
    """``layer_norm(a + b)`` -> ``add_layer_norm(a, b)`` when the sum has no other use."""
    matches, misses = 0, []
    for nid, n in anchors(g, "layer_norm"):
        s, gamma, beta = g.operands(nid)
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
        replace(g, nid, "add_layer_norm", [a, b, gamma, beta], {"eps": n.attrs["eps"]})
        matches += 1
    remove_dead(g)
    return matches, misses


def fold_scale_into_q(g: Graph):
    """``fused_attention(reshape(linear(x, Wq, bq)), ...; scale=s)`` -> the same with ``Wq*s, bq*s``
    and scale 1: the softmax scale costs nothing at run time (``Wq*s`` is weights-only)."""
    matches, misses = 0, []
    constant = weights_only(g)
    for nid in g.topo_order():
        n = g.node(nid)
        if n.op != "fused_attention" or n.attrs["scale"] == 1.0:
            continue
        q = g.operands(nid)[0]
        proj = g.operands(q)[0] if g.node(q).op == "reshape" and only_used_by(g, q, nid) else q
        pn = g.node(proj)
        if pn.op != "linear" or pn.attrs["activation"] != "none" or not only_used_by(g, proj, q if proj != q else nid):
            misses.append(f"%{n.name}: Q is not a projection used by this attention alone; scale kept in the kernel")
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


def _parent_scope(g: Graph, nid: int) -> str:
    return g.node(nid).meta.get("scope", "").rpartition(".")[0]


def merge_projections(g: Graph):
    """Linear projections of one input inside one attention module (Q, K and V of self-attention;
    K and V of the encoder memory in cross-attention) -> one ``linear`` over the concatenated
    weights, whose result is sliced per projection along the last axis."""
    matches, groups = 0, {}
    for nid in g.topo_order():
        n = g.node(nid)
        ops_ = g.operands(nid)
        if n.op == "linear" and n.attrs["activation"] == "none" and len(ops_) == 3 and _parent_scope(g, nid):
            groups.setdefault((ops_[0], _parent_scope(g, nid)), []).append(nid)
    for (x, scope), members in groups.items():
        if len(members) < 2:
            continue
        weights = [g.operands(m)[1] for m in members]
        biases = [g.operands(m)[2] for m in members]
        meta = {**g.node(members[0]).meta, "scope": scope}
        w = g.add("concat", weights, {"axis": 1}, name="merged_weight", meta=meta)
        b = g.add("concat", biases, {"axis": 0}, name="merged_bias", meta=meta)
        merged = g.add("linear", [x, w, b], {"activation": "none"}, name="merged_linear", meta=meta)
        start = 0
        for m in members:
            width = g.node(m).type.shape[-1]
            part = g.add("slice", [merged], {"axis": -1, "start": start, "stop": start + width},
                         name="projection", meta=g.node(m).meta)
            g.replace_all_uses(m, part)
            start += width
        matches += 1
    remove_dead(g)
    return matches, []
