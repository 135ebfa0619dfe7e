"""bfloat16 projections on AMX tiles (Intel Sapphire Rapids and later: ``tdpbf16ps``), compiled but not yet run: no
development machine has had AMX, so the kernel row is behind an opt-in (``ATTNGRAPH_AMX=1``, ``tiles.amx``) and its
tests build it for ``llvm:sapphirerapids`` and read the instructions; turn it on by default in the session that first
runs it and matches the interpreter on a CPU with AMX.

AMX multiplies whole tiles: a tile register holds up to 16 rows of 64 bytes; ``tdpbf16ps C, A, B`` adds to each
float32 C[m, n] (16 x 16) the sum over 32 K values of A[m, k] B[k, n], A 16 rows of 32 bfloat16 (x's rows as they
are) and B 16 rows of 16 columns x a pair of K values: a pair panel of the weights (``pack_panels(interleave=2)``,
the layout ``dot.py`` reads) is B as it is, 16 pair rows at a time.  The micro-kernel (``LLVM_FUNCTION``, linked into
each kernel as ``dot.py``'s is) computes 32 rows x 32 columns (two panels): 4 C tiles, 2 A and 2 B tiles loaded per
32 K values, the C tiles loaded from and stored to a float32 scratch of the worker's, so that the kernel's epilogue
(bias, activation, the rounding to bfloat16) runs on AVX-512 as the other kernels' do.  It loads the tile
configuration itself at each call (the configuration is per thread and TVM's workers are threads) and releases the
tiles before it returns.

The kernel (``dense_amx``): row blocks of 32 in parallel, each block's rows of x copied once to a scratch (the rows
past the end clamped: a tile load reads whole rows), then every pair of panels.  K and N must be multiples of 32;
other projections, and a few rows (a decode step), keep ``dot.py``'s ``vdpbf16ps`` kernels.

Linux grants a process AMX state only on request (``isa.request_amx``, done where the llvm target opens its
device); without it the first tile instruction stops the process."""

from __future__ import annotations

import functools

from tvm import s_tir, te, tirx

from .....ir import TensorType
from ...lower.elementwise import ACTIVATIONS
from ...shapes import DimVars
from .dot import linked
from .schedule import i64, positions, read_index, unravel, zeroed
from .tiles import BF16_GROUP, PANEL_WIDTH

BF16, F32 = "bfloat16", "float32"
#: rows and columns of the micro-kernel's block (2 x 2 tiles of 16 x 16), and K values per step (a tile's 64 bytes)
BLOCK, STEP = 32, 32
HELPER = "attngraph_amx_bf16_32x32"
LOCAL = "local"  # C's scope (a name: a string in an annotation reads as a type to linters)

#: LLVM IR that loads the tile configuration every AMX function here uses (palette 1; tiles 0-7 of 16 rows of 64
#: bytes), as the first lines of its entry block
CONFIGURE = """
  %cfg = alloca [64 x i8], align 64
  store <64 x i8> zeroinitializer, ptr %cfg, align 64
  store i8 1, ptr %cfg                                   ; palette 1
  %colsb = getelementptr i8, ptr %cfg, i64 16            ; bytes per row of tiles 0-7: 64
  store <8 x i16> <i16 64, i16 64, i16 64, i16 64, i16 64, i16 64, i16 64, i16 64>, ptr %colsb, align 1
  %rows = getelementptr i8, ptr %cfg, i64 48             ; rows of tiles 0-7: 16
  store <8 x i8> <i8 16, i8 16, i8 16, i8 16, i8 16, i8 16, i8 16, i8 16>, ptr %rows, align 1
  call void @llvm.x86.ldtilecfg(ptr %cfg)
"""

#: the 2 x 2 tile products of a step: C tiles 0-3 += A tiles 4-5 x B tiles 6-7
PRODUCTS = """
  call void @llvm.x86.tdpbf16ps(i8 0, i8 4, i8 6)
  call void @llvm.x86.tdpbf16ps(i8 1, i8 4, i8 7)
  call void @llvm.x86.tdpbf16ps(i8 2, i8 5, i8 6)
  call void @llvm.x86.tdpbf16ps(i8 3, i8 5, i8 7)"""

LLVM_FUNCTION = f"""
declare void @llvm.x86.ldtilecfg(ptr)
declare void @llvm.x86.tileloadd64(i8 immarg, ptr, i64)
declare void @llvm.x86.tdpbf16ps(i8 immarg, i8 immarg, i8 immarg)
declare void @llvm.x86.tilestored64(i8 immarg, ptr, i64)
declare void @llvm.x86.tilerelease()

; c: 32 x 32 float32 (row stride 128 bytes), c += a @ b; a: 32 rows of K bfloat16, row stride %astride bytes;
; b: two pair panels of K / 2 rows of 64 bytes, the second %bnext bytes after the first; %steps = K / 32
define internal void @{HELPER}(ptr %c, ptr %a, i64 %astride, ptr %b, i64 %bnext, i64 %steps) #0 {{
entry:{CONFIGURE}  ; C tiles 0-3: rows 0-15 / 16-31 x columns 0-15 / 16-31
  %c1 = getelementptr i8, ptr %c, i64 64
  %c2 = getelementptr i8, ptr %c, i64 2048
  %c3 = getelementptr i8, ptr %c, i64 2112
  call void @llvm.x86.tileloadd64(i8 0, ptr %c, i64 128)
  call void @llvm.x86.tileloadd64(i8 1, ptr %c1, i64 128)
  call void @llvm.x86.tileloadd64(i8 2, ptr %c2, i64 128)
  call void @llvm.x86.tileloadd64(i8 3, ptr %c3, i64 128)
  %a16 = mul i64 %astride, 16
  %b1 = getelementptr i8, ptr %b, i64 %bnext
  br label %loop
loop:
  %k = phi i64 [ 0, %entry ], [ %k1, %loop ]
  %aoff = mul i64 %k, 64
  %ra = getelementptr i8, ptr %a, i64 %aoff
  %ra16 = getelementptr i8, ptr %ra, i64 %a16
  %boff = mul i64 %k, 1024
  %rb0 = getelementptr i8, ptr %b, i64 %boff
  %rb1 = getelementptr i8, ptr %b1, i64 %boff
  call void @llvm.x86.tileloadd64(i8 4, ptr %ra, i64 %astride)
  call void @llvm.x86.tileloadd64(i8 5, ptr %ra16, i64 %astride)
  call void @llvm.x86.tileloadd64(i8 6, ptr %rb0, i64 64)
  call void @llvm.x86.tileloadd64(i8 7, ptr %rb1, i64 64){PRODUCTS}
  %k1 = add i64 %k, 1
  %done = icmp eq i64 %k1, %steps
  br i1 %done, label %exit, label %loop
exit:
  call void @llvm.x86.tilestored64(i8 0, ptr %c, i64 128)
  call void @llvm.x86.tilestored64(i8 1, ptr %c1, i64 128)
  call void @llvm.x86.tilestored64(i8 2, ptr %c2, i64 128)
  call void @llvm.x86.tilestored64(i8 3, ptr %c3, i64 128)
  call void @llvm.x86.tilerelease()
  ret void
}}
attributes #0 = {{ nounwind "target-features"="+amx-tile,+amx-bf16" }}
"""


@functools.cache
def _intrin(k: int) -> str:
    """The tensor intrinsic of one 32 x 32 block over ``k`` K values (registered once per K): c[i, p, l] += sum over K
    of a[i, K] b[p, K / 2, l, K % 2], a and c compact scratches, b two consecutive pair panels."""
    name = f"{HELPER}_k{k}"
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T
    pairs = k // BF16_GROUP
    # the operands of both functions: x's block, two pair panels, the block's float32 C
    A = T.Buffer((BLOCK, k), BF16, offset_factor=1)
    B = T.Buffer((2, pairs, PANEL_WIDTH, BF16_GROUP), BF16, offset_factor=1)
    C = T.Buffer((BLOCK, 2, PANEL_WIDTH), F32, offset_factor=1, scope=LOCAL)

    @T.prim_func(s_tir=True)
    def desc(a: A, b: B, c: C):
        with T.sblock("root"):
            T.reads(c[0:BLOCK, 0:2, 0:PANEL_WIDTH], a[0:BLOCK, 0:k], b[0:2, 0:pairs, 0:PANEL_WIDTH, 0:BF16_GROUP])
            T.writes(c[0:BLOCK, 0:2, 0:PANEL_WIDTH])
            for i, p, l, q, j in T.grid(BLOCK, 2, PANEL_WIDTH, pairs, BF16_GROUP):
                with T.sblock("update"):
                    vi, vp, vl, vq, vj = T.axis.remap("SSSRR", [i, p, l, q, j])
                    c[vi, vp, vl] = c[vi, vp, vl] + T.Cast(F32, a[vi, vq * BF16_GROUP + vj]) * T.Cast(
                        F32, b[vp, vq, vl, vj])

    @T.prim_func(s_tir=True)
    def impl(a: A, b: B, c: C):
        with T.sblock("root"):
            T.reads(c[0:BLOCK, 0:2, 0:PANEL_WIDTH], a[0:BLOCK, 0:k], b[0:2, 0:pairs, 0:PANEL_WIDTH, 0:BF16_GROUP])
            T.writes(c[0:BLOCK, 0:2, 0:PANEL_WIDTH])
            T.evaluate(T.call_extern("void", HELPER, T.address_of(c[0, 0, 0]), T.address_of(a[0, 0]), T.int64(k * 2),
                                     T.address_of(b[0, 0, 0, 0]), T.int64(k * PANEL_WIDTH * 2), T.int64(k // STEP)))

    TensorIntrin.register(name, desc, impl)
    return name


def dense_amx(in_types, out_type: TensorType, dim_vars: DimVars, *, bias: bool, activation: str) -> tirx.PrimFunc:
    """activation(x @ W [+ b]) for bfloat16 x (..., K) and W in pair panels (N/16, K/2, 16, 2), K and N multiples of
    32, accumulated in float32 on AMX tiles, rounded to bfloat16 once as it is written."""
    x_t, w_t = in_types[0], in_types[1]
    lead = dim_vars.shape(x_t.shape[:-1])
    M = positions(lead)
    panels, pairs, width, group = (int(s) for s in w_t.shape)
    K, N = pairs * group, out_type.shape[-1]
    assert width == PANEL_WIDTH and group == BF16_GROUP and K % STEP == 0 and N % BLOCK == 0, (w_t, out_type)
    X = te.placeholder((M, i64(K)), BF16, name="in0")
    W = te.placeholder((i64(panels), i64(pairs), i64(PANEL_WIDTH), i64(BF16_GROUP)), BF16, name="in1")
    B = te.placeholder((i64(N),), BF16, name="in2") if bias else None
    rows = M + (BLOCK - 1)  # whole row blocks, the rows past the end reading the last row
    xa = te.compute((rows, i64(K)), lambda m, k: X[tirx.min(m, M - 1), k], name="xa")
    q = te.reduce_axis((0, i64(pairs)), name="q")
    j = te.reduce_axis((0, i64(BF16_GROUP)), name="j")
    acc = te.compute((rows, i64(panels), i64(PANEL_WIDTH)), lambda m, p, l: te.sum(
        xa[m, q * BF16_GROUP + j].astype(F32) * W[p, q, l, j].astype(F32), axis=[q, j]), name="acc")
    act = ACTIVATIONS[activation]

    def value(m, n):
        v = acc[m, n // PANEL_WIDTH, n % PANEL_WIDTH]
        return act(v + B[n].astype(F32) if bias else v).astype(BF16)
    out = te.compute((M, i64(N)), value, name="out")
    sch = s_tir.Schedule(te.create_prim_func([X, W] + ([B] if bias else []) + [out]))
    m, n = sch.get_loops(sch.get_sblock("out"))
    mo, mi = sch.split(m, [None, BLOCK])
    no, ni = sch.split(n, [None, BLOCK])
    sch.reorder(mo, no, mi, ni)
    sch.parallel(mo)
    sch.vectorize(ni)
    ab = sch.get_sblock("acc")
    sch.compute_at(ab, no)
    sch.set_scope(ab, 0, "local")  # the worker's 4 KB of C, on its stack
    xb = sch.get_sblock("xa")
    sch.compute_at(xb, mo)  # the row block's x, once for every pair of panels
    sch.vectorize(sch.get_loops(xb)[-1])
    zeroed(sch, ab, sch.get_loops(ab)[-5])
    if len(lead) > 1:  # x and the output with their N-D shapes (dims shared with the graph's other kernels)
        sch.transform_layout(sch.get_sblock("out"), ("write", 0), lambda m, n: unravel(m, lead) + (n,))
        sch.transform_layout(xb, ("read", read_index(sch, xb, "in0")), lambda m, k: unravel(m, lead) + (k,))
    sch.tensorize(sch.get_loops(sch.get_sblock("acc_update"))[-5], _intrin(K))
    return linked(sch.mod["main"], LLVM_FUNCTION)
