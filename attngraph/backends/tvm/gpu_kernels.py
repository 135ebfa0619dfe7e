"""Hand-written GPU kernels: the fused attention in the flash-attention style, for cuda and for the
vulkan target's WGSL path.

dlight has no rule for a whole attention (a matmul, masks, a softmax and a second matmul in one
PrimFunc): its Fallback rule makes four kernels, one thread per output, with the full
(batch, heads, Lq, Lk) score matrix in global memory.  ``flash_attention`` is one kernel instead:

- one workgroup of ``BQ`` threads per (batch, head, tile of ``BQ`` query rows), one thread per row,
  its query row and its output accumulator in registers;
- the keys and values stream through shared memory in tiles of ``BK`` rows, loaded by the whole
  workgroup together;
- the softmax is online (running maximum and sum, the accumulator rescaled once per tile), so the
  score matrix never exists in memory: memory traffic is O(L·d), not O(L²).

Masks (additive, keep, drop; any shape that broadcasts to the scores) and the scale are applied to
each score exactly as the generic lowering does, and a row whose every score is masked comes out
NaN, as in the interpreter.  All dims but the head sizes stay symbolic: one kernel serves every
batch and length.  float32 only, head sizes up to 128; anything else returns None (the generic
kernel serves it).  It uses CUDA cores, not tensor cores.
"""

from __future__ import annotations

import re

#: Query rows per workgroup (one thread each) and keys per shared-memory tile.
BQ = 64
BK = 32
MAX_HEAD = 128
_NAME = re.compile(r"^[A-Za-z_]\w*$")


def _dim(d, names: dict) -> str | None:
    """TVMScript for one dim of a buffer shape (an int, or a symbolic name declared as T.int64())."""
    if isinstance(d, int):
        return f"T.int64({d})"
    if isinstance(d, str) and _NAME.match(d) and not d.startswith("T"):
        names[d] = f"d_{d}"
        return f"d_{d}"
    return None


def flash_attention(spec, dv, target, *, narrow_bool: bool = False):
    """The fused attention ``spec`` as one flash-style GPU kernel (a scheduled PrimFunc), or None
    where it does not apply.  ``narrow_bool``: bool masks are stored as int32 (the WGSL path)."""
    import tvm

    if spec.op != "fused_attention" or spec.attrs.get("heads"):  # head windows: the generic schedule
        return None
    q, k, v = spec.in_types[:3]
    masks = spec.in_types[3:]
    kinds = list(spec.attrs.get("mask_kinds", ()))
    layout = spec.attrs.get("layout", "bhsd")
    if any(str(t.dtype) != "float32" for t in (q, k, v, spec.out_type)) or len(kinds) != len(masks):
        return None
    if layout == "bshd":
        (b, lq, h, d), lk, dvv = q.shape, k.shape[1], v.shape[3]
    else:
        (b, h, lq, d), lk, dvv = q.shape, k.shape[2], v.shape[3]
    if not (isinstance(d, int) and isinstance(dvv, int) and 0 < d <= MAX_HEAD and 0 < dvv <= MAX_HEAD):
        return None
    shared_bytes = BK * (d + dvv) * 4
    limit = target.attrs.get("max_shared_memory_per_block")
    if limit is not None and shared_bytes > int(limit):
        return None
    names: dict = {}
    shapes = []
    for t in list(spec.in_types) + [spec.out_type]:
        dims = [_dim(x, names) for x in t.shape]
        if any(x is None for x in dims):
            return None
        shapes.append(dims)
    B, H, LQ, LK = (f"T.Cast('int32', {_dim(x, names)})" for x in (b, h, lq, lk))

    def at(buf: str, bi: str, hi: str, si: str, ci: str) -> str:
        return f"{buf}[{bi}, {si}, {hi}, {ci}]" if layout == "bshd" else f"{buf}[{bi}, {hi}, {si}, {ci}]"

    # Each mask read at (batch, head, query row, key), broadcast NumPy-style.
    mask_terms = []
    for i, (t, kind) in enumerate(zip(masks, kinds)):
        idx_names = ["bi", "hi", "row", "key"][4 - len(t.shape):] if len(t.shape) <= 4 else None
        if idx_names is None:
            return None
        idx = ", ".join("0" if x == 1 else n for x, n in zip(t.shape, idx_names))
        read = f"M{i}[{idx}]"
        if kind == "additive":
            if str(t.dtype) != "float32":
                return None
            mask_terms.append(f"sc = sc + {read}")
        else:
            cond = f"{read} != 0" if narrow_bool else read
            keep, drop = ("sc", "T.float32('-inf')") if kind == "keep" else ("T.float32('-inf')", "sc")
            mask_terms.append(f"sc = T.if_then_else({cond}, {keep}, {drop})")
    mask_dtypes = [("int32" if narrow_bool and str(t.dtype) == "bool" else str(t.dtype)) for t in masks]
    params = ["q_h", "k_h", "v_h"] + [f"m{i}_h" for i in range(len(masks))] + ["o_h"]
    bufs = ["Q", "K", "V"] + [f"M{i}" for i in range(len(masks))] + ["O"]
    dtypes = ["float32"] * 3 + mask_dtypes + ["float32"]
    lines = [
        "@T.prim_func",
        f"def main({', '.join(f'{p}: T.handle' for p in params)}):",
        "    T.func_attr({'global_symbol': 'main', 'tirx.noalias': True, 'tirx.is_scheduled': True})",
    ]
    lines += [f"    {var} = T.int64()" for var in names.values()]
    lines += [f"    {buf} = T.match_buffer({p}, ({', '.join(s)},), '{dt}')"
              for buf, p, s, dt in zip(bufs, params, shapes, dtypes)]
    scale = repr(float(spec.attrs.get("scale", 1.0)))
    NQT = f"(({LQ} + {BQ - 1}) // {BQ})"  # query tiles per (batch, head)
    body = f"""
    bx = T.launch_thread("blockIdx.x", {NQT} * {H} * {B})
    tx = T.launch_thread("threadIdx.x", {BQ})
    Ks = T.alloc_buffer(({BK * d},), "float32", scope="shared")
    Vs = T.alloc_buffer(({BK * dvv},), "float32", scope="shared")
    qr = T.alloc_buffer(({d},), "float32", scope="local")
    acc = T.alloc_buffer(({dvv},), "float32", scope="local")
    st = T.alloc_buffer(({BK},), "float32", scope="local")
    mi = T.alloc_buffer((1,), "float32", scope="local")
    li = T.alloc_buffer((1,), "float32", scope="local")
    tmax = T.alloc_buffer((1,), "float32", scope="local")
    bh: T.int32 = bx // {NQT}
    bi: T.int32 = bh // {H}
    hi: T.int32 = bh % {H}
    row: T.int32 = bx % {NQT} * {BQ} + tx
    for c in range({d}):
        qr[c] = T.if_then_else(row < {LQ}, {at("Q", "bi", "hi", f"T.min(row, {LQ} - 1)", "c")}, T.float32(0))
    for c in range({dvv}):
        acc[c] = T.float32(0)
    mi[0] = T.float32('-inf')
    li[0] = T.float32(0)
    for t in range(({LK} + {BK - 1}) // {BK}):
        for e in range({-(-BK * d // BQ)}):
            if e * {BQ} + tx < {BK * d}:
                kn: T.int32 = t * {BK} + (e * {BQ} + tx) // {d}
                Ks[e * {BQ} + tx] = T.if_then_else(kn < {LK}, {at("K", "bi", "hi", f"T.min(kn, {LK} - 1)", f"(e * {BQ} + tx) % {d}")}, T.float32(0))
        for e in range({-(-BK * dvv // BQ)}):
            if e * {BQ} + tx < {BK * dvv}:
                vn: T.int32 = t * {BK} + (e * {BQ} + tx) // {dvv}
                Vs[e * {BQ} + tx] = T.if_then_else(vn < {LK}, {at("V", "bi", "hi", f"T.min(vn, {LK} - 1)", f"(e * {BQ} + tx) % {dvv}")}, T.float32(0))
        T.tvm_storage_sync("shared")
        tmax[0] = T.float32('-inf')
        for j in range({BK}):
            key: T.int32 = t * {BK} + j
            st[j] = T.float32(0)
            for c in range({d}):
                st[j] = st[j] + qr[c] * Ks[j * {d} + c]
            if key < {LK} and row < {LQ}:
                sc: T.float32 = st[j] * T.float32({scale})
{chr(10).join("                " + m for m in mask_terms)}
                st[j] = sc
            else:
                st[j] = T.float32('-inf')
            tmax[0] = T.max(tmax[0], st[j])
        mnew: T.float32 = T.max(mi[0], tmax[0])
        corr: T.float32 = T.if_then_else(mi[0] == T.float32('-inf'), T.float32(0), T.exp(mi[0] - mnew))
        li[0] = li[0] * corr
        for c in range({dvv}):
            acc[c] = acc[c] * corr
        for j in range({BK}):
            p: T.float32 = T.if_then_else(st[j] == T.float32('-inf'), T.float32(0), T.exp(st[j] - mnew))
            li[0] = li[0] + p
            for c in range({dvv}):
                acc[c] = acc[c] + p * Vs[j * {dvv} + c]
        mi[0] = mnew
        T.tvm_storage_sync("shared")
    if row < {LQ}:
        for c in range({dvv}):
            {at("O", "bi", "hi", "row", "c")} = T.if_then_else(li[0] == T.float32(0), T.float32('nan'), acc[c] / li[0])
"""
    source = "\n".join(lines) + body
    return tvm.script.from_source(source)
