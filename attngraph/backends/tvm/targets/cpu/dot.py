"""bfloat16 products on the CPU's bfloat16 dot-product instruction, AVX512_BF16's ``vdpbf16ps`` (Zen 4, Cooper Lake,
Sapphire Rapids and later): each of its 16 float32 lanes adds the products of one pair of bfloat16 values of each
operand, so one instruction does 32 multiply-adds where a float32 FMA does 16.

The weights are packed once, when they are bound, in panels whose K values go in pairs (``pack_panels(interleave=2)``:
(ceil(N/16), K/2, 16, 2)): one 64-byte row of a panel is the 16 columns' pairs, the instruction's second operand as
it is.  The first is one pair of x's row broadcast to the 16 lanes.  The kernel (``dense_bf16``) is the dense
projection's loop nest (column tiles in parallel, register tiles of rows x columns, bias and activation in the write
back) with its innermost 16 columns x 2 K values replaced by the instruction (``tensorize``); over a weight known
only when it runs (a training step's), each worker packs its column tile's pair panels first.  The weight gradient
(``weight_grad_bf16``) pairs the positions instead; the fused attention (``attention.attention(dot=True)``) pairs K's
head dim for Q K^T and V's keys for P V (``tensorized``).

TIR cannot spell the instruction's ``<32 x bfloat>`` operands (TVM widens bfloat16 loads to float32), so a small
LLVM function does (``LLVM_FUNCTION``), linked into the kernel's module (``pragma_import_llvm``) and inlined: it takes
the operands as ``<16 x i32>`` (the kernel reads the bfloat16 buffers through int32 views of them) and bitcasts them.
Compiling it for a CPU without AVX512_BF16 stops the process inside LLVM, so the kernel rows ask for it only where
the tiles say the CPU has it (``tiles.bf16_dot``: ``tiles.cpu_tiles`` asks LLVM whether the target has it).

Numerics: each lane adds its two products to the accumulator in turn, each rounded to float32 (exactly as a float32
FMA loop over bfloat16 values would, but for the order of the K loop), and the instruction flushes denormals.
"""

from __future__ import annotations

import functools

from tvm import s_tir, te, tirx

from .....ir import TensorType
from ...lower.elementwise import ACTIVATIONS
from ...shapes import DimVars
from .fastmath import fast_math
from .schedule import MAX_STACK_PANEL_BYTES, i64, positions, read_index, register_tiles, unravel
from .ops import INT8_GROUP
from .tiles import BF16_GROUP, PANEL_WIDTH

LANES = PANEL_WIDTH  # float32 lanes of a zmm register: one panel's columns
BF16, F32 = "bfloat16", "float32"
LOCAL = "local"  # the accumulators' scope (a name: a string in an annotation reads as a type to linters)
HELPER = "attngraph_dpbf16ps"
_INTRIN = "attngraph_dpbf16ps_16x2"

LLVM_FUNCTION = f"""
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
define internal <16 x float> @{HELPER}(<16 x float> %c, <16 x i32> %a, <16 x i32> %b) #0 {{
  %x = bitcast <16 x i32> %a to <32 x bfloat>
  %y = bitcast <16 x i32> %b to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %c, <32 x bfloat> %x, <32 x bfloat> %y)
  ret <16 x float> %r
}}
attributes #0 = {{ alwaysinline nounwind readnone "target-features"="+avx512f,+avx512bf16" }}
"""


@functools.cache
def _intrin(weights: str = "global") -> str:
    """The tensor intrinsic: c[i] += a[0] b[i, 0] + a[1] b[i, 1] over 16 lanes, b in memory scope ``weights`` (the
    bound panels', or a worker's own packed ones on its stack: "local"); registered once each."""
    name = f"{_INTRIN}_{weights}"
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((BF16_GROUP,), BF16, offset_factor=1),
             b: T.Buffer((LANES, BF16_GROUP), BF16, offset_factor=1, scope=weights),
             c: T.Buffer((LANES,), F32, offset_factor=1, scope=LOCAL)):
        with T.sblock("root"):
            T.reads(c[0:LANES], a[0:BF16_GROUP], b[0:LANES, 0:BF16_GROUP])
            T.writes(c[0:LANES])
            for i, k in T.grid(LANES, BF16_GROUP):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    c[vi] = c[vi] + T.Cast(F32, a[vk]) * T.Cast(F32, b[vi, vk])

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((BF16_GROUP,), BF16, offset_factor=BF16_GROUP),
             b: T.Buffer((LANES, BF16_GROUP), BF16, offset_factor=BF16_GROUP, scope=weights),
             c: T.Buffer((LANES,), F32, offset_factor=1, scope=LOCAL)):
        with T.sblock("root"):
            T.reads(c[0:LANES], a[0:BF16_GROUP], b[0:LANES, 0:BF16_GROUP])
            T.writes(c[0:LANES])
            pair = T.decl_buffer((1,), "int32", data=a.data, elem_offset=a.elem_offset // BF16_GROUP)
            pairs = T.decl_buffer((LANES,), "int32", data=b.data, elem_offset=b.elem_offset // BF16_GROUP)
            # (the ramps inline: a ramp bound to a name would be a local buffer, its loads gathers)
            c[T.ramp(T.int64(0), T.int64(1), LANES)] = T.call_pure_extern(
                f"float32x{LANES}", HELPER, c[T.ramp(T.int64(0), T.int64(1), LANES)],
                T.broadcast(pair[0], LANES), pairs[T.ramp(T.int64(0), T.int64(1), LANES)])

    TensorIntrin.register(name, desc, impl)
    return name



def dense_bf16(in_types, out_type: TensorType, dim_vars: DimVars, *, bias: bool, activation: str,
               tile: tuple) -> tirx.PrimFunc:
    """activation(x @ W [+ b]) for bfloat16 x (..., K) and W in pair panels (ceil(N/16), K/2, 16, 2), accumulated in
    float32, rounded to bfloat16 once, as it is written.  Column tiles of ``tile`` = (rows, columns) in parallel;
    each row block's accumulators (rows x columns / 16 registers) take one ``vdpbf16ps`` per row and panel per
    pair of K.  M (the leading dims, symbolic) is padded to whole row tiles with clamped reads and N to whole
    column tiles (reads past the last panel clamped), as the float32 kernel does (``kernels.dense``).

    W may also be a plain (K, N) weight known only when the kernel runs (a training step's, cast from its float32
    master copy): each column tile's pair panels are then packed by the worker first, on its stack."""
    rows, columns = tile
    x_t, w_t = in_types[0], in_types[1]
    lead = dim_vars.shape(x_t.shape[:-1])
    M = positions(lead)
    N = out_type.shape[-1]
    packed = w_t.rank == 4
    if packed:
        panels, pairs, width, group = (int(s) for s in w_t.shape)
        assert width == LANES and group == BF16_GROUP, w_t
    else:
        panels, pairs = -(-N // LANES), int(w_t.shape[0]) // BF16_GROUP
    assert pairs > 1 and columns % LANES == 0, (w_t, tile)
    K = pairs * BF16_GROUP
    n_pad = (N + columns - 1) // columns * columns
    on_stack = not packed and K * columns * 2 <= MAX_STACK_PANEL_BYTES  # a worker's own panels
    X = te.placeholder((M, i64(K)), BF16, name="in0")
    B = te.placeholder((i64(N),), BF16, name="in2") if bias else None
    if packed:
        W = panels_of = te.placeholder((i64(panels), i64(pairs), i64(LANES), i64(BF16_GROUP)), BF16, name="in1")
    else:  # packed per call: (panels, K/2, 16, 2), the columns past N clamped (never written back)
        W = te.placeholder((i64(K), i64(N)), BF16, name="in1")
        panels_of = te.compute((i64(panels), i64(pairs), i64(LANES), i64(BF16_GROUP)), lambda p, q, c, j: W[
            q * BF16_GROUP + j, tirx.min(p * LANES + c, i64(N - 1))], name="packed")
    k = te.reduce_axis((0, i64(pairs)), name="k")
    kk = te.reduce_axis((0, i64(BF16_GROUP)), name="kk")

    acc = te.compute((M + (rows - 1), i64(n_pad)), lambda m, n: te.sum(
        X[tirx.min(m, M - 1), k * BF16_GROUP + kk].astype(F32)
        * panels_of[_panel(n, panels, n_pad), k, n % LANES, kk].astype(F32), axis=[k, kk]), name="acc")
    act = ACTIVATIONS[activation]
    out = te.compute((M, i64(N)), lambda m, n: act(acc[m, n] + B[n].astype(F32) if bias else acc[m, n]).astype(BF16),
                     name="out")
    sch = s_tir.Schedule(te.create_prim_func([X, W] + ([B] if bias else []) + [out]))
    no, an, ak = _tiled(sch, rows, columns)
    if not packed:  # a column tile's panels packed by its worker (on its stack unless large)
        pb = sch.get_sblock("packed")
        sch.compute_at(pb, no)
        if on_stack:
            sch.set_scope(pb, 0, "local")
    _parallel(sch, no, ak)
    if len(lead) > 1:  # x and the output with their N-D shapes (dims shared with the graph's other kernels)
        sch.transform_layout(sch.get_sblock("out"), ("write", 0), lambda m, n: unravel(m, lead) + (n,))
        ub = sch.get_sblock("acc_update")
        sch.transform_layout(ub, ("read", read_index(sch, ub, "in0")), lambda m, q: unravel(m, lead) + (q,))
    return tensorized(sch, [an], "local" if on_stack else "global")


def weight_grad_bf16(in_types, out_type: TensorType, dim_vars: DimVars, tile: tuple) -> tirx.PrimFunc:
    """x^T g over every leading position for bfloat16 x (..., K) and g (..., N) -> (K, N) (a projection's weight
    gradient), accumulated in float32: the positions are the pairs each ``vdpbf16ps`` lane multiplies, so x is
    first laid out as (K, positions / 2, 2) and g in pair panels (ceil(N/16), positions / 2, 16, 2), an odd last
    position paired with zeros; then the dense kernel's register tiles over the (static) output."""
    rows, columns = tile
    x_t, g_t = in_types
    lead = dim_vars.shape(x_t.shape[:-1])
    M = positions(lead)
    K, N = (int(v) for v in out_type.shape)
    panels, pairs = -(-N // LANES), (M + 1) // BF16_GROUP
    n_pad = (N + columns - 1) // columns * columns
    X = te.placeholder((M, i64(K)), BF16, name="in0")
    G = te.placeholder((M, i64(N)), BF16, name="in1")
    zero = tirx.const(0.0, BF16)

    def position(q, j, read):  # position 2q + j, zero past the last
        p = q * BF16_GROUP + j
        return tirx.Select(p < M, read(tirx.min(p, M - 1)), zero)
    xp = te.compute((i64(K), pairs, i64(BF16_GROUP)), lambda k, q, j: position(q, j, lambda p: X[p, k]),
                    name="x_pairs")
    gp = te.compute((i64(panels), pairs, i64(LANES), i64(BF16_GROUP)), lambda c, q, l, j: position(
        q, j, lambda p: G[p, tirx.min(c * LANES + l, i64(N - 1))]), name="g_pairs")
    q = te.reduce_axis((0, pairs), name="q")
    j = te.reduce_axis((0, i64(BF16_GROUP)), name="j")
    acc = te.compute((i64(K + rows - 1), i64(n_pad)), lambda m, n: te.sum(
        xp[tirx.min(m, i64(K - 1)), q, j].astype(F32) * gp[_panel(n, panels, n_pad), q, n % LANES, j].astype(F32),
        axis=[q, j]), name="acc")
    out = te.compute((i64(K), i64(N)), lambda m, n: acc[m, n].astype(BF16), name="out")
    sch = s_tir.Schedule(te.create_prim_func([X, G, out]))
    no, an, ak = _tiled(sch, rows, columns)
    _parallel(sch, no, ak)
    for name, operand in (("x_pairs", "in0"), ("g_pairs", "in1")):  # whole passes over x and g, in parallel
        block = sch.get_sblock(name)
        sch.parallel(sch.get_loops(block)[0])
        if len(lead) > 1:
            sch.transform_layout(block, ("read", read_index(sch, block, operand)), lambda m, c: unravel(m, lead) + (c,))
    return tensorized(sch, [an], "global")


def _panel(n, panels: int, n_pad: int):
    """The panel of column ``n``: the last one for the columns of a register tile past it (never written back)."""
    return tirx.min(n // LANES, i64(panels - 1)) if n_pad > panels * LANES else n // LANES


def _tiled(sch, rows: int, columns: int):
    """Register tiles of ``rows`` x ``columns`` accumulators (``acc``) of block ``out``, the pairs' loop outside the
    rows and the columns (unrolled: every accumulator a register); returns the column tile loop (to run in
    parallel), the 16 columns the instruction takes and the pairs' loop."""
    no, _, ni, ab = register_tiles(sch, rows, columns)
    # the accumulator's loops: rows (left out by compute_at at one row), columns, pairs, the pair
    am, an, ak, akk = sch.get_loops(ab)[-4:] if rows > 1 else (None, *sch.get_loops(ab)[-3:])
    sch.reorder(ak, *([am] if am is not None else []), an, akk)
    ap, an = sch.split(an, [None, LANES])
    for loop in (am, ap):
        if loop is not None:
            sch.unroll(loop)
    sch.vectorize(ni)
    return no, an, ak


def _parallel(sch, no, ak) -> None:
    """The column tiles in parallel, each accumulator zeroed (a vector) before its pairs' loop."""
    sch.parallel(no)
    init = sch.decompose_reduction(sch.get_sblock("acc"), ak)
    sch.vectorize(sch.get_loops(init)[-1])


def tensorized(sch, loops, weights: str, intrin=None) -> tirx.PrimFunc:
    """The kernel with each of ``loops`` (16 lanes x a group of products) on the instruction: ``intrin`` (a tensor
    intrinsic's name), by default bfloat16's with the second operand in memory scope ``weights`` and the LLVM
    function that spells it linked in."""
    for loop in loops:
        sch.tensorize(loop, intrin or _intrin(weights))
    func = sch.mod["main"]
    if intrin is None:
        func = func.with_body(tirx.AttrStmt(tirx.const(0, "int32"), "pragma_import_llvm", LLVM_FUNCTION, func.body))
    return fast_math(func)


# int8 on AVX512_VNNI's ``vpdpbusd``: each of its 16 int32 lanes adds the products of 4 unsigned bytes of one operand
# with 4 signed bytes of the other.  The weights are the unsigned side (q + 128, in panels of 4 K values:
# ``ops.quantize_panels``), x's quantized row the signed one (4 bytes broadcast); the offset comes back out as 128 x
# the row's sum of its quantized values.

INT8, UINT8, I32 = "int8", "uint8", "int32"


@functools.cache
def _intrin_int8() -> str:
    """The tensor intrinsic: c[i] += sum over j < 4 of a[j] b[i, j] over 16 lanes, a signed and b unsigned bytes."""
    name = "attngraph_vpdpbusd_16x4"
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((INT8_GROUP,), INT8, offset_factor=1), b: T.Buffer((LANES, INT8_GROUP), UINT8, offset_factor=1),
             c: T.Buffer((LANES,), I32, offset_factor=1, scope=LOCAL)):
        with T.sblock("root"):
            T.reads(c[0:LANES], a[0:INT8_GROUP], b[0:LANES, 0:INT8_GROUP])
            T.writes(c[0:LANES])
            for i, k in T.grid(LANES, INT8_GROUP):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    c[vi] = c[vi] + T.Cast(I32, a[vk]) * T.Cast(I32, b[vi, vk])

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((INT8_GROUP,), INT8, offset_factor=INT8_GROUP),
             b: T.Buffer((LANES, INT8_GROUP), UINT8, offset_factor=INT8_GROUP),
             c: T.Buffer((LANES,), I32, offset_factor=1, scope=LOCAL)):
        with T.sblock("root"):
            T.reads(c[0:LANES], a[0:INT8_GROUP], b[0:LANES, 0:INT8_GROUP])
            T.writes(c[0:LANES])
            quad = T.decl_buffer((1,), I32, data=a.data, elem_offset=a.elem_offset // INT8_GROUP)
            quads = T.decl_buffer((LANES,), I32, data=b.data, elem_offset=b.elem_offset // INT8_GROUP)
            c[T.ramp(T.int64(0), T.int64(1), LANES)] = T.call_llvm_pure_intrin(
                f"int32x{LANES}", "llvm.x86.avx512.vpdpbusd.512", c[T.ramp(T.int64(0), T.int64(1), LANES)],
                T.reinterpret(f"int8x{4 * LANES}", quads[T.ramp(T.int64(0), T.int64(1), LANES)]),
                T.reinterpret(f"int8x{4 * LANES}", T.broadcast(quad[0], LANES)))  # LLVM's operands: <64 x i8>

    TensorIntrin.register(name, desc, impl)
    return name


def dense_int8(in_types, out_type: TensorType, dim_vars: DimVars, *, bias: bool, activation: str,
               tile: tuple) -> tirx.PrimFunc:
    """``linear_int8``: float32 x (..., K) quantized per row (a pass over x, in parallel), its products with the
    quantized panels (ceil(N/16), K/4, 16, 4) summed in int32 on ``vpdpbusd`` in register tiles of ``tile`` = (rows,
    columns) as the bfloat16 kernel's (column tiles in parallel), then rescaled to float32 with the bias and
    activation as they are written."""
    from .ops import WEIGHT_OFFSET, te_rows_quantized
    rows, columns = tile
    x_t, w_t = in_types[0], in_types[1]
    lead = dim_vars.shape(x_t.shape[:-1])
    M = positions(lead)
    N = out_type.shape[-1]
    panels, quads, width, group = (int(v) for v in w_t.shape)
    assert width == LANES and group == INT8_GROUP and columns % LANES == 0, (w_t, tile)
    K = quads * INT8_GROUP
    n_pad = (N + columns - 1) // columns * columns
    X = te.placeholder((M, i64(K)), F32, name="in0")
    W = te.placeholder((i64(panels), i64(quads), i64(LANES), i64(INT8_GROUP)), UINT8, name="in1")
    S = te.placeholder((i64(N),), F32, name="in2")
    B = te.placeholder((i64(N),), F32, name="in3") if bias else None
    xq, sx = te_rows_quantized(X, "x")
    r = te.reduce_axis((0, i64(K)), name="r")
    rs = te.compute((M,), lambda m: te.sum(xq[m, r].astype(I32), axis=r), name="x_sum")
    k = te.reduce_axis((0, i64(quads)), name="k")
    kk = te.reduce_axis((0, i64(INT8_GROUP)), name="kk")
    acc = te.compute((M + (rows - 1), i64(n_pad)), lambda m, n: te.sum(
        xq[tirx.min(m, M - 1), k * INT8_GROUP + kk].astype(I32)
        * W[_panel(n, panels, n_pad), k, n % LANES, kk].astype(I32), axis=[k, kk]), name="acc")
    act = ACTIVATIONS[activation]

    def value(m, n):
        exact = acc[m, n] - tirx.const(WEIGHT_OFFSET, I32) * rs[m]
        y = exact.astype(F32) * sx[m] * S[n]
        return act(y + B[n] if bias else y)
    out = te.compute((M, i64(N)), value, name="out")
    sch = s_tir.Schedule(te.create_prim_func([X, W, S] + ([B] if bias else []) + [out]))
    no, an, ak = _tiled(sch, rows, columns)
    _parallel(sch, no, ak)
    for name in ("x_amax", "x_scale", "x_q", "x_sum"):  # the rows quantized once, in parallel, before the products
        block = sch.get_sblock(name)
        sch.parallel(sch.get_loops(block)[0])
    if len(lead) > 1:  # x and the output with their N-D shapes (dims shared with the graph's other kernels)
        sch.transform_layout(sch.get_sblock("out"), ("write", 0), lambda m, n: unravel(m, lead) + (n,))
        block = sch.get_sblock("x_amax")  # x's buffer, which x_q reads too
        sch.transform_layout(block, ("read", read_index(sch, block, "in0")), lambda m, c: unravel(m, lead) + (c,))
    return tensorized(sch, [an], "global", _intrin_int8())
