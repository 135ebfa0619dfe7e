"""The fused attention kernel for the CPU: ``softmax(mask(Q K^T * scale)) V`` a block of query rows at a time.

Loop nest, per (batch, head) in parallel:

- K is copied once per head, transposed and in chunks of ``LANES`` keys: ``kt[r, chunk, lane]`` (the
  last chunk padded by repeating the last key, so every chunk is whole);
- per block of ``ROWS`` query rows: the scores of the block against every key chunk as a
  ``ROWS x LANES`` register tile summed over the head dim (the dense kernel's micro-kernel: a key
  chunk is loaded once for ``ROWS`` queries), scaled and masked; the row maxima; the exponentials
  (padded keys give exactly 0); the row sums; then ``P V`` as a ``ROWS x head_dim`` tile summed over
  the keys, divided by the row sums on the way out.

Memory per worker: the transposed keys of one head and ``ROWS`` rows of scores, never the
(batch, heads, q_len, k_len) matrix.  Query rows past the end (a partial last block) read the last
row again and are never written.  Both layouts: ``bhsd`` (batch, heads, seq, dim) and ``bshd``.
"""

from __future__ import annotations

import math

from tvm import s_tir, te, tirx

from .....ir import TensorType
from .....ir.fused import apply_masks, attention_views, mask_score_grad
from ...lower.common import bcast, te_mask_ops
from ...shapes import DimVars
from .fastmath import fast_math
from .dot import BF16, F32, tensorized
from .dot import LANES as PAIR_LANES
from .schedule import i64, vectorize_static, zeroed
from .tiles import BF16_GROUP

#: Query rows per block and keys per vector chunk (16 float32 = two AVX2 registers): the AVX2 tiles;
#: ``tiles.cpu_tiles`` gives each instruction set's (AVX-512: 8 rows x 32 keys).
ROWS, LANES = 6, 16



def attention(attrs: dict, in_types: list[TensorType], out_type: TensorType, dim_vars: DimVars,
              block: int = ROWS, lanes: int = LANES, dot: bool = False) -> tirx.PrimFunc:
    """The scheduled PrimFunc of ``fused_attention`` with these attributes and operand types, ``block``
    query rows at a time (1: the few-rows form, for a decode step's single query).

    ``dot``: bfloat16 q, k, v multiplied on the CPU's bfloat16 dot products (``dot.py``): K and V laid out per head
    in pair panels (K's pairs along the head dim, V's along the keys), the probabilities rounded to bfloat16 before
    P V (as FlashAttention does in half precision), the scores, the softmax and the sums in float32."""
    dtype = F32 if dot else out_type.dtype  # the arithmetic's
    bshd = attrs.get("layout", "bhsd") == "bshd"
    phs = [te.placeholder(dim_vars.shape(t.shape), t.dtype, name=f"in{i}") for i, t in enumerate(in_types)]
    Q, K, V, masks = phs[0], phs[1], phs[2], phs[3:]
    seq_axis = 1 if bshd else 2
    b, lq, h, dv_ = (dim_vars.shape(out_type.shape)[a] for a in ((0, 1, 2, 3) if bshd else (0, 2, 1, 3)))
    d, lk = Q.shape[3], K.shape[seq_axis]
    # each operand's layout, broadcast batch or head axis and head window
    q_view, k_view, v_view = attention_views(in_types, out_type, attrs)

    def q_at(i, j, m, r):
        return Q[q_view.index(i, j, m, r)]

    def k_at(i, j, n, r):
        return K[k_view.index(i, j, n, r)]

    def v_at(i, j, n, c):
        return V[v_view.index(i, j, n, c)]

    rows = lq + (block - 1)  # room for a partial last block (its extra rows read the last query again)
    chunks = (lk + (lanes - 1)) // lanes
    last_q, last_k = lq - 1, lk - 1
    ninf = tirx.const(-math.inf, dtype)
    zero = tirx.const(0.0, dtype)
    scale = tirx.const(attrs.get("scale", 1.0), dtype)
    reads = [bcast(m, 4) for m in masks]

    def row(m):
        return tirx.min(m, last_q)

    def key(c, lane):
        return tirx.min(c * lanes + lane, last_k)

    if dot:  # K in pair panels once per head: (chunks, d / 2, lanes, 2), the pairs along the head dim
        pairs = i64(int(d) // BF16_GROUP)
        kp = te.compute((b, h, chunks, pairs, i64(lanes), i64(BF16_GROUP)),
                        lambda i, j, c, r, lane, t: k_at(i, j, key(c, lane), r * BF16_GROUP + t), name="kp")
        r, t = te.reduce_axis((0, pairs), name="r"), te.reduce_axis((0, i64(BF16_GROUP)), name="t")
        acc = te.compute((b, h, rows, chunks, i64(lanes)), lambda i, j, m, c, lane: te.sum(
            q_at(i, j, row(m), r * BF16_GROUP + t).astype(F32) * kp[i, j, c, r, lane, t].astype(F32), axis=[r, t]),
            name="acc")
    elif block > 1:  # K transposed once per head, reused by every block of queries
        r = te.reduce_axis((0, d), name="r")
        kt = te.compute((b, h, d, chunks, i64(lanes)), lambda i, j, r, c, lane: k_at(i, j, key(c, lane), r), name="kt")
        acc = te.compute((b, h, rows, chunks, i64(lanes)),
                         lambda i, j, m, c, lane: te.sum(q_at(i, j, row(m), r) * kt[i, j, r, c, lane], axis=r),
                         name="acc")
    else:  # one query: a dot product per key, along K's contiguous head dim (a transpose would cost as much)
        r = te.reduce_axis((0, d), name="r")
        acc = te.compute((b, h, rows, chunks, i64(lanes)),
                         lambda i, j, m, c, lane: te.sum(q_at(i, j, row(m), r) * k_at(i, j, key(c, lane), r), axis=r),
                         name="acc")

    def in_range(c, lane):
        """Key ``c * lanes + lane`` exists (not the last chunk's padding); compared in int32, so a
        vector of lanes is one compare per register (int64 lanes took four, 2% of the kernel)."""
        return tirx.Cast("int32", lane) < tirx.Cast("int32", lk - c * lanes)

    ops = te_mask_ops(dtype)

    def mask(read, *idx):  # an additive mask's values in the arithmetic's type
        v = read(*idx)
        return v if v.dtype == "bool" else v.astype(dtype)

    def score(i, j, m, c, lane):  # scaled and masked
        v = acc[i, j, m, c, lane] * scale
        m, n = row(m), key(c, lane)  # the masks are read at the clamped query row and key
        v = apply_masks(v, [mask(read, i, j, m, n) for read in reads], attrs, ops)
        return tirx.Select(in_range(c, lane), v, ninf)

    s = te.compute(acc.shape, score, name="s")
    # Row max and row sum in two steps, each vectorized: over the chunks lane by lane, then over the lanes.
    c1 = te.reduce_axis((0, chunks), name="c1")
    mx_lanes = te.compute((b, h, rows, i64(lanes)), lambda i, j, m, lane: te.max(s[i, j, m, c1, lane], axis=c1),
                          name="mx_lanes")
    l1 = te.reduce_axis((0, lanes), name="l1")
    mx = te.compute((b, h, rows), lambda i, j, m: te.max(mx_lanes[i, j, m, l1], axis=l1), name="mx")
    # the probabilities before normalizing (bfloat16 for the dot products; their sums are of what P V multiplies)
    e = te.compute(acc.shape, lambda i, j, m, c, lane: tirx.Select(
        in_range(c, lane), te.exp(s[i, j, m, c, lane] - mx[i, j, m]), zero).astype(BF16 if dot else dtype), name="e")
    c2 = te.reduce_axis((0, chunks), name="c2")
    sm_lanes = te.compute((b, h, rows, i64(lanes)), lambda i, j, m, lane: te.sum(
        e[i, j, m, c2, lane].astype(dtype), axis=c2), name="sm_lanes")
    l2 = te.reduce_axis((0, lanes), name="l2")
    sm = te.compute(mx.shape, lambda i, j, m: te.sum(sm_lanes[i, j, m, l2], axis=l2), name="sm")
    if dot:  # V in pair panels once per head: (dv / 16, keys / 2, 16, 2), the pairs along the keys
        half = lanes // BF16_GROUP
        vp = te.compute((b, h, dv_ // PAIR_LANES, chunks * half, i64(PAIR_LANES), i64(BF16_GROUP)),
                        lambda i, j, xp, q, x, u: v_at(i, j, tirx.min(q * BF16_GROUP + u, last_k), xp * PAIR_LANES + x),
                        name="vp")
        c3, q3 = te.reduce_axis((0, chunks), name="c3"), te.reduce_axis((0, i64(half)), name="q3")
        u3 = te.reduce_axis((0, i64(BF16_GROUP)), name="u3")
        o = te.compute((b, h, rows, dv_), lambda i, j, m, x: te.sum(
            e[i, j, m, c3, q3 * BF16_GROUP + u3].astype(F32)
            * vp[i, j, x // PAIR_LANES, c3 * half + q3, x % PAIR_LANES, u3].astype(F32), axis=[c3, q3, u3]), name="o")
    else:
        c3, l3 = te.reduce_axis((0, chunks), name="c3"), te.reduce_axis((0, lanes), name="l3")
        if block > 1:  # V in whole key chunks once per head (the last padded), read without a clamp per key
            vp = te.compute((b, h, chunks, i64(lanes), dv_), lambda i, j, c, lane, x: v_at(i, j, key(c, lane), x),
                            name="vp")

            def v_chunk(i, j, c, lane, x):
                return vp[i, j, c, lane, x]
        else:
            def v_chunk(i, j, c, lane, x):
                return v_at(i, j, key(c, lane), x)
        o = te.compute((b, h, rows, dv_),
                       lambda i, j, m, x: te.sum(e[i, j, m, c3, l3] * v_chunk(i, j, c3, l3, x), axis=[c3, l3]),
                       name="o")
    odt = out_type.dtype
    if bshd:
        out = te.compute((b, lq, h, dv_), lambda i, m, j, x: (o[i, j, m, x] / sm[i, j, m]).astype(odt), name="out")
    else:
        out = te.compute((b, h, lq, dv_), lambda i, j, m, x: (o[i, j, m, x] / sm[i, j, m]).astype(odt), name="out")

    sch = s_tir.Schedule(te.create_prim_func(phs + [out]))
    ob = sch.get_sblock("out")
    if bshd:
        i, m, j, x = sch.get_loops(ob)
        sch.reorder(i, j, m, x)
    else:
        i, j, m, x = sch.get_loops(ob)
    head = sch.fuse(i, j)
    sch.parallel(head)
    mo, mi = sch.split(m, [None, block])
    # P V in slices of ``lanes`` output columns, so that its block x lanes tile stays in registers
    # (6 x head_dim would not with AVX2: 48 accumulators for head_dim 64, 16 registers).
    sliced = isinstance(dv_, tirx.IntImm) and dv_.value % lanes == 0 and dv_.value > lanes
    if sliced:
        xo, xi = sch.split(x, [None, lanes])
        sch.reorder(mo, xo, mi, xi)
    sch.compute_at(sch.get_sblock("o"), xo if sliced else mo, preserve_unit_loops=True)
    stages = ("sm", "sm_lanes", "e", "mx", "mx_lanes", "s")
    for name in stages:
        sch.compute_at(sch.get_sblock(name), mo, preserve_unit_loops=True)
    for name in stages:
        sch.set_scope(sch.get_sblock(name), 0, "global")
    # Scores: for each key chunk, a block x lanes register tile accumulated over the head dim, then
    # scaled and masked on the way to memory.
    sb = sch.get_sblock("s")
    s_mi, s_c, s_l = sch.get_loops(sb)[-3:]
    sch.reorder(s_c, s_mi, s_l)
    sch.vectorize(s_l)
    ab = sch.get_sblock("acc")
    sch.compute_at(ab, s_c, preserve_unit_loops=True)
    sch.set_scope(ab, 0, "local")
    if dot:  # the head dim's pairs outside the rows and the lanes, 16 lanes x a pair on the instruction
        a_mi, _, a_l, a_r, a_t = sch.get_loops(ab)[-5:]
        sch.reorder(a_r, a_mi, a_l, a_t)
        a_lo, a_li = sch.split(a_l, [None, PAIR_LANES])
        for loop in (a_mi, a_lo):
            sch.unroll(loop)
        zeroed(sch, ab, a_r)
        sch.compute_at(sch.get_sblock("kp"), head, preserve_unit_loops=True)
        sch.compute_at(sch.get_sblock("vp"), head)
    else:
        loops = sch.get_loops(ab)  # one per block iter under the chunk loop: batch, head, row, chunk, lane, dim
        a_mi, a_l, a_r = loops[-4], loops[-2], loops[-1]
        if block > 1:
            sch.reorder(a_r, a_mi, a_l)
            sch.unroll(a_mi)
            sch.vectorize(a_l)
            sch.decompose_reduction(ab, a_r)
            sch.compute_at(sch.get_sblock("kt"), head, preserve_unit_loops=True)  # one chunk (few keys): its loop stays
            # A chunk of keys at a time, all of its head dim: the chunk's rows stay in L1 while they are
            # transposed (head dim outside re-read every key once per head-dim element: 3-9% slower, batch 8).
            # The lanes unrolled as scalar copies: vectorized, each lane's clamped address was computed
            # in int64 vector lanes and extracted one by one (the transpose was 17% of the kernel at
            # S 128; unrolled, the kernel is 6-20% faster at S 77-512).
            kt_r, kt_c, kt_l = sch.get_loops(sch.get_sblock("kt"))[-3:]
            sch.reorder(kt_c, kt_r, kt_l)
            sch.unroll(kt_l)
            sch.compute_at(sch.get_sblock("vp"), head)
            vectorize_static(sch, sch.get_loops(sch.get_sblock("vp"))[-1])
        elif isinstance(d, tirx.IntImm) and d.value % 8 == 0:  # 8 partial sums in a vector, then added up
            _, lanes = sch.split(a_r, [None, 8])
            rf = sch.rfactor(lanes, factor_axis=0)
            sch.compute_at(rf, s_c, preserve_unit_loops=True)
            sch.set_scope(rf, 0, "local")
            # compute_at made one loop per block iter: the 8 partial sums, (unit loops), keys, reduction
            loops = sch.get_loops(rf)
            r_ri, r_l, r_ro = loops[-7], loops[-2], loops[-1]
            sch.reorder(r_l, r_ro, r_ri)
            sch.vectorize(r_ri)
            sch.decompose_reduction(rf, r_ro)
    eb = sch.get_sblock("e")
    sch.vectorize(sch.get_loops(eb)[-1])
    for name in ("mx_lanes", "sm_lanes"):  # rows, lanes, chunks -> rows, chunks, lanes (vector)
        blk = sch.get_sblock(name)
        lane, chunk = sch.get_loops(blk)[-2:]
        sch.reorder(chunk, lane)
        sch.vectorize(lane)
        sch.decompose_reduction(blk, chunk)
    # P V: keys outside, a block x (head_dim or lanes) register tile inside.
    pb = sch.get_sblock("o")
    sch.set_scope(pb, 0, "local")
    if dot:  # the keys' pairs outside, 16 columns x a pair on the instruction
        p_mi, p_x, p_c, p_q, p_u = sch.get_loops(pb)[-5:]
        sch.reorder(p_c, p_q, p_mi, p_x, p_u)
        p_xo, p_xi = sch.split(p_x, [None, PAIR_LANES])
        for loop in (p_mi, p_xo):
            sch.unroll(loop)
        zeroed(sch, pb, p_c)
        return tensorized(sch, (a_li, p_xi), "global")
    p_mi, p_x, p_c, p_l = sch.get_loops(pb)[-4:]
    sch.reorder(p_c, p_l, p_mi, p_x)
    sch.unroll(p_mi)
    sch.vectorize(p_x)
    sch.decompose_reduction(pb, p_c)
    func = sch.mod["main"]
    return fast_math(func) if dtype == "float32" else func


def attention_backward(op: str, attrs: dict, in_types: list[TensorType], out_type: TensorType, dim_vars: DimVars,
                       block: int = ROWS, lanes: int = LANES) -> tirx.PrimFunc:
    """The scheduled PrimFunc of the attention's backward op ``op`` (``attention_lse``, ``attention_grad_q``,
    ``attention_grad_kv``; ``ir.fused``), ``block`` rows at a time.

    The rows are the query rows (the log-sum-exp, d q) or the key rows (d k and d v side by side); the
    columns the other side, in chunks of ``lanes`` (the last padded by repeating the last column, whose
    probability is set to 0).  Per (batch, head) in parallel: the column side's vectors transposed once;
    per block of rows: the scores (a vector of lanes accumulated over the head dim), the row statistics
    (in vector lanes, then across them), the probabilities exp(s - lse), d p, d s, and their products
    with the column side's vectors (vectorized over the head dim): a block x columns of each in memory,
    never the (batch, heads, q_len, k_len) matrices.  Rows past the end (a partial last block) read the
    last row again and are never written."""
    dtype = out_type.dtype
    phs = [te.placeholder(dim_vars.shape(t.shape), t.dtype, name=f"in{i}") for i, t in enumerate(in_types)]
    lse_only = op == "attention_lse"
    by_key = op == "attention_grad_kv"
    masks = phs[2:] if lse_only else phs[6:]
    q_at, k_at = bcast(phs[0], 4), bcast(phs[1], 4)
    shape = dim_vars.shape(out_type.shape)
    b, h = shape[0], shape[1]
    lq, lk, e = phs[0].shape[2], phs[1].shape[2], phs[0].shape[3]
    rows, cols = (lk, lq) if by_key else (lq, lk)
    padded, chunks = rows + (block - 1), (cols + (lanes - 1)) // lanes
    tile = (b, h, padded, chunks, i64(lanes))
    scale = tirx.const(attrs.get("scale", 1.0), dtype)
    zero, ninf = tirx.const(0.0, dtype), tirx.const(-math.inf, dtype)
    ops = te_mask_ops(dtype)
    reads = [bcast(m, 4) for m in masks]

    def row(m):
        return tirx.min(m, rows - 1)

    def col(c, lane):
        return tirx.min(c * lanes + lane, cols - 1)

    def in_range(c, lane):  # column c * lanes + lane exists (int32 compares: one per vector of lanes)
        return tirx.Cast("int32", lane) < tirx.Cast("int32", cols - c * lanes)

    def query_key(m, c, lane):  # (query, key) of row m and column (c, lane)
        return (col(c, lane), row(m)) if by_key else (row(m), col(c, lane))

    def mask_values(i, j, m, c, lane):
        qi, ki = query_key(m, c, lane)
        return [read(i, j, qi, ki) for read in reads]

    def products(row_side, col_side, depth, name):
        """row_side(row) . col_side(column) for a block of rows against every column chunk (the column
        side transposed per head)."""
        ct = te.compute((b, h, depth, chunks, i64(lanes)), lambda i, j, r, c, lane: col_side(i, j, col(c, lane), r),
                        name=f"{name}_t")
        r = te.reduce_axis((0, depth), name=f"{name}_r")
        acc = te.compute(tile, lambda i, j, m, c, lane: te.sum(row_side(i, j, row(m), r) * ct[i, j, r, c, lane],
                                                               axis=r), name=f"{name}_acc")
        return te.compute(tile, lambda *i: acc[i], name=name)

    acc = products(k_at, q_at, e, "s") if by_key else products(q_at, k_at, e, "s")

    def score(i, j, m, c, lane):
        return apply_masks(acc[i, j, m, c, lane] * scale, mask_values(i, j, m, c, lane), attrs, ops)
    stages = ["s", "s_t"]
    if lse_only:
        sc = te.compute(tile, lambda *i: tirx.Select(in_range(*i[3:]), score(*i), ninf), name="sc")
        c1, c2 = te.reduce_axis((0, chunks), name="c1"), te.reduce_axis((0, chunks), name="c2")
        l1, l2 = te.reduce_axis((0, lanes), name="l1"), te.reduce_axis((0, lanes), name="l2")
        mx_lanes = te.compute((b, h, padded, i64(lanes)), lambda i, j, m, lane: te.max(sc[i, j, m, c1, lane], axis=c1),
                              name="mx_lanes")
        mx = te.compute((b, h, padded), lambda i, j, m: te.max(mx_lanes[i, j, m, l1], axis=l1), name="mx")
        ex = te.compute(tile, lambda i, j, m, c, lane: tirx.Select(
            in_range(c, lane), te.exp(sc[i, j, m, c, lane] - mx[i, j, m]), zero), name="ex")
        se_lanes = te.compute((b, h, padded, i64(lanes)), lambda i, j, m, lane: te.sum(ex[i, j, m, c2, lane], axis=c2),
                              name="se_lanes")
        se = te.compute((b, h, padded), lambda i, j, m: te.sum(se_lanes[i, j, m, l2], axis=l2), name="se")
        out = te.compute(shape, lambda i, j, m: mx[i, j, m] + tirx.log(se[i, j, m]), name="out")
        stages += ["sc", "mx_lanes", "mx", "ex", "se_lanes", "se"]
    else:
        v_at, g, lse, delta = bcast(phs[2], 4), phs[3], bcast(phs[4], 3), phs[5]
        dv_ = phs[2].shape[3]

        def g_at(i, j, m, x):
            return g[i, j, m, x]

        def query(m, c, lane):
            return query_key(m, c, lane)[0]
        p = te.compute(tile, lambda i, j, m, c, lane: tirx.Select(
            in_range(c, lane), te.exp(score(i, j, m, c, lane) - lse(i, j, query(m, c, lane))), zero), name="p")
        dp = products(v_at, g_at, dv_, "dp") if by_key else products(g_at, v_at, dv_, "dp")
        ds = te.compute(tile, lambda i, j, m, c, lane: mask_score_grad(
            p[i, j, m, c, lane] * (dp[i, j, m, c, lane] - delta[i, j, query(m, c, lane)]) * scale,
            mask_values(i, j, m, c, lane), attrs, ops), name="ds")
        stages += ["p", "dp", "dp_t", "ds"]

        def weighted(w, col_rows, width, name):
            """sum over the columns of w(row, column) x the column's vector of ``col_rows`` (padded columns: w is 0)."""
            c, lane = te.reduce_axis((0, chunks), name=f"{name}_c"), te.reduce_axis((0, lanes), name=f"{name}_l")
            return te.compute((b, h, padded, width), lambda i, j, m, x: te.sum(
                w[i, j, m, c, lane] * col_rows(i, j, col(c, lane), x), axis=[c, lane]), name=name)
        if by_key:
            dk, dvv = weighted(ds, q_at, e, "dk"), weighted(p, g_at, dv_, "dv")
            out = te.compute(shape, lambda i, j, m, x: tirx.Select(x < e, dk[i, j, m, tirx.min(x, e - 1)],
                                                                   dvv[i, j, m, tirx.max(x - e, 0)]), name="out")
            stages += ["dk", "dv"]
        else:
            dq = weighted(ds, k_at, e, "dq")
            out = te.compute(shape, lambda i, j, m, x: dq[i, j, m, x], name="out")
            stages += ["dq"]

    sch = s_tir.Schedule(te.create_prim_func(phs + [out]))
    loops = sch.get_loops(sch.get_sblock("out"))
    head = sch.fuse(loops[0], loops[1])
    sch.parallel(head)
    mo, _ = sch.split(loops[2], [None, block])
    computed = [s for s in reversed(stages) if not s.endswith("_t")]
    for name in computed + [f"{n}_acc" for n in ("s", "dp") if n in stages]:
        sch.compute_at(sch.get_sblock(name), mo, preserve_unit_loops=True)
    for name in stages:
        if name.endswith("_t"):  # the transposed column side, once per head
            sch.compute_at(sch.get_sblock(name), head, preserve_unit_loops=True)
    for name in computed:
        blk = sch.get_sblock(name)
        inner = sch.get_loops(blk)
        if name in ("s", "dp"):
            # for each column chunk: a block x lanes register tile summed over the depth (a chunk of the
            # transposed column side loaded once for the block's rows), as the forward kernel's scores
            mi, c, lane = inner[-3:]
            sch.reorder(c, mi, lane)
            sch.vectorize(lane)
            acc = sch.get_sblock(f"{name}_acc")
            sch.compute_at(acc, c, preserve_unit_loops=True)
            sch.set_scope(acc, 0, "local")
            loops = sch.get_loops(acc)  # ..., row, (chunk), lane, depth
            a_mi, a_l, a_r = loops[-4], loops[-2], loops[-1]
            sch.reorder(a_r, a_mi, a_l)
            sch.unroll(a_mi)
            sch.vectorize(a_l)
            sch.decompose_reduction(acc, a_r)
        elif name in ("dq", "dk", "dv"):  # rows, width, chunks, lanes -> rows, chunks, lanes, width (a vector)
            x, c, lane = inner[-3], inner[-2], inner[-1]
            sch.reorder(c, lane, x)
            vectorize_static(sch, x)
            sch.decompose_reduction(blk, c)
        elif name in ("mx_lanes", "se_lanes"):  # rows, lanes, chunks -> rows, chunks, lanes (a vector)
            lane, c = inner[-2], inner[-1]
            sch.reorder(c, lane)
            sch.vectorize(lane)
            sch.decompose_reduction(blk, c)
        elif name in ("sc", "ex", "p", "ds"):
            sch.vectorize(inner[-1])
    func = sch.mod["main"]
    return fast_math(func) if dtype == "float32" else func
