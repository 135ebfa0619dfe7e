"""bfloat16 projections on the CPU's bfloat16 dot-product instruction, AVX512_BF16's ``vdpbf16ps`` (Zen 4, Cooper
Lake, Sapphire Rapids and later): each of its 16 float32 lanes adds the products of one pair of bfloat16 values of
each operand, so one instruction does 32 multiply-adds where a float32 FMA does 16.

The weights are packed once, when they are bound, in panels whose K values go in pairs (``pack_panels(group=2)``:
(ceil(N/16), K/2, 16, 2)): one 64-byte row of a panel is the 16 columns' pairs, the instruction's second operand as
it is.  The first is one pair of x's row broadcast to the 16 lanes.  The kernel is the dense projection's loop nest
(column tiles in parallel, register tiles of rows x columns, bias and activation in the write back) with its
innermost 16 columns x 2 K values replaced by the instruction (``tensorize``).

TIR cannot spell the instruction's ``<32 x bfloat>`` operands (TVM widens bfloat16 loads to float32), so a small
LLVM function does (``_LLVM``), linked into the kernel's module (``pragma_import_llvm``) and inlined: it takes the
operands as ``<16 x i32>`` (the kernel reads the bfloat16 buffers through int32 views of them) and bitcasts them.
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
from .schedule import MAX_STACK_PANEL_BYTES, read_index, register_tiles, unravel
from .tiles import BF16_GROUP, PANEL_WIDTH

LANES = PANEL_WIDTH  # float32 lanes of a zmm register: one panel's columns
BF16, F32 = "bfloat16", "float32"
LOCAL = "local"  # the accumulators' scope (a name: a string in an annotation reads as a type to linters)
_HELPER = "attngraph_dpbf16ps"
_INTRIN = "attngraph_dpbf16ps_16x2"

_LLVM = f"""
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
define internal <16 x float> @{_HELPER}(<16 x float> %c, <16 x i32> %a, <16 x i32> %b) #0 {{
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
                f"float32x{LANES}", _HELPER, c[T.ramp(T.int64(0), T.int64(1), LANES)],
                T.broadcast(pair[0], LANES), pairs[T.ramp(T.int64(0), T.int64(1), LANES)])

    TensorIntrin.register(name, desc, impl)
    return name


def _i64(v: int):
    return tirx.IntImm("int64", v)


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
    M = lead[0]
    for d in lead[1:]:
        M = M * d
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
    X = te.placeholder((M, _i64(K)), BF16, name="in0")
    B = te.placeholder((_i64(N),), BF16, name="in2") if bias else None
    if packed:
        W = panels_of = te.placeholder((_i64(panels), _i64(pairs), _i64(LANES), _i64(BF16_GROUP)), BF16, name="in1")
    else:  # packed per call: (panels, K/2, 16, 2), the columns past N clamped (never written back)
        W = te.placeholder((_i64(K), _i64(N)), BF16, name="in1")
        panels_of = te.compute((_i64(panels), _i64(pairs), _i64(LANES), _i64(BF16_GROUP)), lambda p, q, c, j: W[
            q * BF16_GROUP + j, tirx.min(p * LANES + c, _i64(N - 1))], name="packed")
    k = te.reduce_axis((0, _i64(pairs)), name="k")
    kk = te.reduce_axis((0, _i64(BF16_GROUP)), name="kk")

    def panel(n):
        return tirx.min(n // LANES, _i64(panels - 1)) if n_pad > panels * LANES else n // LANES
    acc = te.compute((M + (rows - 1), _i64(n_pad)), lambda m, n: te.sum(
        X[tirx.min(m, M - 1), k * BF16_GROUP + kk].astype(F32) * panels_of[panel(n), k, n % LANES, kk].astype(F32),
        axis=[k, kk]),
        name="acc")
    act = ACTIVATIONS[activation]
    out = te.compute((M, _i64(N)), lambda m, n: act(acc[m, n] + B[n].astype(F32) if bias else acc[m, n]).astype(BF16),
                     name="out")
    sch = s_tir.Schedule(te.create_prim_func([X, W] + ([B] if bias else []) + [out]))
    no, mo, ni, ab = register_tiles(sch, rows, columns)
    # the accumulator's loops: rows (left out by compute_at at one row), columns, pairs, the pair
    am, an, ak, akk = sch.get_loops(ab)[-4:] if rows > 1 else (None, *sch.get_loops(ab)[-3:])
    sch.reorder(ak, *([am] if am is not None else []), an, akk)
    ap, an = sch.split(an, [None, LANES])
    for loop in (am, ap):
        if loop is not None:
            sch.unroll(loop)
    sch.vectorize(ni)
    if not packed:  # a column tile's panels packed by its worker (on its stack unless large)
        pb = sch.get_sblock("packed")
        sch.compute_at(pb, no)
        if on_stack:
            sch.set_scope(pb, 0, "local")
    sch.parallel(no)
    init = sch.decompose_reduction(ab, ak)
    sch.vectorize(sch.get_loops(init)[-1])
    if len(lead) > 1:  # x and the output with their N-D shapes (dims shared with the graph's other kernels)
        sch.transform_layout(sch.get_sblock("out"), ("write", 0), lambda m, n: unravel(m, lead) + (n,))
        ub = sch.get_sblock("acc_update")
        sch.transform_layout(ub, ("read", read_index(sch, ub, "in0")), lambda m, q: unravel(m, lead) + (q,))
    sch.tensorize(an, _intrin("local" if on_stack else "global"))
    func = sch.mod["main"]
    return fast_math(func.with_body(tirx.AttrStmt(tirx.const(0, "int32"), "pragma_import_llvm", _LLVM, func.body)))
