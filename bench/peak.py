"""This machine's float32 peak, measured: ``peak_gflops(threads)``; its bfloat16 dot-product peak where it has
AVX512_BF16 (``peak_gflops(bf16=True)``) and its AMX bfloat16 peak where it has AMX (``amx_peak_gflops``).

    TVM_NUM_THREADS=2 python bench/peak.py

A probe kernel compiled by TVM for this CPU: on each thread, independent vector accumulators
(8 and 16 of the widest float32 vector: 16 lanes with AVX-512, 8 with AVX2) each updated by a
multiply-add two million times, nothing read from memory.  That is the fused multiply-add
throughput the cores reach at the clock they run at under load, i.e. the ceiling that a matmul
kernel's GFLOP/s is quoted against.  Seen here: 198 GFLOP/s on 2 cores of an AVX2 Xeon, about 350 on
2 cores of an AVX-512 Xeon (Emerald Rapids).  The bfloat16 probe is the same with ``vdpbf16ps`` for the multiply-add
(32 multiply-adds an instruction, through the LLVM function the kernels use: ``targets/cpu/dot.py``).  The AMX probe:
on each thread, ``tdpbf16ps`` over 4 accumulator tiles (16 x 16 float32 each) from 2 A and 2 B tiles loaded once,
16 x 16 x 32 multiply-adds an instruction (not yet run: no development machine has had AMX).
"""

from __future__ import annotations

import functools
import os
import time

ITERATIONS = 2_000_000


def _probe(threads: int, width: int, bf16: bool = False):
    """PrimFunc writing out[t, :] after ITERATIONS multiply-adds on ``width`` float32 lanes per thread (``bf16``:
    ITERATIONS ``vdpbf16ps``, each two products a lane)."""
    from tvm import tirx

    from attngraph.backends.tvm.targets.cpu import dot

    def i64(v):
        return tirx.IntImm("int64", v)
    out = tirx.decl_buffer((threads, width), "float32", name="out")
    acc = tirx.decl_buffer((width,), "float32", name="acc", scope="local")
    t, i, it = (tirx.Var(n, "int64") for n in ("t", "i", "it"))

    def lanes(value):
        return tirx.For(i, i64(0), i64(width), tirx.ForKind.VECTORIZED, value)
    init = lanes(tirx.BufferStore(acc, tirx.Cast("float32", t + i), [i]))
    fma = lanes(tirx.BufferStore(acc, tirx.BufferLoad(acc, [i]) * tirx.const(0.9999, "float32")
                                 + tirx.const(1e-4, "float32"), [i]))
    if bf16:  # each 16-lane register: acc += (1, 1) . (2^-20, 2^-20), a pair of bfloat16 a lane
        def dots(r):
            v = tirx.Ramp(i64(r * dot.LANES), i64(1), dot.LANES)
            pair = tirx.Broadcast(tirx.const(0x35803580, "int32"), dot.LANES)
            ones = tirx.Broadcast(tirx.const(0x3F803F80, "int32"), dot.LANES)
            return tirx.BufferStore(acc, tirx.call_pure_extern(f"float32x{dot.LANES}", dot.BF16_DOT.helper,
                                                               tirx.BufferLoad(acc, [v]), ones, pair), [v])
        fma = tirx.SeqStmt([dots(r) for r in range(width // dot.LANES)])
    loop = tirx.For(it, i64(0), i64(ITERATIONS), tirx.ForKind.SERIAL, fma)
    store = lanes(tirx.BufferStore(out, tirx.BufferLoad(acc, [i]), [t, i]))
    body = tirx.For(t, i64(0), i64(threads), tirx.ForKind.PARALLEL,
                    tirx.SeqStmt([tirx.AllocBuffer(acc), init, loop, store]))
    if bf16:
        body = tirx.AttrStmt(tirx.const(0, "int32"), "pragma_import_llvm", dot.BF16_DOT.llvm, body)
    return tirx.PrimFunc([out], body).with_attr("global_symbol", "peak")


@functools.lru_cache(maxsize=None)
def peak_gflops(threads: int | None = None, cpu: str | None = None, bf16: bool = False) -> float:
    """float32 GFLOP/s of ``threads`` cores (default TVM_NUM_THREADS) doing nothing but vector FMAs,
    with the vector instructions of CPU model ``cpu`` (default: this CPU's; ``x86-64-v3``: AVX2's); ``bf16``: on the
    bfloat16 dot products (a CPU with AVX512_BF16), counting each product and each addition."""
    import tvm

    from attngraph.backends.tvm.targets import get_target
    threads = threads or int(os.environ.get("TVM_NUM_THREADS", "1"))
    llvm = get_target("llvm" if cpu is None else f"llvm:{cpu}")
    target = llvm.tvm_target
    lanes = 16 if llvm.tiles.isa == "avx512" else 8  # float32 lanes of the widest vector
    if bf16 and llvm.tiles.bf16_dot is None:
        raise ValueError(f"{llvm.name}'s CPU has no bfloat16 dot products (AVX512_BF16)")
    best = 0.0
    for accumulators in (8, 16):  # enough to hide the FMA latency on two ports; no register spills
        width = lanes * accumulators
        run = tvm.compile(tvm.IRModule({"peak": _probe(threads, width, bf16)}), target=target)["peak"]
        out = tvm.runtime.empty((threads, width), "float32", tvm.cpu())
        run(out)
        for _ in range(9):  # best of several: a shared machine has slow moments
            start = time.perf_counter()
            run(out)
            flops = (4.0 if bf16 else 2.0) * threads * width * ITERATIONS
            best = max(best, flops / (time.perf_counter() - start) / 1e9)
    return best


#: ``tdpbf16ps`` on tiles loaded once: 4 tile products an iteration, ``%n`` iterations, after the tile configuration
#: and the tile products of the AMX kernel (``targets/cpu/amx.py``: ``{configure}``, ``{products}``)
AMX_PROBE = """
declare void @llvm.x86.ldtilecfg(ptr)
declare void @llvm.x86.tilezero(i8 immarg)
declare void @llvm.x86.tdpbf16ps(i8 immarg, i8 immarg, i8 immarg)
declare void @llvm.x86.tilerelease()
define internal void @attngraph_amx_probe(i64 %n) #0 {{
entry:{configure}
  call void @llvm.x86.tilezero(i8 0)
  call void @llvm.x86.tilezero(i8 1)
  call void @llvm.x86.tilezero(i8 2)
  call void @llvm.x86.tilezero(i8 3)
  call void @llvm.x86.tilezero(i8 4)
  call void @llvm.x86.tilezero(i8 5)
  call void @llvm.x86.tilezero(i8 6)
  call void @llvm.x86.tilezero(i8 7)
  br label %loop
loop:
  %i = phi i64 [ 0, %entry ], [ %i1, %loop ]{products}
  %i1 = add i64 %i, 1
  %done = icmp eq i64 %i1, %n
  br i1 %done, label %exit, label %loop
exit:
  call void @llvm.x86.tilerelease()
  ret void
}}
attributes #0 = {{ nounwind "target-features"="+amx-tile,+amx-bf16" }}
"""
#: multiply-adds of one tile product: 16 rows x 16 columns x 32 K values
AMX_TILE_PRODUCT = 16 * 16 * 32


def _amx_probe(threads: int, iterations: int):
    """PrimFunc running ``iterations`` rounds of 4 tile products on each of ``threads`` threads."""
    from tvm import tirx

    from attngraph.backends.tvm.targets.cpu import amx
    t = tirx.Var("t", "int64")
    call = tirx.Evaluate(tirx.call_extern("void", "attngraph_amx_probe", tirx.IntImm("int64", iterations)))
    body = tirx.For(t, tirx.IntImm("int64", 0), tirx.IntImm("int64", threads), tirx.ForKind.PARALLEL, call)
    probe = AMX_PROBE.format(configure=amx.CONFIGURE, products=amx.PRODUCTS)
    body = tirx.AttrStmt(tirx.const(0, "int32"), "pragma_import_llvm", probe, body)
    return tirx.PrimFunc([], body).with_attr("global_symbol", "peak")


def amx_peak_gflops(threads: int | None = None, iterations: int = ITERATIONS // 8) -> float:
    """bfloat16 GFLOP/s of ``threads`` cores doing nothing but AMX tile products (a CPU with AMX-BF16 whose Linux
    grants the tile state), counting each product and each addition."""
    import tvm

    from attngraph.backends.tvm.targets import get_target
    from attngraph.backends.tvm.targets.cpu import isa
    threads = threads or int(os.environ.get("TVM_NUM_THREADS", "1"))
    if not isa.request_amx():
        raise ValueError("this CPU has no AMX, or Linux refused this process the tile state")
    run = tvm.compile(tvm.IRModule({"peak": _amx_probe(threads, iterations)}), target=get_target("llvm").tvm_target)["peak"]
    run()
    best = 0.0
    for _ in range(9):
        start = time.perf_counter()
        run()
        best = max(best, 2.0 * 4 * AMX_TILE_PRODUCT * iterations * threads / (time.perf_counter() - start) / 1e9)
    return best


if __name__ == "__main__":
    os.environ.setdefault("TVM_NUM_THREADS", "2")
    n = int(os.environ["TVM_NUM_THREADS"])
    from attngraph.backends.tvm.targets import get_target
    from attngraph.backends.tvm.targets.cpu import isa
    info = get_target("llvm").describe()
    print(f"float32 peak, {n} threads of {isa.cpu_name()} (LLVM's {info['cpu']}: {isa.summary(info['features'])}): "
          f"{peak_gflops(n):.0f} GFLOP/s")
    if get_target("llvm").tiles.bf16_dot is not None:
        print(f"bfloat16 dot-product peak (vdpbf16ps), {n} threads: {peak_gflops(n, bf16=True):.0f} GFLOP/s")
    if isa.request_amx():
        print(f"AMX bfloat16 peak (tdpbf16ps), {n} threads: {amx_peak_gflops(n):.0f} GFLOP/s")
    else:
        print("AMX: none on this CPU")
