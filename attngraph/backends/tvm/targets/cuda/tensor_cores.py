"""Hand-written cuda kernels on tensor cores (PTX ``mma.sync.m16n8k16``, float32 accumulators) for models built
in float16 or bfloat16: the fused attention in the FlashAttention-2 form, and the projection with its bias and
activation in the epilogue.

The fragments are the PTX ISA's (``emu.h`` states them; the emulator computes each lane's part from them):
a lane of ``g = lane / 4``, ``q = lane % 4`` holds A[g + 8 (i/2 % 2)][2q + i%2 + 8 (i/4)] (i < 8), B[2q + i%2
+ 8 (i/2)][g] (i < 4) and C[g + 8 (i/2)][2q + i%2] (i < 4).  So the scores of one m16n8 tile a lane holds are
two rows' worth of two columns, and the scores of two neighbouring tiles are, element for element, the A
fragment of the product P V over those 16 keys: the probabilities never leave the registers.

``mma_attention``, per workgroup of ``WARPS`` warps and ``16 WARPS`` query rows (16 per warp):

- each warp's Q fragments are loaded once from global memory into registers;
- K and V stream through shared memory in tiles of ``KEYS`` keys, loaded by the whole workgroup in 16-byte
  vectors, rows padded by 8 elements (16 bytes: the 8 rows an ``ldmatrix`` phase reads fall in different
  banks); the B fragments come out by ``ldmatrix.x4``, two m16n8 tiles at a time: K's as they are (a B
  fragment of Q Kᵀ is two neighbouring channels of one key), V's transposed (``.trans``: two neighbouring
  keys of one channel);
- the scores S = Q Kᵀ (``KEYS / 8`` m16n8 tiles per warp), scale and masks applied per element as the
  generic lowering does, the online softmax per row (maximum across the row's 4 lanes with two xor
  shuffles; each lane keeps a partial row sum, added across the 4 lanes at the end), O rescaled and
  O += P V with P rounded to the storage type, as FlashAttention-2 does;
- a fully masked row comes out NaN, as in the interpreter.

Every dim but the head sizes stays symbolic; keys past the end are read clamped to the last key and get
probability 0; rows past the end compute on clamped reads and are not written.  Applies at sm_80 and later
(the m16n8k16 shape for both types), head sizes a multiple of 16 up to ``gpu.kernels.MAX_HEAD``; anything
else returns None (the SIMT kernels of ``gpu.kernels``, which take half types too, serve it).  Not timed on a
GPU yet; the tiles are not double-buffered (no ``cp.async`` pipeline: each tile is loaded, then computed).
"""

from __future__ import annotations

import re

from ..gpu.kernels import activation_script, attention_parts, flat_row_index, kernel_header, projection_parts

#: Warps per workgroup (16 query rows each) and keys per shared-memory tile.
WARPS = 4
KEYS = 64
#: Padding of each shared-memory row, in elements (8 halves: 4 banks, so the 8 groups of a warp differ).
PAD = 8
_MMA_TYPE = {"float16": "fp16", "bfloat16": "bf16"}


def _arch_number(target) -> int:
    match = re.match(r"sm_(\d+)", str(target.attrs.get("arch", "")))
    return int(match.group(1)) if match else 0


def has_mma(target) -> bool:
    """Whether ``target`` has the ``mma.sync.m16n8k16`` instructions for float16 and bfloat16 (sm_80 on)."""
    return _arch_number(target) >= 80


def ldmatrix(trans: bool, frag: str, frag_at: str, smem: str, at: str, dtype: str) -> str:
    """TVMScript of one ``ldmatrix.x4`` (``.trans``: transposed) into the 8 elements at ``frag[frag_at:]``, this
    lane naming the row at ``smem[at]`` (``emu.h`` states the instruction).  The shared buffer goes by
    ``access_ptr``: passed by ``.data``, TVM retypes a buffer whose other accesses are all 16-byte vectors
    as ``uint4`` and the element offset then lands 8 times too far (the emulator showed it)."""
    return (f'T.evaluate(T.ptx_legacy.ldmatrix({trans}, 4, ".b16", {frag}.data, {frag_at}, {smem}.access_ptr("r"), '
            f'{at}, dtype="{dtype}"))')


def mma(kind: str, a: str, a_at: str, b: str, b_at: str, c: str, c_at: str) -> str:
    """TVMScript of one m16n8k16 ``mma.sync`` of the A fragment at ``a[a_at:]``, the B fragment at ``b[b_at:]``
    into the float32 accumulators at ``c[c_at:]``, on ``kind`` (fp16, bf16) operands."""
    return (f'T.evaluate(T.ptx_legacy.mma("m16n8k16", "row", "col", "{kind}", "{kind}", "fp32", {a}.data, {a_at}, '
            f'{b}.data, {b_at}, {c}.data, {c_at}, False, dtype="float32"))')


def _tile_loads(count: int, threads: int, body: str, indent: str) -> str:
    """TVMScript dealing ``count`` 16-byte vectors of a tile out among ``threads`` threads (vector ``e * threads
    + tx``): ``body`` (lines at one indent past ``indent``) under a loop, guarded where they do not divide."""
    lines = [f"{indent}for e in T.unroll({-(-count // threads)}):"]
    if count % threads:
        lines.append(f"{indent}    if e * {threads} + tx < {count}:")
        body = "\n".join("    " + line for line in body.split("\n"))
    return "\n".join(lines + [body])


def mma_attention(spec, dv, target, *, keys: int = KEYS, warps: int = WARPS):
    """The fused attention ``spec`` in float16 or bfloat16 as one FlashAttention-2-style kernel on tensor
    cores (a scheduled PrimFunc; the module docstring), or None where it does not apply.  ``keys``: keys per
    shared-memory tile (a multiple of 16); ``warps``: warps per workgroup (16 query rows each)."""
    import tvm

    if not has_mma(target) or keys % 16 or warps < 1:
        return None
    KEYS, WARPS = keys, warps  # noqa: N806 - the module's defaults, as the docstring names them
    smem = lambda d, dvv: KEYS * (d + dvv + 2 * PAD) * 2  # noqa: E731
    parts = attention_parts(spec, target, False, smem, dtypes=tuple(_MMA_TYPE))
    if parts is None or parts.d % 16 or parts.dvv % 16:
        return None
    at, d, dvv, LQ, LK, DT = parts.at, parts.d, parts.dvv, parts.LQ, parts.LK, parts.dtype
    kind = _MMA_TYPE[DT]
    rows, threads = 16 * WARPS, 32 * WARPS
    ldk, ldv = d + PAD, dvv + PAD
    NQT = f"(({LQ} + {rows - 1}) // {rows})"
    row = "(r0 + i // 2 * 8)"  # the query row of accumulator element i (i in 0..3)
    key = f"(t * {KEYS} + n * 8 + lq * 2 + i % 2)"  # the key of score element i of tile n
    masks = "\n".join("                    " + m for m in parts.mask_terms("s[n * 4 + i]", key, row))
    kvec = f"(e * {threads} + tx)"  # a thread's 16-byte vector of a tile: key kvec // (d / 8), channels 8 (kvec % (d / 8))
    full = "T.uint32(4294967295)"
    k_loads = _tile_loads(KEYS * d // 8, threads, f"""            for v in T.vectorized(8):
                Ks[{kvec} // {d // 8} * {ldk} + {kvec} % {d // 8} * 8 + v] = {at("K", "bi", "hi", f"T.min(t * {KEYS} + {kvec} // {d // 8}, {LK} - 1)", f"{kvec} % {d // 8} * 8 + v")}""", "        ")
    v_loads = _tile_loads(KEYS * dvv // 8, threads, f"""            for v in T.vectorized(8):
                Vs[{kvec} // {dvv // 8} * {ldv} + {kvec} % {dvv // 8} * 8 + v] = {at("V", "bi", "hi", f"T.min(t * {KEYS} + {kvec} // {dvv // 8}, {LK} - 1)", f"{kvec} % {dvv // 8} * 8 + v")}""", "        ")
    # ldmatrix.x4: lane l names row l % 8 of matrix l / 8 (``ld8``: which 8 of 16, ``ld16``: which pair of tiles)
    k_rows = f"((n2 * 2 + ld16) * 8 + tx % 8) * {ldk} + ks * 16 + ld8 * 8"  # two n-tiles of keys, lo/hi channels
    v_rows = f"(ks * 16 + ld8 * 8 + tx % 8) * {ldv} + (n2 * 2 + ld16) * 8"  # 16 keys (lo/hi), two n-tiles of channels
    body = f"""
    bx = T.launch_thread("blockIdx.x", {NQT} * {parts.H} * {parts.B})
    tx = T.launch_thread("threadIdx.x", {threads})
    Ks = T.alloc_buffer(({KEYS * ldk},), "{DT}", scope="shared")
    Vs = T.alloc_buffer(({KEYS * ldv},), "{DT}", scope="shared")
    qf = T.alloc_buffer(({d // 2},), "{DT}", scope="local")
    bf = T.alloc_buffer((8,), "{DT}", scope="local")
    pf = T.alloc_buffer((8,), "{DT}", scope="local")
    s = T.alloc_buffer(({KEYS // 2},), "float32", scope="local")
    o = T.alloc_buffer(({dvv // 2},), "float32", scope="local")
    mi = T.alloc_buffer((2,), "float32", scope="local")
    li = T.alloc_buffer((2,), "float32", scope="local")
    mt = T.alloc_buffer((2,), "float32", scope="local")
    cr = T.alloc_buffer((2,), "float32", scope="local")
    bh: T.int32 = bx // {NQT}
    bi: T.int32 = bh // {parts.H}
    hi: T.int32 = bh % {parts.H}
    r0: T.int32 = bx % {NQT} * {rows} + tx // 32 * 16 + tx % 32 // 4
    lq: T.int32 = tx % 4
    ld8: T.int32 = tx % 16 // 8
    ld16: T.int32 = tx % 32 // 16
    for ks in T.unroll({d // 16}):
        for i in T.unroll(8):
            qf[ks * 8 + i] = {at("Q", "bi", "hi", f"T.min(r0 + i // 2 % 2 * 8, {LQ} - 1)", "ks * 16 + lq * 2 + i % 2 + i // 4 * 8")}
    for i in T.unroll({dvv // 2}):
        o[i] = T.float32(0)
    for j in T.unroll(2):
        mi[j] = T.float32('-inf')
        li[j] = T.float32(0)
    for t in range(({LK} + {KEYS - 1}) // {KEYS}):
{k_loads}
{v_loads}
        T.tvm_storage_sync("shared")
        for i in T.unroll({KEYS // 2}):
            s[i] = T.float32(0)
        for n2 in T.unroll({KEYS // 16}):
            for ks in T.unroll({d // 16}):
                {ldmatrix(False, "bf", "0", "Ks", k_rows, DT)}
                {mma(kind, "qf", "ks * 8", "bf", "0", "s", "n2 * 8")}
                {mma(kind, "qf", "ks * 8", "bf", "4", "s", "n2 * 8 + 4")}
        for j in T.unroll(2):
            mt[j] = T.float32('-inf')
        for n in T.unroll({KEYS // 8}):
            for i in T.unroll(4):
                if {key} < {LK} and {row} < {LQ}:
                    s[n * 4 + i] = s[n * 4 + i] * T.float32({parts.scale})
{masks}
                else:
                    s[n * 4 + i] = T.float32('-inf')
                mt[i // 2] = T.max(mt[i // 2], s[n * 4 + i])
        for j in T.unroll(2):
            mt[j] = T.max(mt[j], T.tvm_warp_shuffle_xor({full}, mt[j], 1, 32, 32))
            mt[j] = T.max(mt[j], T.tvm_warp_shuffle_xor({full}, mt[j], 2, 32, 32))
            mt[j] = T.max(mi[j], mt[j])
            cr[j] = T.if_then_else(mi[j] == T.float32('-inf'), T.float32(0), T.exp(mi[j] - mt[j]))
            li[j] = li[j] * cr[j]
            mi[j] = mt[j]
        for n in T.unroll({dvv // 8}):
            for i in T.unroll(4):
                o[n * 4 + i] = o[n * 4 + i] * cr[i // 2]
        for n in T.unroll({KEYS // 8}):
            for i in T.unroll(4):
                s[n * 4 + i] = T.if_then_else(s[n * 4 + i] == T.float32('-inf'), T.float32(0), T.exp(s[n * 4 + i] - mi[i // 2]))
                li[i // 2] = li[i // 2] + s[n * 4 + i]
        for ks in T.unroll({KEYS // 16}):
            for i in T.unroll(8):
                pf[i] = T.Cast("{DT}", s[ks * 8 + i])
            for n2 in T.unroll({dvv // 16}):
                {ldmatrix(True, "bf", "0", "Vs", v_rows, DT)}
                {mma(kind, "pf", "0", "bf", "0", "o", "n2 * 8")}
                {mma(kind, "pf", "0", "bf", "4", "o", "n2 * 8 + 4")}
        T.tvm_storage_sync("shared")
    for j in T.unroll(2):
        li[j] = li[j] + T.tvm_warp_shuffle_xor({full}, li[j], 1, 32, 32)
        li[j] = li[j] + T.tvm_warp_shuffle_xor({full}, li[j], 2, 32, 32)
    for n in T.unroll({dvv // 8}):
        for i in T.unroll(4):
            if {row} < {LQ}:
                {at("O", "bi", "hi", row, "n * 8 + lq * 2 + i % 2")} = T.Cast("{DT}", T.if_then_else(li[i // 2] == T.float32(0), T.float32('nan'), o[n * 4 + i] / li[i // 2]))
"""
    return tvm.script.from_source("\n".join(parts.lines) + body)


#: The projection's workgroup tile: ``PM`` rows x ``PN`` columns (warps of 32 x 32), steps of ``PK`` along K.
PM, PN, PK = 64, 64, 32
#: The workgroup tiles ``mma_linear`` takes (``gpu_ab.py`` times each on a GPU).
LINEAR_TILES = ((64, 64), (128, 64), (64, 128), (128, 128))


def mma_linear_applies(spec, target) -> bool:
    """Whether ``mma_linear`` serves ``spec``: a projection (``gpu.kernels.projection_parts``) in float16 or
    bfloat16 throughout, K a multiple of ``PK``, N of 8, at sm_80 or later."""
    parts = projection_parts(spec)
    if parts is None or not has_mma(target):
        return False
    K, N, _, activation = parts
    dtype = str(spec.out_type.dtype)
    return (dtype in _MMA_TYPE and all(str(t.dtype) == dtype for t in spec.in_types) and K % PK == 0
            and N % 8 == 0 and activation_script(activation, "y") is not None)


def mma_linear(spec, dv, target, tile: tuple = (PM, PN)):
    """The projection ``spec`` in float16 or bfloat16 on tensor cores, or None where it does not apply.

    A workgroup of (``tile`` / 32) warps computes a ``tile`` (``PM`` x ``PN``; one of ``LINEAR_TILES``) of the
    output, each warp 32 x 32 of it (2 x 4 m16n8 accumulator tiles, 32 float32 registers a lane); x and W
    stream through shared memory in steps of ``PK`` along K, in 16-byte vectors, rows padded by ``PAD``; the
    fragments come out of it by ``ldmatrix`` (W's transposed: a B fragment is two neighbouring k of one
    column); bias and activation in float32 on the accumulators, rounded once to the storage
    type as they are written.  Rows (x's leading dims, flattened) stay symbolic, read clamped to the last
    row; columns past N (N a multiple of 8, not of ``PN``) read clamped and are not written."""
    import tvm

    if not mma_linear_applies(spec, target) or tuple(tile) not in LINEAR_TILES:
        return None
    PM, PN = tile  # noqa: N806
    K, N, bias, activation = projection_parts(spec)
    DT = str(spec.out_type.dtype)
    kind = _MMA_TYPE[DT]
    head = kernel_header(spec, ["X", "W"] + (["Bias"] if bias else []) + ["O"], [DT] * (len(spec.in_types) + 1))
    if head is None:
        return None
    lines, shapes, _ = head
    lead = [f"T.Cast('int32', {d})" for d in shapes[0][:-1]]
    ld, ldw = PK + PAD, PN + PAD
    threads = 32 * (PM // 32) * (PN // 32)
    vec = f"(e * {threads} + tx)"  # a thread's 16-byte vector of a tile
    row = f"(by * {PM} + wm * 32 + mt * 16 + g + i // 2 * 8)"  # the output row of accumulator element i of tile mt
    col = f"(bx * {PN} + wn * 32 + nt * 8 + lq * 2 + i % 2)"
    x_loads = _tile_loads(PM * PK // 8, threads, f"""            for v in T.vectorized(8):
                Xs[{vec} // {PK // 8} * {ld} + {vec} % {PK // 8} * 8 + v] = X[{flat_row_index(lead, f"T.min(by * {PM} + {vec} // {PK // 8}, M - 1)")}, kt * {PK} + {vec} % {PK // 8} * 8 + v]""", "        ")
    w_loads = _tile_loads(PK * PN // 8, threads, f"""            for v in T.vectorized(8):
                Ws[{vec} // {PN // 8} * {ldw} + {vec} % {PN // 8} * 8 + v] = W[kt * {PK} + {vec} // {PN // 8}, T.min(bx * {PN} + {vec} % {PN // 8} * 8, {N - 8}) + v]""", "        ")
    # ldmatrix.x4: lane l names row l % 8 of matrix l / 8 (``ld8``: which 8 of 16, ``ld16``: which 8 of the pair)
    x_rows = f"(wm * 32 + mt * 16 + ld8 * 8 + tx % 8) * {ld} + kk * 16 + ld16 * 8"  # A: rows lo/hi, k lo/hi
    w_rows = f"(kk * 16 + ld8 * 8 + tx % 8) * {ldw} + wn * 32 + (n2 * 2 + ld16) * 8"  # B: k lo/hi, two n-tiles
    y = f"(acc[(mt * 4 + nt) * 4 + i]{f' + T.Cast({chr(39)}float32{chr(39)}, Bias[{col}])' if bias else ''})"
    body = f"""
    bx = T.launch_thread("blockIdx.x", {-(-N // PN)})
    by = T.launch_thread("blockIdx.y", ({" * ".join(lead)} + {PM - 1}) // {PM})
    tx = T.launch_thread("threadIdx.x", {threads})
    M: T.int32 = {" * ".join(lead)}
    Xs = T.alloc_buffer(({PM * ld},), "{DT}", scope="shared")
    Ws = T.alloc_buffer(({PK * ldw},), "{DT}", scope="shared")
    af = T.alloc_buffer((16,), "{DT}", scope="local")
    bf = T.alloc_buffer((8,), "{DT}", scope="local")
    acc = T.alloc_buffer((32,), "float32", scope="local")
    wm: T.int32 = tx // 32 // {PN // 32}
    wn: T.int32 = tx // 32 % {PN // 32}
    g: T.int32 = tx % 32 // 4
    lq: T.int32 = tx % 4
    ld8: T.int32 = tx % 16 // 8
    ld16: T.int32 = tx % 32 // 16
    for i in T.unroll(32):
        acc[i] = T.float32(0)
    for kt in range({K // PK}):
{x_loads}
{w_loads}
        T.tvm_storage_sync("shared")
        for kk in T.unroll({PK // 16}):
            for mt in T.unroll(2):
                {ldmatrix(False, "af", "mt * 8", "Xs", x_rows, DT)}
            for n2 in T.unroll(2):
                {ldmatrix(True, "bf", "0", "Ws", w_rows, DT)}
                for mt in T.unroll(2):
                    {mma(kind, "af", "mt * 8", "bf", "0", "acc", "(mt * 4 + n2 * 2) * 4")}
                    {mma(kind, "af", "mt * 8", "bf", "4", "acc", "(mt * 4 + n2 * 2 + 1) * 4")}
        T.tvm_storage_sync("shared")
    for mt in T.unroll(2):
        for nt in T.unroll(4):
            for i in T.unroll(4):
                if {row} < M and {col} < {N}:
                    O[{flat_row_index(lead, row)}, {col}] = T.Cast("{DT}", {activation_script(activation, y)})
"""
    return tvm.script.from_source("\n".join(lines) + body)
