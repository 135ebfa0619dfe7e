"""Products on the CPU's dot-product instructions (``DotInstruction``, one table row each): AVX512_BF16's
``vdpbf16ps`` (Zen 4, Cooper Lake, Sapphire Rapids and later), whose 16 float32 lanes each add the products of a pair
of bfloat16 values, 32 multiply-adds where a float32 FMA does 16; and AVX512_VNNI's ``vpdpbusd`` (Zen 4, Ice Lake and
later), whose 16 int32 lanes each add the products of 4 unsigned bytes by 4 signed ones (the int8 projection), or on
a CPU without it ``vpmaddwd`` (AVX2), whose int32 lanes each add the products of a pair of 16-bit values.

The weights are packed once, when they are bound, in panels whose K values go in groups (``pack_panels(interleave=2)``:
(ceil(N/16), K/2, 16, 2); ``ops.quantize_panels``: (ceil(N/16), K/g, 16, g), g 4 or 2): one row of a panel is the 16
columns' groups, the instruction's weight operand as it is; the other is one group of x's row broadcast to the 16
lanes.  The kernel (``dense_bf16``, ``dense_int8``) is the dense projection's loop nest (column tiles in parallel,
register tiles of rows x columns, bias and activation in the write back) with its innermost 16 columns x a group
replaced by the instruction (``tensorize``); over a weight known only when it runs (a training step's), each worker
packs its column tile's pair panels first.  The weight gradient (``weight_grad_bf16``) pairs the positions instead;
the fused attention (``attention.attention(dot=True)``) pairs K's head dim for Q K^T and V's keys for P V.

TIR cannot spell the instructions' ``<32 x bfloat>`` and ``<64 x i8>`` operands, so a small LLVM function does each
(``DotInstruction.llvm``), linked into the kernel's module (``pragma_import_llvm``) and inlined: it takes the
operands as 16 integers, one per lane (the kernel reads the buffers through integer views of them: ``<16 x i32>``,
or ``<16 x i16>`` for pairs of bytes) and bitcasts them.  The kernel
rows ask for an instruction only where the tiles say the CPU has it (``tiles.bf16_dot``, ``tiles.int8_dot``:
``tiles.cpu_tiles`` asks LLVM whether the target has the feature).

Numerics: bfloat16: each lane adds its two products to the accumulator in turn, each rounded to float32 (exactly as
a float32 FMA loop over bfloat16 values would, but for the order of the K loop), and the instruction flushes
denormals; int8: exact int32 sums.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import tvm
from tvm import s_tir, te, tirx

from .....ir import TensorType
from ...lower.elementwise import ACTIVATIONS
from ...shapes import DimVars
from .fastmath import fast_math
from .ops import INT8_STORAGE, te_rows_quantized
from .schedule import MAX_STACK_PANEL_BYTES, i64, positions, read_index, register_tiles, unravel, zeroed
from .tiles import BF16_GROUP, PANEL_WIDTH

LANES = PANEL_WIDTH  # float32 lanes of a zmm register: one panel's columns
BF16, F32, INT8, UINT8, I32 = "bfloat16", "float32", "int8", "uint8", "int32"
LOCAL = "local"  # the accumulators' scope (a name: a string in an annotation reads as a type to linters)


@dataclass(frozen=True)
class DotInstruction:
    """One of the CPU's dot-product instructions: each of its 16 lanes adds ``group`` products of x's values (one
    group, broadcast) and the weights' (the lane's column), accumulated in ``acc``.  TIR cannot spell their LLVM
    operands (``<32 x bfloat>``, ``<64 x i8>``), so each is an LLVM function (``llvm``) named ``helper`` taking
    ``<16 x i32>`` views, linked into the kernels that use it (``pragma_import_llvm``) and inlined."""
    helper: str
    group: int
    x: str
    w: str
    acc: str
    llvm: str


def _helper(name: str, acc: str, operand: str, intrinsic: str, feature: str, weights_first: bool) -> str:
    """The LLVM function ``name``(c, x, w) of the ``<16 x i32>`` views: ``intrinsic`` on them as ``operand`` vectors
    (w before x where the instruction wants the weights' operand first)."""
    first, second = ("%w", "%x") if weights_first else ("%x", "%w")
    return f"""
declare <16 x {acc}> @{intrinsic}(<16 x {acc}>, {operand}, {operand})
define internal <16 x {acc}> @{name}(<16 x {acc}> %c, <16 x i32> %xi, <16 x i32> %wi) #0 {{
  %x = bitcast <16 x i32> %xi to {operand}
  %w = bitcast <16 x i32> %wi to {operand}
  %r = call <16 x {acc}> @{intrinsic}(<16 x {acc}> %c, {operand} {first}, {operand} {second})
  ret <16 x {acc}> %r
}}
attributes #0 = {{ alwaysinline nounwind readnone "target-features"="+avx512f,+{feature}" }}
"""


#: ``vdpbf16ps`` (AVX512_BF16): pairs of bfloat16, float32 sums
BF16_DOT = DotInstruction("attngraph_dpbf16ps", BF16_GROUP, BF16, BF16, F32, _helper(
    "attngraph_dpbf16ps", "float", "<32 x bfloat>", "llvm.x86.avx512bf16.dpbf16ps.512", "avx512bf16", False))
#: ``vpdpbusd`` (AVX512_VNNI): groups of 4 bytes, the weights' unsigned (its first operand), x's signed; int32 sums
INT8_DOT = DotInstruction("attngraph_vpdpbusd", 4, INT8, UINT8, I32, _helper(
    "attngraph_vpdpbusd", "i32", "<64 x i8>", "llvm.x86.avx512.vpdpbusd.512", "avx512vnni", True))


def _pairs_helper(name: str) -> str:
    """The LLVM function ``name``(c, x, w) adding to c's 16 int32 lanes the products of a pair of x's int16 values
    (broadcast: one i32) with each lane's pair of signed bytes of w, sign-extended to 16 bits: ``vpmaddwd`` on each
    half, by its intrinsic (the same sums written as even and odd products of sign-extended values, LLVM 20
    multiplies in 32 bits: ``vpmulld``)."""
    lo = ", ".join(f"i32 {i}" for i in range(16))
    hi = ", ".join(f"i32 {i}" for i in range(16, 32))
    return f"""
declare <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16>, <16 x i16>)
define internal <16 x i32> @{name}(<16 x i32> %c, <16 x i32> %xi, <16 x i16> %wi) #0 {{
  %x = bitcast <16 x i32> %xi to <32 x i16>
  %wb = bitcast <16 x i16> %wi to <32 x i8>
  %w = sext <32 x i8> %wb to <32 x i16>
  %x0 = shufflevector <32 x i16> %x, <32 x i16> poison, <16 x i32> <{lo}>
  %x1 = shufflevector <32 x i16> %x, <32 x i16> poison, <16 x i32> <{hi}>
  %w0 = shufflevector <32 x i16> %w, <32 x i16> poison, <16 x i32> <{lo}>
  %w1 = shufflevector <32 x i16> %w, <32 x i16> poison, <16 x i32> <{hi}>
  %p0 = call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> %x0, <16 x i16> %w0)
  %p1 = call <8 x i32> @llvm.x86.avx2.pmadd.wd(<16 x i16> %x1, <16 x i16> %w1)
  %p = shufflevector <8 x i32> %p0, <8 x i32> %p1, <16 x i32> <{lo}>
  %r = add <16 x i32> %c, %p
  ret <16 x i32> %r
}}
attributes #0 = {{ alwaysinline nounwind readnone "target-features"="+avx2" }}
"""


#: ``vpmaddwd`` (AVX2; AVX-512 BW): pairs of signed 16-bit values, the weights stored as signed bytes and widened as
#: they are read, x's quantized row kept as int16; int32 sums
INT8_PAIRS = DotInstruction("attngraph_pmaddwd", 2, "int16", INT8, I32, _pairs_helper("attngraph_pmaddwd"))

#: the int8 projection's instruction by the name the tiles give (``tiles.int8_instruction``)
INT8_INSTRUCTIONS = {"vpdpbusd": INT8_DOT, "vpmaddwd": INT8_PAIRS}


@functools.cache
def _intrin(dot: DotInstruction = BF16_DOT, weights: str = "global") -> str:
    """The tensor intrinsic of ``dot``: c[i] += sum over j of x[j] w[i, j] over 16 lanes, w in memory scope
    ``weights`` (the bound panels', or a worker's own packed ones on its stack: "local"); registered once each."""
    name = f"{dot.helper}_16x{dot.group}_{weights}"
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T
    g, acc = dot.group, dot.acc
    lane = f"int{g * tvm.DataType(dot.w).bits}"  # a lane's group of weights as one integer (x's group: always 32 bits)

    @T.prim_func(s_tir=True)
    def desc(a: T.Buffer((g,), dot.x, offset_factor=1), b: T.Buffer((LANES, g), dot.w, offset_factor=1, scope=weights),
             c: T.Buffer((LANES,), acc, offset_factor=1, scope=LOCAL)):
        with T.sblock("root"):
            T.reads(c[0:LANES], a[0:g], b[0:LANES, 0:g])
            T.writes(c[0:LANES])
            for i, k in T.grid(LANES, g):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    c[vi] = c[vi] + T.Cast(acc, a[vk]) * T.Cast(acc, b[vi, vk])

    @T.prim_func(s_tir=True)
    def impl(a: T.Buffer((g,), dot.x, offset_factor=g), b: T.Buffer((LANES, g), dot.w, offset_factor=g, scope=weights),
             c: T.Buffer((LANES,), acc, offset_factor=1, scope=LOCAL)):
        with T.sblock("root"):
            T.reads(c[0:LANES], a[0:g], b[0:LANES, 0:g])
            T.writes(c[0:LANES])
            group = T.decl_buffer((1,), "int32", data=a.data, elem_offset=a.elem_offset // g)
            groups = T.decl_buffer((LANES,), lane, data=b.data, elem_offset=b.elem_offset // g)
            # (the ramps inline: a ramp bound to a name would be a local buffer, its loads gathers)
            c[T.ramp(T.int64(0), T.int64(1), LANES)] = T.call_pure_extern(
                f"{acc}x{LANES}", dot.helper, c[T.ramp(T.int64(0), T.int64(1), LANES)],
                T.broadcast(group[0], LANES), groups[T.ramp(T.int64(0), T.int64(1), LANES)])

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
    zeroed(sch, sch.get_sblock("acc"), ak)


def tensorized(sch, loops, weights: str, dot: DotInstruction = BF16_DOT) -> tirx.PrimFunc:
    """The kernel with each of ``loops`` (16 lanes x a group of products) on ``dot`` (its second operand in memory
    scope ``weights``), the LLVM function that spells it linked in."""
    for loop in loops:
        sch.tensorize(loop, _intrin(dot, weights))
    return linked(sch.mod["main"], dot.llvm)


def linked(func, llvm: str) -> tirx.PrimFunc:
    """Kernel ``func`` with the LLVM IR ``llvm`` (the functions its calls name) linked into its module, and its
    float32 exp and erf made vectorizable (``fast_math``)."""
    return fast_math(func.with_body(tirx.AttrStmt(tirx.const(0, "int32"), "pragma_import_llvm", llvm, func.body)))


# int8 on the CPU's integer dot products (``INT8_INSTRUCTIONS``): AVX512_VNNI's ``vpdpbusd``, whose 16 int32 lanes each
# add the products of 4 unsigned bytes of one operand with 4 signed bytes of the other: the weights are the unsigned
# side (q + 128, in panels of 4 K values: ``ops.quantize_panels``), x's quantized row the signed one (4 bytes
# broadcast), and the offset comes back out as 128 x the row's sum of its quantized values; or, without VNNI,
# ``vpmaddwd`` on pairs of 16-bit values (the weights signed bytes in panels of 2 K values, widened as they are read;
# x's row quantized to int16), half the products per instruction.


def dense_int8(in_types, out_type: TensorType, dim_vars: DimVars, *, bias: bool, activation: str,
               tile: tuple, dot: DotInstruction = INT8_DOT) -> tirx.PrimFunc:
    """``linear_int8``: float32 x (..., K) quantized per row (a pass over x, in parallel), its products with the
    quantized panels (ceil(N/16), K/g, 16, g) summed in int32 on ``dot`` (g its group) in register tiles of ``tile``
    = (rows, columns) as the bfloat16 kernel's (column tiles in parallel), then rescaled to float32 with the bias and
    activation as they are written."""
    rows, columns = tile
    x_t, w_t = in_types[0], in_types[1]
    lead = dim_vars.shape(x_t.shape[:-1])
    M = positions(lead)
    N = out_type.shape[-1]
    panels, groups, width, group = (int(v) for v in w_t.shape)
    stored, offset = INT8_STORAGE[group]
    assert width == LANES and group == dot.group and stored == dot.w and columns % LANES == 0, (w_t, tile, dot)
    K = groups * group
    n_pad = (N + columns - 1) // columns * columns
    X = te.placeholder((M, i64(K)), F32, name="in0")
    W = te.placeholder((i64(panels), i64(groups), i64(LANES), i64(group)), stored, name="in1")
    S = te.placeholder((i64(N),), F32, name="in2")
    B = te.placeholder((i64(N),), F32, name="in3") if bias else None
    xq, sx = te_rows_quantized(X, "x", dot.x)
    if offset:
        r = te.reduce_axis((0, i64(K)), name="r")
        rs = te.compute((M,), lambda m: te.sum(xq[m, r].astype(I32), axis=r), name="x_sum")
    k = te.reduce_axis((0, i64(groups)), name="k")
    kk = te.reduce_axis((0, i64(group)), name="kk")
    acc = te.compute((M + (rows - 1), i64(n_pad)), lambda m, n: te.sum(
        xq[tirx.min(m, M - 1), k * group + kk].astype(I32)
        * W[_panel(n, panels, n_pad), k, n % LANES, kk].astype(I32), axis=[k, kk]), name="acc")
    act = ACTIVATIONS[activation]

    def value(m, n):
        exact = acc[m, n] - tirx.const(offset, I32) * rs[m] if offset else acc[m, n]
        y = exact.astype(F32) * sx[m] * S[n]
        return act(y + B[n] if bias else y)
    out = te.compute((M, i64(N)), value, name="out")
    sch = s_tir.Schedule(te.create_prim_func([X, W, S] + ([B] if bias else []) + [out]))
    no, an, ak = _tiled(sch, rows, columns)
    _parallel(sch, no, ak)
    for name in ("x_amax", "x_scale", "x_q") + (("x_sum",) if offset else ()):  # the rows quantized once, in
        block = sch.get_sblock(name)                                             # parallel, before the products
        sch.parallel(sch.get_loops(block)[0])
    if len(lead) > 1:  # x and the output with their N-D shapes (dims shared with the graph's other kernels)
        sch.transform_layout(sch.get_sblock("out"), ("write", 0), lambda m, n: unravel(m, lead) + (n,))
        block = sch.get_sblock("x_amax")  # x's buffer, which x_q reads too
        sch.transform_layout(block, ("read", read_index(sch, block, "in0")), lambda m, c: unravel(m, lead) + (c,))
    return tensorized(sch, [an], "global", dot)
