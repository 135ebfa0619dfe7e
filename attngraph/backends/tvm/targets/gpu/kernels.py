"""Hand-written GPU kernels for cuda and for the vulkan target's WGSL path: the fused attention in the
flash-attention style (and its few-rows form), and the projection (``linear``) as a register-tiled SIMT
matmul; the parts of a kernel's TVMScript that cuda's tensor-core kernels share with them.

dlight has no rule for a whole attention (a matmul, masks, a softmax and a second matmul in one
PrimFunc): its Fallback rule makes four kernels, one thread per output, with the full
(batch, heads, Lq, Lk) score matrix in global memory.  ``flash_attention`` is one kernel instead:

- one workgroup of ``BQ`` threads per (batch, head, tile of ``BQ`` query rows), one thread per row,
  its query row, its output accumulator and the scores of one key tile in registers (every loop over
  them unrolled: an array indexed by a loop variable would live in local memory);
- the keys and values stream through shared memory in tiles of ``BK`` rows, loaded by the whole
  workgroup together; the scores of a tile are computed four head-dim elements at a time across all
  ``BK`` keys (``BK`` independent multiply-add chains; four-wide shared reads);
- the softmax is online (running maximum and sum, the accumulator rescaled once per tile), so the
  score matrix never exists in memory: memory traffic is O(L·d), not O(L²).

Masks (additive, keep, drop; any shape that broadcasts to the scores) and the scale are applied to
each score exactly as the generic lowering does, and a row whose every score is masked comes out
NaN, as in the interpreter.  All dims but the head sizes stay symbolic: one kernel serves every
batch and length.  float32, float16 or bfloat16 (read into float32 registers), head sizes up to 128
(up to 64 in registers at sm_90: 247 of them, no spills; beyond, ptxas spills some); anything else
returns None (the generic kernel serves it).  It uses CUDA cores; on cuda a half-precision attention
whose heads are multiples of 16 goes to tensor cores instead (``targets/cuda/tensor_cores.py``).

Written in TVMScript as plain loops over thread indices (``T.launch_thread``), as one would write CUDA.
TVM 0.27 miscompiles a Bind (``v: T.int32 = ...``) inside a vectorized or unrolled loop (every lane
gets lane 0's value; a Bind repeated by unrolling read stale values in WGSL), so inside those loops
every index is written out in full.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple

from .....ir.fused import MaskOps, OperandView, apply_masks, attention_views

#: Query rows per workgroup (one thread each) and keys per shared-memory tile.
BQ = 64
BK = 16
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


def _f32(value: float) -> str:
    """TVMScript for the float32 constant ``value`` (-inf included)."""
    value = float(value)
    return f"T.float32({str(value)!r})" if value in (float("inf"), float("-inf")) else f"T.float32({value!r})"


def kernel_header(spec, bufs: list, dtypes: list):
    """The TVMScript head of a kernel on ``spec``'s operands then result, as buffers named ``bufs`` stored
    in ``dtypes``: (lines declaring the function, a ``T.int64()`` per symbolic dim and a ``match_buffer``
    per buffer; each buffer's dims as TVMScript; {dim name: its variable}), or None where a dim is neither
    an int nor a plain name."""
    names: dict = {}
    shapes = []
    for t in list(spec.in_types) + [spec.out_type]:
        dims = [_dim(x, names) for x in t.shape]
        if any(x is None for x in dims):
            return None
        shapes.append(dims)
    params = [f"{buf.lower()}_h" for buf in bufs]
    lines = [
        "@T.prim_func",
        f"def main({', '.join(f'{p}: T.handle' for p in params)}):",
        "    T.func_attr({'global_symbol': 'main', 'tirx.noalias': True, 'tirx.is_scheduled': True})",
    ]
    lines += [f"    {var} = T.int64()" for var in names.values()]
    lines += [f"    {buf} = T.match_buffer({p}, ({', '.join(s)},), '{dt}')"
              for buf, p, s, dt in zip(bufs, params, shapes, dtypes)]
    return lines, shapes, names


class AttentionParts(NamedTuple):
    """What the attention kernels need of a ``fused_attention`` spec (``attention_parts``)."""
    lines: list  # the TVMScript function head (``kernel_header``)
    at: Callable  # (buffer, batch, head, seq, channel) index expressions -> TVMScript access of Q, K, V or O
    mask_terms: Callable  # (score, key, row) -> statements applying every mask to the float32 ``score``
    B: str
    H: str
    LQ: str
    LK: str
    d: int
    dvv: int
    scale: str
    dtype: str  # the type Q, K, V and O are stored in

    def load(self, *access) -> str:
        """``at(*access)`` read as float32."""
        read = self.at(*access)
        return read if self.dtype == "float32" else f"T.Cast('float32', {read})"

    def store(self, value: str) -> str:
        """The float32 expression ``value`` as the stored type."""
        return value if self.dtype == "float32" else f"T.Cast('{self.dtype}', {value})"


#: The float types of an additive mask (read as float32).
_FLOATS = ("float32", "float16", "bfloat16")


def attention_parts(spec, target, narrow_bool: bool, shared_bytes: Callable,
                     dtypes: tuple = _FLOATS) -> AttentionParts | None:
    """The parts of a GPU kernel for the fused attention ``spec``, or None where the hand kernels do
    not apply (Q, K, V and the result of one type of ``dtypes``, head sizes up to ``MAX_HEAD``, dims an
    int or a plain name, masks of rank up to 4 broadcasting to the scores, ``shared_bytes(d, dv)``
    within the target's shared memory)."""
    if spec.op != "fused_attention":
        return None
    q, k, v = spec.in_types[:3]
    masks = spec.in_types[3:]
    kinds = list(spec.attrs.get("mask_kinds", ()))
    layout = spec.attrs.get("layout", "bhsd")
    dtype = str(spec.out_type.dtype)
    if dtype not in dtypes or any(str(t.dtype) != dtype for t in (q, k, v)) or len(kinds) != len(masks):
        return None
    out = spec.out_type.shape
    b, lq, h, dvv = out if layout == "bshd" else (out[0], out[2], out[1], out[3])
    lk, d = k.shape[1 if layout == "bshd" else 2], q.shape[3]
    # each operand's layout, broadcast batch or head axis and head window (``ir.fused.OperandView``)
    views = dict(zip("QKV", attention_views(spec.in_types, spec.out_type, spec.attrs)))
    if not (isinstance(d, int) and isinstance(dvv, int) and 0 < d <= MAX_HEAD and 0 < dvv <= MAX_HEAD):
        return None
    limit = target.attrs.get("max_shared_memory_per_block")
    if limit is not None and shared_bytes(d, dvv) > int(limit):
        return None
    if any(len(t.shape) > 4 for t in masks) or any(kind == "additive" and str(t.dtype) not in _FLOATS
                                                   for t, kind in zip(masks, kinds)):
        return None
    mask_dtypes = [("int32" if narrow_bool and str(t.dtype) == "bool" else str(t.dtype)) for t in masks]
    bufs = ["Q", "K", "V"] + [f"M{i}" for i in range(len(masks))] + ["O"]
    head = kernel_header(spec, bufs, [dtype] * 3 + mask_dtypes + [dtype])
    if head is None:
        return None
    lines, shapes, names = head
    B, H, LQ, LK = (f"T.Cast('int32', {_dim(x, names)})" for x in (b, h, lq, lk))
    out_view = OperandView(layout, False, False, 0)

    def at(buf: str, bi: str, hi: str, si: str, ci: str) -> str:
        index = views.get(buf, out_view).index(bi, hi, si, ci, add=lambda a, o: f"{a} + {o}",
                                               div=lambda a, g: f"T.truncdiv({a}, {g})")  # a head index: >= 0
        return f"{buf}[{', '.join(map(str, index))}]"

    ops = MaskOps(lambda a, m: f"{a} + {m}", lambda c, a, b: f"T.if_then_else({c}, {a}, {b})",
                  _f32, (lambda m: f"{m} != 0") if narrow_bool else (lambda m: m))

    def mask_terms(score: str, key: str, row: str = "row") -> list:
        """The statement applying every mask, read at (batch ``bi``, head ``hi``, query ``row``, ``key``),
        broadcast NumPy-style, to the float32 ``score`` (none without masks)."""
        reads = [f"M{i}[{', '.join('0' if x == 1 else n for x, n in zip(t.shape, ['bi', 'hi', row, key][4 - len(t.shape):]))}]"
                 for i, t in enumerate(masks)]
        reads = [f"T.Cast('float32', {r})" if kind == "additive" and str(t.dtype) != "float32" else r
                 for r, t, kind in zip(reads, masks, kinds)]
        return [f"{score} = {apply_masks(score, reads, spec.attrs, ops)}"] if reads else []

    return AttentionParts(lines, at, mask_terms, B, H, LQ, LK, d, dvv, repr(float(spec.attrs.get("scale", 1.0))), dtype)


def flash_attention(spec, dv, target, *, narrow_bool: bool = False, unroll: bool = True, key_tile: int = BK):
    """The fused attention ``spec`` as one flash-style GPU kernel (a scheduled PrimFunc), or None
    where it does not apply.  ``narrow_bool``: bool masks are stored as int32 (the WGSL path).
    ``unroll=False`` leaves the loops over keys and head dims as loops (the WGSL path: lavapipe's
    shader compiler takes 45 s over the unrolled kernel at head dim 64, 0.5 s over the loops; a GPU
    driver's compiler unrolls such loops itself).  ``key_tile``: keys per shared-memory tile (``BK``)."""
    import tvm

    parts = attention_parts(spec, target, narrow_bool, lambda d, dvv: key_tile * (d + dvv) * 4)
    if parts is None:
        return None
    lines, at, _, B, H, LQ, LK, d, dvv, scale, _ = parts
    load = parts.load
    mask_terms = parts.mask_terms("st[j]", f"t * {key_tile} + j")
    U = "T.unroll" if unroll else "T.serial"
    NQT = f"(({LQ} + {BQ - 1}) // {BQ})"  # query tiles per (batch, head)
    d_tail = "" if d % 4 == 0 else f"""        for j in {U}({key_tile}):
            for c in {U}({d % 4}):
                st[j] = st[j] + qr[{d - d % 4} + c] * Ks[j * {d} + {d - d % 4} + c]"""
    body = f"""
    bx = T.launch_thread("blockIdx.x", {NQT} * {H} * {B})
    tx = T.launch_thread("threadIdx.x", {BQ})
    Ks = T.alloc_buffer(({key_tile * d},), "float32", scope="shared")
    Vs = T.alloc_buffer(({key_tile * dvv},), "float32", scope="shared")
    qr = T.alloc_buffer(({d},), "float32", scope="local")
    acc = T.alloc_buffer(({dvv},), "float32", scope="local")
    st = T.alloc_buffer(({key_tile},), "float32", scope="local")
    mi = T.alloc_buffer((1,), "float32", scope="local")
    li = T.alloc_buffer((1,), "float32", scope="local")
    tmax = T.alloc_buffer((1,), "float32", scope="local")
    bh: T.int32 = bx // {NQT}
    bi: T.int32 = bh // {H}
    hi: T.int32 = bh % {H}
    row: T.int32 = bx % {NQT} * {BQ} + tx
    for c in {U}({d}):
        qr[c] = T.if_then_else(row < {LQ}, {load("Q", "bi", "hi", f"T.min(row, {LQ} - 1)", "c")}, T.float32(0))
    for c in {U}({dvv}):
        acc[c] = T.float32(0)
    mi[0] = T.float32('-inf')
    li[0] = T.float32(0)
    for t in range(({LK} + {key_tile - 1}) // {key_tile}):
        for e in range({-(-key_tile * d // BQ)}):
            if e * {BQ} + tx < {key_tile * d}:
                Ks[e * {BQ} + tx] = T.if_then_else(t * {key_tile} + (e * {BQ} + tx) // {d} < {LK}, {load("K", "bi", "hi", f"T.min(t * {key_tile} + (e * {BQ} + tx) // {d}, {LK} - 1)", f"(e * {BQ} + tx) % {d}")}, T.float32(0))
        for e in range({-(-key_tile * dvv // BQ)}):
            if e * {BQ} + tx < {key_tile * dvv}:
                Vs[e * {BQ} + tx] = T.if_then_else(t * {key_tile} + (e * {BQ} + tx) // {dvv} < {LK}, {load("V", "bi", "hi", f"T.min(t * {key_tile} + (e * {BQ} + tx) // {dvv}, {LK} - 1)", f"(e * {BQ} + tx) % {dvv}")}, T.float32(0))
        T.tvm_storage_sync("shared")
        for j in {U}({key_tile}):
            st[j] = T.float32(0)
        for c4 in {U}({d // 4}):
            for j in {U}({key_tile}):
                for c in {U}(4):
                    st[j] = st[j] + qr[c4 * 4 + c] * Ks[j * {d} + c4 * 4 + c]
{d_tail}
        tmax[0] = T.float32('-inf')
        for j in {U}({key_tile}):
            if t * {key_tile} + j < {LK} and row < {LQ}:
                st[j] = st[j] * T.float32({scale})
{chr(10).join("                " + m for m in mask_terms)}
            else:
                st[j] = T.float32('-inf')
            tmax[0] = T.max(tmax[0], st[j])
        mnew: T.float32 = T.max(mi[0], tmax[0])
        corr: T.float32 = T.if_then_else(mi[0] == T.float32('-inf'), T.float32(0), T.exp(mi[0] - mnew))
        li[0] = li[0] * corr
        for c in {U}({dvv}):
            acc[c] = acc[c] * corr
        for j in {U}({key_tile}):
            st[j] = T.if_then_else(st[j] == T.float32('-inf'), T.float32(0), T.exp(st[j] - mnew))
            li[0] = li[0] + st[j]
        for j in {U}({key_tile}):
            for c in {U}({dvv}):
                acc[c] = acc[c] + st[j] * Vs[j * {dvv} + c]
        mi[0] = mnew
        T.tvm_storage_sync("shared")
    if row < {LQ}:
        for c in {U}({dvv}):
            {at("O", "bi", "hi", "row", "c")} = {parts.store("T.if_then_else(li[0] == T.float32(0), T.float32('nan'), acc[c] / li[0])")}
"""
    source = "\n".join(lines) + body
    return tvm.script.from_source(source)


#: Threads of ``decode_attention``'s workgroup: the keys are dealt out among them.
DT = 32


def decode_attention(spec, dv, target, *, narrow_bool: bool = False):
    """The fused attention ``spec`` for a few query rows (a decode step: ``plan.FEW_ROWS``), or None
    where it does not apply.  ``flash_attention`` gives each query row one thread, so at one row per
    (batch, head) a workgroup of 64 threads has one at work walking every key; here a workgroup of
    ``DT`` threads serves one query row, each thread an online softmax over every ``DT``-th key (its
    own maximum, sum and accumulator), and the ``DT`` partial results are combined through shared
    memory: each thread then writes ``dv / DT`` output channels.  Same semantics (masks, scale, a
    fully masked row NaN) as ``flash_attention``."""
    import tvm

    parts = attention_parts(spec, target, narrow_bool, lambda d, dvv: DT * (dvv + 2) * 4)
    if parts is None:
        return None
    at, load, d, dvv, LQ, LK = parts.at, parts.load, parts.d, parts.dvv, parts.LQ, parts.LK
    key = f"t * {DT} + tx"
    terms = "\n".join("            " + m for m in parts.mask_terms("sc[0]", key))
    body = f"""
    bx = T.launch_thread("blockIdx.x", {LQ} * {parts.H} * {parts.B})
    tx = T.launch_thread("threadIdx.x", {DT})
    Sm = T.alloc_buffer(({DT},), "float32", scope="shared")
    Sl = T.alloc_buffer(({DT},), "float32", scope="shared")
    Sa = T.alloc_buffer(({DT * dvv},), "float32", scope="shared")
    qr = T.alloc_buffer(({d},), "float32", scope="local")
    acc = T.alloc_buffer(({dvv},), "float32", scope="local")
    sc = T.alloc_buffer((1,), "float32", scope="local")
    mi = T.alloc_buffer((1,), "float32", scope="local")
    mn = T.alloc_buffer((1,), "float32", scope="local")
    cr = T.alloc_buffer((1,), "float32", scope="local")  # a rescaling factor
    li = T.alloc_buffer((1,), "float32", scope="local")
    num = T.alloc_buffer((1,), "float32", scope="local")
    den = T.alloc_buffer((1,), "float32", scope="local")
    bh: T.int32 = bx // {LQ}
    bi: T.int32 = bh // {parts.H}
    hi: T.int32 = bh % {parts.H}
    row: T.int32 = bx % {LQ}
    for c in range({d}):
        qr[c] = {load("Q", "bi", "hi", "row", "c")}
    for c in range({dvv}):
        acc[c] = T.float32(0)
    mi[0] = T.float32('-inf')
    li[0] = T.float32(0)
    for t in range(({LK} + {DT - 1}) // {DT}):
        if {key} < {LK}:
            sc[0] = T.float32(0)
            for c in range({d}):
                sc[0] = sc[0] + qr[c] * {load("K", "bi", "hi", key, "c")}
            sc[0] = sc[0] * T.float32({parts.scale})
{terms}
            if sc[0] != T.float32('-inf'):
                mn[0] = T.max(mi[0], sc[0])
                cr[0] = T.if_then_else(mi[0] == T.float32('-inf'), T.float32(0), T.exp(mi[0] - mn[0]))
                sc[0] = T.exp(sc[0] - mn[0])
                li[0] = li[0] * cr[0] + sc[0]
                for c in range({dvv}):
                    acc[c] = acc[c] * cr[0] + sc[0] * {load("V", "bi", "hi", key, "c")}
                mi[0] = mn[0]
    Sm[tx] = mi[0]
    Sl[tx] = li[0]
    for c in range({dvv}):
        Sa[tx * {dvv} + c] = acc[c]
    T.tvm_storage_sync("shared")
    mn[0] = T.float32('-inf')
    for i in range({DT}):
        mn[0] = T.max(mn[0], Sm[i])
    for e in range({-(-dvv // DT)}):
        if e * {DT} + tx < {dvv}:
            num[0] = T.float32(0)
            den[0] = T.float32(0)
            for i in range({DT}):  # (no shared read in a condition: TVM's sync analysis refuses it)
                cr[0] = T.if_then_else(Sm[i] == T.float32('-inf'), T.float32(0), T.exp(Sm[i] - mn[0]))
                num[0] = num[0] + Sa[i * {dvv} + e * {DT} + tx] * cr[0]
                den[0] = den[0] + Sl[i] * cr[0]
            {at("O", "bi", "hi", "row", f"e * {DT} + tx")} = {parts.store("T.if_then_else(den[0] == T.float32(0), T.float32('nan'), num[0] / den[0])")}
"""
    return tvm.script.from_source("\n".join(parts.lines) + body)


# -- the projection: x (..., K) @ W (K, N) + bias, activation -------------------------------------

#: The K step of ``linear``.
TK = 8
#: A thread's register tile: 8 rows x 8 columns, the columns in two groups of 4 half a tile apart.
TM = TN = 8


def activation_script(kind: str, v: str) -> str | None:
    """TVMScript for activation ``kind`` of the float32 expression ``v`` (as ``lower.elementwise.ACTIVATIONS``)."""
    import math
    f = lambda c: f"T.float32({float(c)!r})"  # noqa: E731
    if kind == "none":
        return v
    if kind == "relu":
        return f"T.max({v}, T.float32(0))"
    if kind == "gelu":
        return f"{f(0.5)} * {v} * ({f(1.0)} + T.erf({v} * {f(1 / math.sqrt(2.0))}))"
    if kind == "gelu_tanh":
        return (f"{f(0.5)} * {v} * ({f(1.0)} + T.tanh({f(math.sqrt(2.0 / math.pi))} * "
                f"({v} + {f(0.044715)} * {v} * {v} * {v})))")
    return None


def flat_row_index(lead: list, r: str) -> str:
    """The leading indices of flat row ``r`` of an operand whose leading dims are ``lead`` (row-major)."""
    idx = []
    for i in range(len(lead)):
        stride = " * ".join(lead[i + 1:])
        v = f"T.truncdiv({r}, {stride})" if stride else r
        idx.append(f"T.truncmod({v}, {lead[i]})" if i else v)
    return ", ".join(idx)


def projection_parts(spec) -> tuple | None:
    """(K, N, has bias, activation) of a projection ``spec`` (``linear`` with or without bias, or a ``matmul``
    by a 2-D weight of static shape), or None where ``spec`` is not one."""
    if len(spec.in_types) not in {"matmul": (2,), "linear": (2, 3)}.get(spec.op, ()):
        return None
    x, w = spec.in_types[0], spec.in_types[1]
    if not (w.rank == 2 and x.rank >= 2 and all(isinstance(d, int) for d in w.shape) and x.shape[-1] == w.shape[0]):
        return None
    activation = spec.attrs.get("activation", "none") if spec.op == "linear" else "none"
    return w.shape[0], w.shape[1], len(spec.in_types) == 3, activation


def linear_tile(n: int) -> tuple:
    """Output rows x columns per workgroup of ``linear`` for N output columns (each thread computes
    8 x 8 of them).  128 x 128 (256 threads) reads the least per multiply-add; at N below 1024 it
    leaves too few workgroups to fill a GPU's SMs (N 512 at 4096 rows: 128 of them on 132 SMs, one
    each), so those take 64 x 64 (64 threads): four times as many.  Not measured on a GPU yet:
    ``bench/gpu_ab.py`` times every tile there."""
    return (128, 128) if n >= 1024 else (64, 64)


def linear_applies(spec, target, tile: tuple | None = None) -> bool:
    """Whether ``linear`` serves ``spec``: x (..., K) @ W (K, N) (+ bias, activation), float32, static K
    a multiple of ``TK``, N of 4, a tile whose loads divide evenly among its threads."""
    parts = projection_parts(spec)
    if parts is None or any(str(t.dtype) != "float32" for t in list(spec.in_types) + [spec.out_type]):
        return False
    K, N, _, activation = parts
    bm, bn = tile or linear_tile(N)
    if activation_script(activation, "y") is None or K % TK or N % 4 or bm % TM or bn % TN:
        return False
    nt = (bn // TN) * (bm // TM)
    return (bm * TK // 4) % nt == 0 and (TK * bn // 4) % nt == 0 and nt <= int(target.attrs.get("max_num_threads", 1024))


def linear(spec, dv, target, tile: tuple | None = None):
    """The projection ``spec`` (``linear`` with or without bias, or a ``matmul`` by a 2-D weight) as
    one register-tiled GPU kernel, or None where it does not apply.

    The classic SIMT SGEMM: a workgroup of (BM/8) x (BN/8) threads computes a BM x BN tile of the
    output, each thread 8 x 8 outputs in registers (rows ``ty*8 + i``, columns ``tx*4 + j`` and
    ``BN/2 + tx*4 + j``: four-wide reads of shared memory without bank conflicts); x and W stream
    through shared memory in steps of ``TK`` along K, x transposed (so a thread's 8 rows are two
    four-wide reads), the next step loaded into registers from global memory while this one is
    computed; bias and activation in the write back.  64 multiply-adds per 4 four-wide shared reads.
    Rows (the leading dims of x, flattened) stay symbolic: reads past the last row are clamped to it
    and only the write back is predicated.  float32, K a multiple of ``TK`` and of 4, N a multiple
    of 4, so every global access is four-wide."""
    import tvm

    if not linear_applies(spec, target, tile):
        return None
    K, N, bias, activation = projection_parts(spec)
    bm, bn = tile or linear_tile(N)
    tx_n, ty_n = bn // TN, bm // TM
    nt = tx_n * ty_n
    a_loads, b_loads = bm * TK // 4, TK * bn // 4  # four-wide loads per K step
    la, lb = a_loads // nt, b_loads // nt
    head = kernel_header(spec, ["X", "W"] + (["Bias"] if bias else []) + ["O"], ["float32"] * (len(spec.in_types) + 1))
    if head is None:
        return None
    lines, shapes, _ = head
    lead = [f"T.Cast('int32', {d})" for d in shapes[0][:-1]]
    rows = " * ".join(lead)  # M: x's leading dims flattened
    row_index = lambda r: flat_row_index(lead, r)  # noqa: E731

    pad = bm + 4  # the transposed x tile's row length: the four stores of a thread hit different banks
    full_n = N % bn == 0

    def col(n: str) -> str:
        return n if full_n else f"T.min({n}, {N - 1})"

    # no Binds inside vectorized or unrolled loops (module docstring)
    n_load = f"bx * {bn} + ((e * {nt} + tx) % {bn // 4}) * 4 + v"  # the W column a thread loads
    n_out = f"(bx * {bn} + h * {bn // 2} + tc * 4 + j)"  # the output column it writes
    y = f"(acc[i * {TN} + h * 4 + j]{f' + Bias[{n_out}]' if bias else ''})"
    act = activation_script(activation, y)
    body = f"""
    bx = T.launch_thread("blockIdx.x", {-(-N // bn)})
    by = T.launch_thread("blockIdx.y", ({rows} + {bm - 1}) // {bm})
    tx = T.launch_thread("threadIdx.x", {nt})
    M: T.int32 = {rows}
    As = T.alloc_buffer(({TK * pad},), "float32", scope="shared")
    Bs = T.alloc_buffer(({TK * bn},), "float32", scope="shared")
    ra = T.alloc_buffer(({4 * la},), "float32", scope="local")
    rb = T.alloc_buffer(({4 * lb},), "float32", scope="local")
    acc = T.alloc_buffer(({TM * TN},), "float32", scope="local")
    av = T.alloc_buffer(({TM},), "float32", scope="local")
    bv = T.alloc_buffer(({TN},), "float32", scope="local")
    ty: T.int32 = tx // {tx_n}
    tc: T.int32 = tx % {tx_n}
    for i in T.unroll({TM * TN}):
        acc[i] = T.float32(0)
    for kt in range({K // TK + 1}):
        if kt > 0:
            for e in T.unroll({la}):
                for v in T.unroll(4):
                    As[(((e * {nt} + tx) % {TK // 4}) * 4 + v) * {pad} + (e * {nt} + tx) // {TK // 4}] = ra[e * 4 + v]
            for e in T.unroll({lb}):
                for v in T.vectorized(4):
                    Bs[((e * {nt} + tx) // {bn // 4}) * {bn} + ((e * {nt} + tx) % {bn // 4}) * 4 + v] = rb[e * 4 + v]
            T.tvm_storage_sync("shared")
        if kt < {K // TK}:
            for e in T.unroll({la}):
                for v in T.vectorized(4):
                    ra[e * 4 + v] = X[{row_index(f"T.min(by * {bm} + (e * {nt} + tx) // {TK // 4}, M - 1)")}, kt * {TK} + ((e * {nt} + tx) % {TK // 4}) * 4 + v]
            for e in T.unroll({lb}):
                for v in T.vectorized(4):
                    rb[e * 4 + v] = W[kt * {TK} + (e * {nt} + tx) // {bn // 4}, {col(n_load)}]
        if kt > 0:
            for k in T.unroll({TK}):
                for h in T.unroll({TM // 4}):
                    for i in T.vectorized(4):
                        av[h * 4 + i] = As[k * {pad} + ty * {TM} + h * 4 + i]
                for h in T.unroll(2):
                    for j in T.vectorized(4):
                        bv[h * 4 + j] = Bs[k * {bn} + h * {bn // 2} + tc * 4 + j]
                for i in T.unroll({TM}):
                    for j in T.unroll({TN}):
                        acc[i * {TN} + j] = acc[i * {TN} + j] + av[i] * bv[j]
            T.tvm_storage_sync("shared")
    for i in T.unroll({TM}):
        if by * {bm} + ty * {TM} + i < M:
            for h in T.unroll(2):
                for j in T.{"vectorized" if full_n else "unroll"}(4):
                    {"" if full_n else f"if {n_out} < {N}:"}
                    {"" if full_n else "    "}O[{row_index(f"by * {bm} + ty * {TM} + i")}, {n_out}] = {act}
"""
    source = "\n".join(lines) + body
    return tvm.script.from_source(source)
