"""Kernel A/B on a GPU: each candidate form of the projection and attention kernels at the benchmark
encoders' shapes (batch 8 x seq 512), timed alone and checked against PyTorch on the same operands.

    python bench/gpu_ab.py build [--out DIR] [--arch sm_90] [--baseline REV]   # here: compile ab.so
    python bench/gpu_ab.py check DIR                                            # there: time and check
    python bench/gpu_ab.py emulate [--batch 1 --seq 67]                         # here: numerics only, on
                                                                                # the CUDA source emulator

This is how the hand-written GPU kernels were chosen without a GPU at hand: every candidate is compiled
here into one CUDA module with a JSON index (``gpu_device.py bundle`` puts it in the bundle), and the GPU
machine runs it with TVM's runtime alone.  Candidates:

- projections (``linear``, with bias; ReLU on the first FFN matmul): the register-tiled kernel of
  ``gpu_kernels.linear`` at each workgroup tile of ``TILES`` (the one ``linear_tile`` picks is marked),
  and dlight's default schedule of the generic lowering (what the cuda target used before);
- attention (as the encoders' builds plan it): ``gpu_kernels.flash_attention`` at several key-tile
  sizes, and the same function of git revision ``--baseline`` (the kernel before the current one);
- the same shapes in float16 and bfloat16 (``HALF``): the tensor-core projection (``tensor_cores.mma_linear``)
  at each of its workgroup tiles, and the tensor-core attention (``tensor_cores.mma_attention``) at several
  key tiles and warp counts, beside dlight's schedule (float16 matmuls: its WMMA rule) and the SIMT kernel.

``check`` prints, per shape, each candidate's median time, its TFLOP/s and its ratio to PyTorch's
(cuBLAS float32 without TF32 for ``addmm``, in the half types cuBLAS on tensor cores;
``scaled_dot_product_attention`` for attention: FlashAttention-2 in the half types), and the
largest difference from the float64 reference (the interpreter's op on the same operands), so a
candidate that is fast and wrong is seen at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types

import click
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from timing import median_ms  # noqa: E402

#: The benchmark's batch and sequence (bench_gpu.py's encoders).
BATCH, SEQ = 8, 512
TILES = ((128, 128), (64, 128), (128, 64), (64, 64))
ATTENTION_TILES = (8, 16, 32)
#: The half-precision types whose tensor-core candidates are timed, and the (keys, warps) of the attention's.
HALF = ("float16", "bfloat16")
MMA_ATTENTION_FORMS = ((32, 4), (64, 4), (128, 4), (64, 8))
#: The commit whose attention kernel is the baseline (one dot-product chain per thread, scores in local memory).
BASELINE = "292b9bc"


def _specs():
    """[(label, KernelSpec)] of the projections and attention of the benchmark encoders, as their builds plan them."""
    from attngraph.backends.tvm.build import for_target
    from attngraph.backends.tvm.plan import plan_kernels
    from attngraph.models.transformer import TransformerEncoderModel
    from attngraph.nn import trace
    from attngraph.passes import optimize
    from attngraph.passes.precision import to_dtype
    from bench_gpu import MODELS
    out = []
    for dtype in ("float32",) + HALF:
        for name, (d, heads, ff, layers) in MODELS.items():
            traced = trace(TransformerEncoderModel(d, heads, ff, 1, name=name))
            graph, _ = optimize(traced if dtype == "float32" else to_dtype(traced, dtype), 3)
            tag = "" if dtype == "float32" else f" {dtype}"
            for spec in plan_kernels(for_target(graph, "cuda"))[0]:
                if spec.op == "linear":
                    k, n = spec.in_types[1].shape
                    act = spec.attrs.get("activation", "none")
                    out.append((f"{name}{tag} linear {k}x{n}{'' if act == 'none' else ' ' + act}", spec))
                elif spec.op == "fused_attention":
                    out.append((f"{name}{tag} attention on the merged QKV {spec.in_types[0]}", spec))
            if dtype == "float32":  # and on separate q, k, v (before read_merged_qkv; what the baseline kernel reads)
                spec = next(s for s in plan_kernels(graph)[0] if s.op == "fused_attention")
                out.append((f"{name} attention on q, k, v {spec.in_types[0]}", spec))
    return out


def _baseline_module(rev: str):
    """gpu_kernels.py as of git revision ``rev``, as a module (None when git cannot show it)."""
    path = "attngraph/backends/tvm/gpu_kernels.py"
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    try:
        text = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType(f"gpu_kernels_{rev}")
    exec(compile(text, f"{rev}:{path}", "exec"), module.__dict__)  # noqa: S102 - this repository's own code
    return module


def candidates(cuda, baseline: str | None):
    """{function name: (label, variant, spec, PrimFunc)} of every candidate for the cuda target ``cuda``."""
    from attngraph.backends.tvm.build import finish, generic_func
    from attngraph.backends.tvm.shapes import DimVars
    from attngraph.backends.tvm.targets.cuda import tensor_cores
    from attngraph.backends.tvm.targets.gpu import kernels as gpu_kernels
    target = cuda.tvm_target
    old = _baseline_module(baseline) if baseline else None
    dv = DimVars()
    out = {}
    for i, (label, spec) in enumerate(_specs()):
        forms = {}
        if str(spec.out_type.dtype) in HALF and spec.op == "linear":
            for tile in tensor_cores.LINEAR_TILES:
                mark = "*" if tile == (tensor_cores.PM, tensor_cores.PN) else ""
                forms[f"mma {tile[0]}x{tile[1]}{mark}"] = tensor_cores.mma_linear(spec, dv, target, tile)
        elif str(spec.out_type.dtype) in HALF:
            for keys, warps in MMA_ATTENTION_FORMS:
                mark = "*" if (keys, warps) == (tensor_cores.KEYS, tensor_cores.WARPS) else ""
                forms[f"mma K{keys} W{warps}{mark}"] = tensor_cores.mma_attention(spec, dv, target, keys=keys,
                                                                                   warps=warps)
            forms["SIMT flash"] = gpu_kernels.flash_attention(spec, dv, target)
        elif spec.op == "linear":
            chosen = gpu_kernels.linear_tile(spec.in_types[1].shape[1])
            for tile in TILES:
                mark = "*" if tile == chosen else ""
                forms[f"tile {tile[0]}x{tile[1]}{mark}"] = gpu_kernels.linear(spec, dv, target, tile=tile)
        else:
            for bk in ATTENTION_TILES:
                mark = "*" if bk == gpu_kernels.BK else ""
                forms[f"flash BK {bk}{mark}"] = gpu_kernels.flash_attention(spec, dv, target, key_tile=bk)
            if old is not None:
                forms[f"flash @{baseline}"] = old.flash_attention(spec, dv, target)
        forms["dlight"] = generic_func(spec, dv, cuda)
        for j, (variant, func) in enumerate(forms.items()):
            if func is None:
                continue
            name = f"ab{i}_{j}"
            out[name] = (label, variant, spec, finish(func, spec, dv, name))
    return out


@click.group()
def main():
    """Compile the kernel candidates here; time and check them on a GPU machine."""


@main.command()
@click.option("--out", default=".device/ab", show_default=True)
@click.option("--arch", default="sm_90", show_default=True)
@click.option("--baseline", default=BASELINE, show_default=True,
              help="Git revision whose flash_attention is also timed ('' for none).")
def build(out, arch, baseline):
    """Compile every candidate into DIR/ab.so with its index DIR/ab.json."""
    import tvm

    from attngraph.backends.tvm.shapes import scalar_dims
    from attngraph.backends.tvm.targets import get_target
    target = get_target(f"cuda:{arch}")
    start = time.perf_counter()
    funcs = candidates(target, baseline or None)
    executable = target.compile(tvm.IRModule({n: f for n, (_, _, _, f) in funcs.items()}))
    os.makedirs(out, exist_ok=True)
    executable.export_library(os.path.join(out, "ab.so"))
    index = []
    for name, (label, variant, spec, _) in funcs.items():
        index.append({"name": name, "label": label, "variant": variant, "op": spec.op, "attrs": spec.attrs,
                      "in_types": [[list(t.shape), str(t.dtype)] for t in spec.in_types],
                      "out_type": [list(spec.out_type.shape), str(spec.out_type.dtype)],
                      "scalars": list(scalar_dims(tuple(spec.in_types) + (spec.out_type,)))})
    with open(os.path.join(out, "ab.json"), "w") as f:
        json.dump({"arch": arch, "batch": BATCH, "seq": SEQ, "kernels": index}, f, indent=1)
    click.echo(f"{len(funcs)} candidate kernels for {arch} in {time.perf_counter() - start:.1f} s -> {out}/ab.so")


def _reference(entry, host):
    """The float64 result of ``entry``'s op on ``host`` operands (the interpreter's semantics)."""
    from attngraph.ir.fused import fused_attention
    from attngraph.weights import is_float_array
    args = [a.astype(np.float64) if is_float_array(a) else a for a in host]
    if entry["op"] == "linear":
        y = args[0] @ args[1] + (args[2] if len(args) == 3 else 0)
        return np.maximum(y, 0) if entry["attrs"].get("activation") == "relu" else y
    return fused_attention(*args, **entry["attrs"])


def _torch_run(entry, host):
    """A callable running PyTorch's kernel for ``entry`` on GPU copies of ``host`` (timed, not checked:
    attention in PyTorch's own (batch, heads, seq, dim) layout)."""
    import torch
    import torch.nn.functional as F
    t = [torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16).cuda() if a.dtype.name == "bfloat16"
         else torch.from_numpy(a).cuda() for a in host]
    if entry["op"] == "linear":
        x2 = t[0].reshape(-1, t[0].shape[-1])
        relu = entry["attrs"].get("activation") == "relu"
        if len(t) == 3:
            return lambda: torch.relu_(torch.addmm(t[2], x2, t[1])) if relu else torch.addmm(t[2], x2, t[1])
        return lambda: torch.relu_(x2 @ t[1]) if relu else x2 @ t[1]
    q, k, v = t[:3]
    heads = entry["attrs"].get("heads")
    if heads:  # the windows of the merged projection, as PyTorch's MHA has them: separate tensors
        n = heads[0]
        q, k, v = (a[:, :, h0:h0 + n].contiguous() for a, h0 in zip((q, k, v), heads[1:]))
    if entry["attrs"].get("layout") == "bshd":
        q, k, v = (a.transpose(1, 2).contiguous() for a in (q, k, v))
    mask = t[3] if len(t) > 3 else None  # timing only: the first mask, as SDPA's attn_mask
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=entry["attrs"].get("scale", 1.0))


@main.command()
@click.argument("ab_dir", default=".device/ab")
@click.option("--repeat", default=5, show_default=True, help="Repeats of time_evaluator (median taken).")
def check(ab_dir, repeat):
    """Time every candidate and PyTorch's kernel on the GPU; print the table."""
    check_rows(ab_dir, repeat)


def _operands(entry, dims, rng) -> tuple[list[np.ndarray], tuple]:
    """Random operands of ``entry``'s kernel at ``dims``, and its output shape."""
    from attngraph.ir import TensorType
    from attngraph.ir.types import numpy_dtype
    types_ = [TensorType(tuple(s), dt) for s, dt in entry["in_types"]]
    host = []
    for t in types_:
        s = t.concrete(dims)
        if t.dtype == "bool":  # key padding: the last 10% of every sequence's keys hidden
            m = np.ones(s, bool)
            m[..., int(s[-1] * 0.9):] = False
            host.append(m)
        else:
            host.append((rng.standard_normal(s) * (0.1 if len(s) == 2 else 1.0)).astype(np.float32)
                        .astype(numpy_dtype(t.dtype)))
    return host, TensorType(tuple(entry["out_type"][0]), entry["out_type"][1]).concrete(dims)


def _time_label(label, entries, dims, module, dev, repeat, rng) -> list[str]:
    """The rows of one shape at ``dims``: PyTorch's kernel, then each candidate (time, TFLOP/s, ratio,
    largest difference from the float64 op)."""
    import torch
    import tvm

    from attngraph.backends.tvm.runtime.executor import flops
    first = entries[0]
    host, out_shape = _operands(first, dims, rng)
    work = flops(first["op"], first["attrs"], [a.shape for a in host], out_shape)
    want = _reference(first, host)
    ref_fn = _torch_run(first, host)
    # 20 calls back to back per timing, as time_evaluator's number=20 below: launches overlap alike
    torch_s = median_ms(lambda: [ref_fn() for _ in range(20)], repeat, warmup=1, settle=0.0,
                        sync=torch.cuda.synchronize) / 20 / 1e3
    rows = [f"{label} at {'x'.join(str(v) for v in dims.values())}: PyTorch {torch_s * 1e3:.3f} ms "
            f"{work / torch_s / 1e12:.2f} TFLOP/s"]
    args = [tvm.runtime.tensor(a, dev) for a in host]
    for entry in entries:
        out = tvm.runtime.empty(out_shape, entry["out_type"][1], dev)
        scalars = [dims[d] for d in entry["scalars"]]
        try:
            module[entry["name"]](*args, out, *scalars)
            err = float(np.nanmax(np.abs(out.numpy().astype(np.float64) - want)))
            timer = module.time_evaluator(entry["name"], dev, number=20, repeat=repeat)
            s = float(np.median(timer(*args, out, *scalars).results))
            rows.append(f"  {entry['variant']:16s} {s * 1e3:8.3f} ms {work / s / 1e12:6.2f} TFLOP/s "
                        f"x{s / torch_s:5.2f} of PyTorch's time  max|diff| {err:.1e}")
        except Exception as e:  # noqa: BLE001 - one candidate's failure must not hide the others
            rows.append(f"  {entry['variant']:16s} ERROR {type(e).__name__}: {str(e)[:200]}")
    click.echo("\n".join(rows))
    return rows


@main.command()
@click.option("--batch", default=1, show_default=True)
@click.option("--seq", default=67, show_default=True, help="67: a partial tile of rows at batch 1 and 2.")
@click.option("--baseline", default=BASELINE, show_default=True)
def emulate(batch, seq, baseline):
    """Check every candidate's numerics here, without a GPU: its CUDA source on the CUDA source emulator
    (attngraph's ``--device emulator``; small sizes: the emulator runs a GPU's threads one after another)."""
    from attngraph.backends.tvm.shapes import scalar_dims
    from attngraph.backends.tvm.targets import get_target
    from attngraph.backends.tvm.targets.cuda.emulator import CudaEmulator
    from attngraph.ir.types import numpy_dtype
    from attngraph.numerics import compare
    start = time.perf_counter()
    target = get_target("cuda:sm_90")
    funcs = candidates(target, baseline or None)
    emu = CudaEmulator.from_funcs({n: f for n, (_, _, _, f) in funcs.items()}, target)
    click.echo(f"{len(funcs)} candidates compiled for the emulator in {time.perf_counter() - start:.0f} s")
    dims, rng, bad = {"batch": batch, "seq": seq}, np.random.default_rng(0), 0
    by_label: dict = {}
    for name, (label, variant, spec, _) in funcs.items():
        by_label.setdefault(label, []).append((name, variant, spec))
    for label, entries in by_label.items():
        spec = entries[0][2]
        entry = {"op": spec.op, "attrs": spec.attrs, "in_types": [[list(t.shape), str(t.dtype)] for t in spec.in_types],
                 "out_type": [list(spec.out_type.shape), str(spec.out_type.dtype)]}
        host, out_shape = _operands(entry, dims, rng)
        want = _reference(entry, host)
        bound = None
        if spec.op == "linear" and str(spec.out_type.dtype) == "float32":  # float32 sums of K products: rounding grows as sqrt(K) times their sizes
            x, w = (np.abs(a.astype(np.float64)) for a in host[:2])
            sizes = x @ w + (np.abs(host[2]) if len(host) == 3 else 0)
            bound = 1e-6 + 8 * np.sqrt(w.shape[0]) * 2.0 ** -24 * sizes
        click.echo(f"{label} at {batch}x{seq}:")
        for name, variant, spec in entries:
            ok, err = True, 0.0
            for _ in range(2):  # the emulator's two launch modes (guard pages after / before, thread order)
                out = np.full(out_shape, np.nan, np.float32).astype(numpy_dtype(str(spec.out_type.dtype)))
                emu.call(name, host + [out] + [dims[d] for d in scalar_dims(tuple(spec.in_types) + (spec.out_type,))])
                if bound is None:  # attention, and the half types: the tolerance of every compiled result
                    result = compare(name, out, want)
                    ok, err = ok and result.ok, max(err, result.max_abs)
                else:
                    diff = np.abs(out - want)
                    ok, err = ok and bool(np.all(diff <= bound)), max(err, float(np.max(diff)))
            bad += not ok
            click.echo(f"  {variant:16s} max|diff| {err:.1e}  {'PASS' if ok else 'FAIL'}")
    click.echo(f"{len(funcs) - bad} of {len(funcs)} candidates match the float64 op "
               f"({time.perf_counter() - start:.0f} s)")
    if bad:
        raise SystemExit(1)


def check_rows(ab_dir: str, repeat: int) -> list[str]:
    """``check``: prints each shape's rows as it goes and the whole table at the end; returns its lines.
    Every shape at the benchmark's batch x seq, and the projections also at 8 rows (a decode step of
    8 sequences, where the build calls dlight's kernel: its ``FEW_ROWS`` form)."""
    import torch
    import tvm
    torch.backends.cuda.matmul.allow_tf32 = False
    with open(os.path.join(ab_dir, "ab.json")) as f:
        index = json.load(f)
    dims = {"batch": index["batch"], "seq": index["seq"]}
    start = time.perf_counter()
    module = tvm.runtime.load_module(os.path.join(ab_dir, "ab.so"))
    dev = tvm.cuda(0)
    click.echo(f"loaded {len(index['kernels'])} kernels in {time.perf_counter() - start:.1f} s (NVRTC); "
               f"GPU {torch.cuda.get_device_name()}")
    rng = np.random.default_rng(0)
    by_label: dict = {}
    for entry in index["kernels"]:
        by_label.setdefault(entry["label"], []).append(entry)
    rows = []
    for label, entries in by_label.items():
        rows += _time_label(label, entries, dims, module, dev, repeat, rng)
    for label, entries in by_label.items():
        if entries[0]["op"] == "linear":
            rows += _time_label(label, entries, {"batch": 8, "seq": 1}, module, dev, repeat, rng)
    head = "== kernel A/B (* = the kernel the build uses at more than 8 rows)"
    click.echo(f"\n{head}\n" + "\n".join(rows))
    return [head] + rows


if __name__ == "__main__":
    main()
