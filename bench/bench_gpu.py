"""GPU speed of attngraph's cuda build against PyTorch eager (its encoder fast path, attention through
scaled_dot_product_attention) and torch.compile, on the same weights and inputs.

    python bench/bench_gpu.py                                   # both models, batch 8 x seq 512
    python bench/bench_gpu.py --model bert-size --case 1x128 --repeat 50
    python bench/bench_gpu.py --dtype float16 --case 8x512 --case 32x512   # half precision, tensor cores

Models: the transformer-base encoder (6 layers, d 512, FFN 2048, 8 heads) and a BERT-size encoder
(6 layers, d 384, FFN 1536, 12 heads); post-LN, ReLU, float32 (or ``--dtype float16|bfloat16``: attngraph
built in that type, PyTorch's modules cast to it).  For each case: every engine's median
time per forward pass and attngraph's ratio to each peer (below 1.0: attngraph is faster).  The
attngraph call takes and returns NumPy arrays, so its time includes copying the input to the GPU and
the output back; the peers are timed both with tensors already on the GPU and with the same copies
("+copies"), and the ratios use the "+copies" figures.  Then the fused attention kernel alone (TVM's
time_evaluator on the GPU): its time and TFLOP/s against the H100's float32 peak (67 TFLOP/s on
CUDA cores, SXM; attngraph's float32 kernels do not use tensor cores) and, for scale, the dense TF32
tensor-core peak (495 TFLOP/s).  In a half type: the attention kernel against PyTorch's SDPA restricted to
its FlashAttention backend on the same shapes (TFLOP/s ratio), all projection kernels together against
``torch.nn.functional.linear`` (cuBLAS) on the model's projection shapes, and both against the dense
float16/bfloat16 tensor-core peak (989 TFLOP/s, H100 and H200 SXM).

It refuses to run without a CUDA GPU, TVM's CUDA runtime, and a CUDA build of PyTorch, and says which
is missing.  On a GPU machine without TVM's compiler, ``gpu_device.py`` bundles cuda builds made
elsewhere and times them through ``bench_model(..., artifact=DIR)``.  UNTESTED: written on a machine
without a GPU; it has never been run.  The attngraph side (build for cuda, kernel names, flop count)
was exercised there only up to the point where the GPU is needed.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import click
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from timing import kernel_totals, median_ms  # noqa: E402

#: name -> (d_model, heads, d_ff, layers)
MODELS = {
    "transformer-base-encoder": (512, 8, 2048, 6),
    "bert-size": (384, 12, 1536, 6),
}
CASES = ((8, 512),)
#: H100 SXM peaks (dense): float32 on CUDA cores, TF32 on tensor cores.
H100_FP32_TFLOPS = 67.0
H100_TF32_TFLOPS = 495.0
#: H100 / H200 SXM dense float16 and bfloat16 peak on tensor cores.
HALF_TFLOPS = 989.0


def gpu_problem() -> str | None:
    """Why this benchmark cannot run here, or None."""
    try:
        import cuda.bindings  # noqa: F401 - NVRTC, TVM's default compiler for the stored CUDA source
    except ImportError:
        if shutil.which("nvcc"):
            os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    from attngraph.backends.tvm.targets.cuda import cuda_runtime_problem
    problem = cuda_runtime_problem()
    if problem:
        return f"attngraph's cuda target cannot run here: {problem}"
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return f"this PyTorch ({torch.__version__}) has no usable CUDA device (a CPU build, or no GPU visible)"
    return None


def gpu_ms(fn, repeat: int) -> float:
    import torch
    return median_ms(fn, repeat, warmup=3, settle=0.0, sync=torch.cuda.synchronize)


def attention_kernel(compiled, inputs, repeat: int):
    """(kernel name, seconds, flops) of the first fused attention kernel at these inputs, timed alone
    on the GPU by TVM's time_evaluator on random operands of its shapes."""
    import tvm

    from attngraph.backends.tvm.runtime.executor import flops
    from attngraph.inputs import bind_dims
    g = compiled.graph
    dims = bind_dims(g.input_types(), inputs)
    step = next((s for s in compiled.steps if s.kind == "kernel" and g.node(s.node).op == "fused_attention"), None)
    if step is None:
        return None
    n = g.node(step.node)
    shapes = [g.node(o).type.concrete(dims) for o in step.operands]
    rng = np.random.default_rng(0)
    from attngraph.ir.types import numpy_dtype
    args = [compiled.device.upload(rng.standard_normal(s).astype(numpy_dtype(g.node(o).type.dtype))
                                   if g.node(o).type.is_float else np.ones(s, g.node(o).type.dtype))
            for s, o in zip(shapes, step.operands)]
    out = compiled.device.upload(np.empty(n.type.concrete(dims), numpy_dtype(n.type.dtype)))
    timer = compiled.device.module.time_evaluator(step.kernel, tvm.cuda(0), number=10, repeat=repeat)
    seconds = float(np.median(timer(*args, out, *[dims[d] for d in step.scalars]).results))
    return step.kernel, seconds, flops(n.op, n.attrs, shapes, n.type.concrete(dims)), shapes


def print_kernels(compiled, inputs) -> None:
    """Where attngraph's time goes: each distinct kernel's calls timed one by one (synchronized before
    and after each, so launch and wait are included), with TFLOP/s for the matmul work."""
    per = kernel_totals(compiled, inputs)
    total = sum(t for t, _, _ in per.values())
    for (kernel, op), (t, f, n) in sorted(per.items(), key=lambda kv: -kv[1][0]):
        rate = f"{f / t / 1e12:6.1f} TFLOP/s" if f else " " * 13
        print(f"    {kernel:28s} {op:16s} x{n:<3d} {t * 1e3:8.3f} ms {rate}  {t / total:4.0%} of kernel time")


def half_peers(compiled, inputs, d: int, heads: int, ff: int, layers: int, batch: int, seq: int, dtype: str,
               repeat: int) -> str:
    """attngraph's tensor-core kernels against PyTorch's in ``dtype``: the attention kernel against SDPA's
    FlashAttention backend on (batch, heads, seq, d / heads), and the projection kernels together against
    ``F.linear`` (cuBLAS) on each layer's four projections; TFLOP/s and ratios, printed; one summary line."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    tdtype = getattr(torch, dtype)
    q, k, v = (torch.randn(batch, heads, seq, d // heads, device="cuda", dtype=tdtype) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash_s = gpu_ms(lambda: F.scaled_dot_product_attention(q, k, v), repeat) / 1e3
    flash_tflops = 4 * batch * heads * seq * seq * (d // heads) / flash_s / 1e12
    kernel = attention_kernel(compiled, inputs, repeat)
    ours = kernel[2] / kernel[1] / 1e12 if kernel else float("nan")
    shapes = [(d, 3 * d), (d, d), (d, ff), (ff, d)]
    xs = {kdim: torch.randn(batch * seq, kdim, device="cuda", dtype=tdtype) for kdim in (d, ff)}
    ws = [torch.randn(n, kdim, device="cuda", dtype=tdtype) for kdim, n in shapes]
    cublas_s = layers * sum(gpu_ms(lambda w=w, kdim=kdim: F.linear(xs[kdim], w), repeat) / 1e3
                            for (kdim, _), w in zip(shapes, ws))
    work = layers * sum(2 * batch * seq * kdim * n for kdim, n in shapes)
    per = kernel_totals(compiled, inputs)
    proj = [(t, f) for (_, op), (t, f, _) in per.items() if op in ("linear", "matmul")]
    proj_s, proj_work = sum(t for t, _ in proj), sum(f for _, f in proj)
    ours_proj, cublas = proj_work / proj_s / 1e12 if proj_s else float("nan"), work / cublas_s / 1e12
    line = (f"attention {ours:.1f} TFLOP/s vs FlashAttention-2 (SDPA) {flash_tflops:.1f}: {ours / flash_tflops:.0%}; "
            f"projections {ours_proj:.1f} TFLOP/s vs cuBLAS {cublas:.1f}: {ours_proj / cublas:.0%} "
            f"(peak {HALF_TFLOPS:.0f})")
    print(f"  {dtype}: {line}", flush=True)
    return line


def bench_model(name: str, cases, repeat: int, artifact: str | None = None, dtype: str = "float32") -> list[str]:
    """Time ``name`` at each (batch, seq) case; returns one summary line per case.  ``artifact``: a
    cuda build of it made elsewhere (``gpu_device.py bundle``), loaded instead of compiling here.
    ``dtype``: the build's type (float16, bfloat16: PyTorch's modules are cast to it)."""
    import torch
    from bench_models import torch_encoder

    from attngraph import api, init_params
    from attngraph.models.transformer import TransformerEncoderModel
    from attngraph.nn import trace
    d, heads, ff, layers = MODELS[name]
    start = time.perf_counter()
    if artifact:
        compiled = api.load(artifact)
        params, target = compiled.params, compiled.manifest.get("target")
        how = f"loaded from {artifact} ({target}) in {time.perf_counter() - start:.1f} s"
    else:
        major, minor = torch.cuda.get_device_capability()
        target = f"cuda:sm_{major}{minor}"
        graph = trace(TransformerEncoderModel(d, heads, ff, layers, name=name))
        params = init_params(graph, 0, perturb=True)
        compiled = api.compile(graph, params, target=target, opt_level=3, dtype=dtype)
        how = (f"-O3 for {target}: build {time.perf_counter() - start:.1f} s, {len(compiled.kernels.specs)} "
               f"distinct kernels")
    print(f"\n== {name} ({dtype}): d {d}, heads {heads}, FFN {ff}, {layers} layers; attngraph {how}, "
          f"{compiled.kernel_count} calls; GPU {torch.cuda.get_device_name()}")
    summary = []
    tdtype = getattr(torch, dtype)
    enc = torch_encoder({k: np.asarray(v, np.float32) for k, v in params.items()}, d, heads, ff, layers)
    enc = enc.cuda().to(tdtype)
    with torch.no_grad():
        compiled_torch = torch.compile(enc)
        for batch, seq in cases:
            x = np.random.default_rng(1).standard_normal((batch, seq, d)).astype(np.float32)
            xt = torch.from_numpy(x).cuda().to(tdtype)
            want = enc(xt).float().cpu().numpy()
            got = np.asarray(compiled({"x": x})["y"], np.float32)
            ms = {
                "attngraph": gpu_ms(lambda x=x: compiled({"x": x}), repeat),
                "torch": gpu_ms(lambda xt=xt: enc(xt), repeat),
                "torch+copies": gpu_ms(lambda x=x: enc(torch.from_numpy(x).cuda().to(tdtype)).cpu(), repeat),
                "torch.compile": gpu_ms(lambda xt=xt: compiled_torch(xt), repeat),
                "torch.compile+copies": gpu_ms(lambda x=x: compiled_torch(torch.from_numpy(x).cuda().to(tdtype)).cpu(),
                                                  repeat),
            }
            cells = "  ".join(f"{e} {t:8.2f} ms" for e, t in ms.items())
            ratios = ", ".join(f"vs {e} {ms['attngraph'] / ms[e]:.2f}" for e in ("torch+copies", "torch.compile+copies"))
            print(f"batch {batch} seq {seq}: {cells}\n  attngraph ratio (attngraph / peer) {ratios}; "
                  f"max |attngraph - torch| {np.abs(got - want).max():.1e}", flush=True)
            line = (f"bench {name} {dtype} {batch}x{seq}: attngraph {ms['attngraph']:.2f} ms, torch+copies "
                    f"{ms['torch+copies']:.2f}, torch.compile+copies {ms['torch.compile+copies']:.2f}; {ratios}")
            print_kernels(compiled, {"x": x})
            if dtype != "float32":
                summary.append(f"{line}; {half_peers(compiled, {'x': x}, d, heads, ff, layers, batch, seq, dtype, repeat)}")
                continue
            kernel = attention_kernel(compiled, {"x": x}, repeat)
            if kernel is None:
                print("  no fused attention kernel in this build")
                summary.append(line)
                continue
            kname, seconds, work, shapes = kernel
            tflops = work / seconds / 1e12
            print(f"  attention kernel {kname} on {shapes[0]}: {seconds * 1e3:.3f} ms, {tflops:.2f} TFLOP/s = "
                  f"{tflops / H100_FP32_TFLOPS:.1%} of the H100 float32 peak ({H100_FP32_TFLOPS:.0f}), "
                  f"{tflops / H100_TF32_TFLOPS:.1%} of its TF32 tensor-core peak ({H100_TF32_TFLOPS:.0f})")
            summary.append(f"{line}; attention kernel {seconds * 1e3:.3f} ms, {tflops:.2f} TFLOP/s")
    return summary


@click.command()
@click.option("--model", "model_names", multiple=True, type=click.Choice(list(MODELS)), help="Default: both.")
@click.option("--case", "case_names", multiple=True, metavar="BxS", help="batch x sequence (default 8x512).")
@click.option("--repeat", default=20, show_default=True)
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16", "bfloat16"]))
def main(model_names, case_names, repeat, dtype):
    """Benchmark attngraph's cuda build against PyTorch eager (SDPA) and torch.compile on a GPU."""
    problem = gpu_problem()
    if problem:
        raise click.ClickException(f"bench_gpu.py needs a CUDA GPU: {problem}")
    cases = [tuple(int(v) for v in c.split("x")) for c in case_names] or list(CASES)
    for name in model_names or MODELS:
        bench_model(name, cases, repeat, dtype=dtype)


if __name__ == "__main__":
    main()
