"""Per-kernel speed of the hand-scheduled CPU kernels against NumPy (OpenBLAS) and torch.

    TVM_NUM_THREADS=2 python bench/bench_kernels.py [--m 128,512] [--only dense|attention] [--repeat 7]

For the projections of transformer-base (d 512, FFN 2048) and a BERT-size encoder (d 384, FFN 1536,
12 heads) at several M (= batch x sequence), as the llvm target runs them (over weights packed at bind
time), and for attention at sequence 128 and 512, prints the
median time of each implementation, GFLOP/s, the share of this machine's float32 peak and the ratio
of attngraph's time to the best peer's (below 1.0: attngraph is faster).  Every implementation runs
with the same thread count on the same inputs.  The machine may be shared: repeat what matters.
"""

from __future__ import annotations

import os
import time

THREADS = int(os.environ.setdefault("TVM_NUM_THREADS", "2"))
# Same thread count for the peers; set before numpy/torch start their pools.
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(THREADS))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import click  # noqa: E402
import numpy as np  # noqa: E402
from peak import peak_gflops  # noqa: E402


#: (model, kernel, K, N): the dense matmuls of each model (x (M, K) @ W (K, N)).
DENSE_SHAPES = [
    ("transformer-base", "attention projection", 512, 512),
    ("transformer-base", "merged QKV projection", 512, 1536),
    ("transformer-base", "FFN up (+gelu/relu)", 512, 2048),
    ("transformer-base", "FFN down", 2048, 512),
    ("bert-size", "attention projection", 384, 384),
    ("bert-size", "merged QKV projection", 384, 1152),
    ("bert-size", "FFN up (+gelu/relu)", 384, 1536),
    ("bert-size", "FFN down", 1536, 384),
]

#: (model, batch, heads, seq, head dim) for the attention kernel.
ATTENTION_SHAPES = [("transformer-base", 1, 8, 128, 64), ("transformer-base", 1, 8, 512, 64),
                    ("bert-size", 1, 12, 128, 32), ("bert-size", 1, 12, 512, 32)]


def median_time(fn, repeat: int, min_time: float = 0.2) -> float:
    """Median seconds per call of ``fn`` over ``repeat`` batches each lasting about ``min_time``."""
    fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < min_time / 4 or calls < 2:
        fn()
        calls += 1
    per_batch = max(1, int(calls * min_time / (time.perf_counter() - start) / 4))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(per_batch):
            fn()
        times.append((time.perf_counter() - t0) / per_batch)
    return float(np.median(times))


def compile_kernel(op, attrs, in_types):
    """(compiled kernel, full attrs) of attngraph's scheduled CPU kernel for ``op``: symbolic dims, one build."""
    import tvm

    from attngraph.backends.tvm.plan import KernelSpec
    from attngraph.backends.tvm.shapes import DimVars
    from attngraph.backends.tvm.targets import get_target
    from attngraph.ir import ops as O
    attrs = {**O.get(op).defaults, **attrs}
    out_type = O.get(op).infer(in_types, attrs)
    llvm = get_target("llvm")
    f = llvm.kernel(KernelSpec("k", op, attrs, tuple(in_types), out_type), DimVars())
    if f is None:
        raise click.ClickException(f"no scheduled CPU kernel for {op} on {in_types}")
    ex = tvm.compile(tvm.IRModule({"k": f.with_attr("global_symbol", "k")}), target=llvm.tvm_target)
    return ex["k"], attrs


def caller(kernel, op, attrs, arrays):
    """(a no-argument function running ``kernel`` on ``arrays``, its max abs error against the reference)."""
    import tvm

    from attngraph.ir import ops as O
    args = [tvm.runtime.tensor(a) for a in arrays]
    want = O.get(op).ref(*[a.astype("float64") for a in arrays], **attrs)
    out = tvm.runtime.empty(want.shape, "float32", tvm.cpu())
    kernel(*args, out)
    err = float(np.max(np.abs(out.numpy() - want))) if want.size else 0.0
    return (lambda: kernel(*args, out)), err


def row(cells, widths):
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def bench_dense(ms, repeat, torch):
    """The projections as the llvm target runs them: ``linear_packed`` over weights packed in column
    panels at bind time (what every build of a model with bound weights calls), with its bias."""
    from attngraph.backends.tvm.targets.cpu.tiles import PANEL_WIDTH
    from attngraph.ir import TensorType
    from attngraph.ir import ops as O
    widths = [48, 6, 9, 9, 6, 9, 9, 7]
    print(row(["dense projection x @ W + b (K x N)", "M", "ag ms", "ag GF/s", "%peak", "numpy GF/s", "torch GF/s",
               "ratio"], widths))
    rng = np.random.default_rng(0)
    results = []
    for model, what, k, n in DENSE_SHAPES:
        w = rng.standard_normal((k, n)).astype("float32")
        b = rng.standard_normal(n).astype("float32")
        panels = O.get("pack_panels").ref(w, width=PANEL_WIDTH)
        # One build per shape serves every M: the rows are symbolic.
        kernel, attrs = compile_kernel("linear_packed", {"n": n}, [TensorType(("batch", "seq", k), "float32"),
                                                                   TensorType(panels.shape, "float32"),
                                                                   TensorType((n,), "float32")])
        for m in ms:
            x = rng.standard_normal((1, m, k)).astype("float32")
            run, err = caller(kernel, "linear_packed", attrs, [x, panels, b])
            if err > 1e-2 * np.sqrt(k):
                raise click.ClickException(f"wrong result for {k}x{n} at M={m}: max error {err}")
            flops = 2.0 * m * k * n
            t_ag = median_time(run, repeat)
            t_np = median_time(lambda: np.matmul(x, w) + b, repeat)
            xt, wt, bt = torch.from_numpy(x), torch.from_numpy(w.T.copy()), torch.from_numpy(b)
            t_torch = median_time(lambda: torch.nn.functional.linear(xt, wt, bt), repeat)
            gf = flops / t_ag / 1e9
            results.append((model, what, k, n, m, gf))
            print(row([f"{model} {what} {k}x{n}", m, f"{t_ag * 1e3:.3f}", f"{gf:.1f}", f"{100 * gf / peak_gflops():.0f}%",
                       f"{flops / t_np / 1e9:.1f}", f"{flops / t_torch / 1e9:.1f}",
                       f"{t_ag / min(t_np, t_torch):.2f}"], widths))
    return results


def bench_attention(repeat, torch):
    from attngraph.ir import TensorType
    widths = [48, 6, 9, 9, 6, 9, 9, 7]
    print(row(["fused attention (b, h, s, d), bhsd", "seq", "ag ms", "ag GF/s", "%peak", "numpy ms", "torch ms",
               "ratio"], widths))
    rng = np.random.default_rng(0)
    for model, b, h, s, d in ATTENTION_SHAPES:
        types = [TensorType(("batch", h, "seq", d), "float32")] * 3
        q, k, v = (rng.standard_normal((b, h, s, d)).astype("float32") for _ in range(3))
        scale = 1.0 / np.sqrt(d)
        kernel, attrs = compile_kernel("fused_attention", {"scale": scale, "layout": "bhsd"}, types)
        run, err = caller(kernel, "fused_attention", attrs, [q, k, v])
        if err > 1e-3:
            raise click.ClickException(f"wrong attention result at {(b, h, s, d)}: max error {err}")

        def numpy_attention():
            sc = np.matmul(q, k.swapaxes(-1, -2)) * scale
            e = np.exp(sc - sc.max(-1, keepdims=True))
            return np.matmul(e / e.sum(-1, keepdims=True), v)
        tq, tk, tv = (torch.from_numpy(a) for a in (q, k, v))
        t_ag = median_time(run, repeat)
        t_np = median_time(numpy_attention, repeat)
        t_torch = median_time(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv), repeat)
        flops = 4.0 * b * h * s * s * d
        gf = flops / t_ag / 1e9
        print(row([f"{model} b{b} h{h} d{d}", s, f"{t_ag * 1e3:.3f}", f"{gf:.1f}", f"{100 * gf / peak_gflops():.0f}%",
                   f"{t_np * 1e3:.3f}", f"{t_torch * 1e3:.3f}", f"{t_ag / min(t_np, t_torch):.2f}"], widths))


@click.command()
@click.option("--m", "ms", default="128,512,1024,4096", help="Comma-separated row counts M for the dense matmuls.")
@click.option("--only", type=click.Choice(["dense", "attention"]), default=None, help="Run one group only.")
@click.option("--repeat", default=7, show_default=True, help="Timed batches per measurement (the median is shown).")
def main(ms, only, repeat):
    """Per-kernel GFLOP/s of attngraph's CPU kernels against NumPy and torch at the same thread count."""
    import torch
    torch.set_num_threads(THREADS)
    print(f"threads {THREADS}, float32 peak {peak_gflops():.0f} GFLOP/s, ratio = attngraph time / best peer time")
    if only in (None, "dense"):
        bench_dense([int(m) for m in ms.split(",")], repeat, torch)
    if only in (None, "attention"):
        bench_attention(repeat, torch)


if __name__ == "__main__":
    main()
