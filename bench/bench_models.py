"""End-to-end speed of compiled encoders: attngraph against PyTorch eager, torch.compile and ONNX
Runtime, side by side in one run, on the same inputs and weights and the same thread count.

    python bench/bench_models.py                      # every model and case (several minutes)
    python bench/bench_models.py --model bert-size --case 1x128 --engines attngraph,ort

Engines: attngraph (the model written in the DSL), PyTorch eager, torch.compile, ONNX Runtime, and "imported":
attngraph again, on the torch.nn.TransformerEncoder through ``attngraph.from_torch`` (its time also as a share of the
DSL build's).

Models: the transformer-base encoder (6 layers, d 512, FFN 2048, 8 heads), one transformer-base
encoder layer, and a BERT-size encoder (6 layers, d 384, FFN 1536, 12 heads); post-LN, ReLU.
Cases: batch x sequence.  For each case: every engine's median time, its share of this machine's
float32 peak (measured: ``peak.py``), and attngraph's ratio to the best peer (below 1.0: attngraph is faster).  Then the
attngraph build's matmul kernels, each timed alone, in GFLOP/s and share of peak.  Outputs are
checked against PyTorch eager first (max abs difference printed), so every engine computes the same
thing.  Engines are timed in interleaved rounds (``timing.interleaved_ms``), so a shared machine's
drifting speed slows every engine alike: quote the ratios, and repeat what matters.

``--dtype bfloat16`` (or ``float16``): attngraph built in that type (``compile(dtype=)``: half storage, float32
arithmetic) beside PyTorch eager and torch.compile in it (``module.to(torch.bfloat16)``) and attngraph's float32
build; ONNX Runtime is left out (its CPU provider has no bfloat16 kernels).  Each engine's error is against PyTorch
float32, and the half build's time is also given as a share of attngraph float32's.

``--quantize int8``: attngraph's int8 build (``compile(quantize="int8")``: weights per column, activations per row,
int32 sums) beside ONNX Runtime's ``quantize_dynamic`` (int8 weights; 7-bit on a CPU without VNNI, as its
documentation advises: ``reduce_range``) of its fused model, PyTorch's dynamic
quantization (``torch.ao.quantization.quantize_dynamic`` of its ``nn.Linear`` layers: the attention's projections
stay float32 there) and attngraph float32; each engine's error is against PyTorch float32.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

THREADS = int(os.environ.setdefault("TVM_NUM_THREADS", "2"))
# Same thread count for every engine; set before numpy/torch start their pools.
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(THREADS))

import click  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from peak import peak_gflops  # noqa: E402
from timing import interleaved_ms, kernel_totals  # noqa: E402


#: name -> (d_model, heads, d_ff, layers)
MODELS = {
    "transformer-base-encoder": (512, 8, 2048, 6),
    "transformer-base-layer": (512, 8, 2048, 1),
    "bert-size": (384, 12, 1536, 6),
}
CASES = ((1, 128), (8, 128), (1, 512), (8, 512))
#: not a peer but attngraph too: the same torch.nn.TransformerEncoder brought by ``attngraph.from_torch`` (torch.export,
#: fast path off) instead of written in the DSL; its time is given as a share of the DSL build's
IMPORTED = "imported"
ENGINES = ("attngraph", "torch", "torch.compile", "ort", IMPORTED)
#: the float32 build beside a half-precision one (``--dtype``): not a peer, the time a half build must beat
FLOAT32 = "attngraph float32"


def model_flops(d: int, ff: int, layers: int, batch: int, seq: int) -> float:
    """Multiply-add work of the encoder (2 flops each): projections, FFN, scores and weighted sum."""
    tokens = batch * seq
    per_layer = 2 * tokens * (4 * d * d + 2 * d * ff) + 2 * 2 * batch * seq * seq * d
    return float(per_layer * layers)


def torch_encoder(params: dict, d: int, heads: int, ff: int, layers: int):
    """torch.nn.TransformerEncoder with attngraph's weights (ours are (in, out); torch's (out, in))."""
    import torch

    def t(a):
        return torch.from_numpy(np.ascontiguousarray(a))
    layer = torch.nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, activation="relu", batch_first=True)
    enc = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).eval()
    with torch.no_grad():
        for i, tl in enumerate(enc.layers):
            p = f"encoder.layers.{i}"
            a = tl.self_attn
            a.in_proj_weight.copy_(t(np.concatenate([params[f"{p}.self_attn.{n}_proj.weight"].T for n in "qkv"])))
            a.in_proj_bias.copy_(t(np.concatenate([params[f"{p}.self_attn.{n}_proj.bias"] for n in "qkv"])))
            a.out_proj.weight.copy_(t(params[f"{p}.self_attn.out_proj.weight"].T))
            a.out_proj.bias.copy_(t(params[f"{p}.self_attn.out_proj.bias"]))
            for j in (1, 2):
                getattr(tl, f"linear{j}").weight.copy_(t(params[f"{p}.ffn.linear{j}.weight"].T))
                getattr(tl, f"linear{j}").bias.copy_(t(params[f"{p}.ffn.linear{j}.bias"]))
                getattr(tl, f"norm{j}").weight.copy_(t(params[f"{p}.norm{j}.weight"]))
                getattr(tl, f"norm{j}").bias.copy_(t(params[f"{p}.norm{j}.bias"]))
    return enc


def _has_vnni() -> bool:
    """Whether this CPU has VNNI (AVX512_VNNI or AVX-VNNI).  Without it ONNX Runtime's int8 kernels multiply unsigned
    by signed bytes with vpmaddubsw, whose 16-bit pair sums saturate: its documentation advises 7-bit weights there
    (``reduce_range``), and the default's error was 10-16x attngraph's (0.8-1.4 against PyTorch float32, Zen 3)."""
    from attngraph.backends.tvm.targets.cpu.isa import _cpuinfo_flags
    return bool({"avx512vnni", "avxvnni"} & _cpuinfo_flags())


def ort_session(enc, d: int, heads: int, batch: int, seq: int, workdir: str, quantize: bool = False):
    """An ONNX Runtime session of ``enc`` at this batch and sequence (the exported attention bakes
    its shapes in), with ORT's transformer fusions applied when its optimizer accepts the model; ``quantize``: then
    quantized by ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, activations at each call)."""
    import onnxruntime as ort
    import torch
    path = os.path.join(workdir, f"encoder-{batch}x{seq}.onnx")
    x = torch.zeros(batch, seq, d)
    # The exporter cannot trace PyTorch's fused encoder-layer fast path: export the plain ops.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            torch.onnx.export(enc, (x,), path, dynamo=False, input_names=["x"], output_names=["y"], opset_version=17)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    fused = "plain"
    try:
        from onnxruntime.transformers import optimizer
        opt = optimizer.optimize_model(path, model_type="bert", num_heads=heads, hidden_size=d)
        opt.save_model_to_file(path + ".opt")
        path, fused = path + ".opt", "transformers optimizer"
    except Exception as e:  # noqa: BLE001 - plain ORT is still a fair peer; say which one ran
        fused = f"plain (optimizer failed: {type(e).__name__})"
    if quantize:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
        # (the fused model's own ops have no types for the quantizer's shape inference: it is told they are float,
        # and its warnings about them are kept quiet)
        import logging
        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)
        try:
            quantize_dynamic(path, path + ".int8", weight_type=QuantType.QInt8, reduce_range=not _has_vnni(),
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        finally:
            logging.getLogger().setLevel(level)
        path, fused = path + ".int8", fused + ", quantize_dynamic int8" + ("" if _has_vnni() else
                                                                        " with 7-bit weights (reduce_range: no VNNI)")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]), fused


def bench_model(name: str, cases, engines, repeat: int, cpu: str | None = None, dtype: str = "float32",
                quantize: str | None = None) -> list[dict]:
    import torch

    from attngraph import api, init_params
    from attngraph.models.transformer import TransformerEncoderModel
    from attngraph.nn import trace
    torch.set_num_threads(THREADS)
    d, heads, ff, layers = MODELS[name]
    graph = trace(TransformerEncoderModel(d, heads, ff, layers, name=name))
    params = init_params(graph, 0, perturb=True)
    start = time.perf_counter()
    half = dtype != "float32"
    target = f"llvm:{cpu}" if cpu else "llvm"
    compiled = api.compile(graph, params, target=target, opt_level=3, dtype=dtype if half else None, quantize=quantize)
    print(f"\n== {name}: d {d}, heads {heads}, FFN {ff}, {layers} layer(s); attngraph -O3 {quantize or dtype} build "
          f"{time.perf_counter() - start:.1f} s ({len(compiled.kernels.specs)} distinct kernels, "
          f"{compiled.kernel_count} calls{', cached' if compiled.kernels.cached else ''}); {THREADS} threads")
    other = half or quantize
    base = api.compile(graph, params, target=target, opt_level=3) if other and "attngraph" in engines else None
    enc32 = torch_encoder(params, d, heads, ff, layers)
    enc = torch_encoder(params, d, heads, ff, layers).to(getattr(torch, dtype)) if half else enc32
    if quantize:  # PyTorch's dynamic quantization: its nn.Linear layers (the attention's projections stay float32)
        enc = torch.ao.quantization.quantize_dynamic(torch_encoder(params, d, heads, ff, layers), {torch.nn.Linear},
                                                     dtype=torch.qint8)
        # its fused-layer fast path cannot read quantized weights (it fails on them); a layer with a hook takes its
        # plain forward (one of the conditions PyTorch checks; the global switch is toggled by the export above)
        for layer in enc.layers:
            layer.register_forward_pre_hook(lambda module, args: None)
    imported = imported_encoder(enc32, d, target, dtype if half else None, quantize) if IMPORTED in engines else None
    runners = {}
    with torch.no_grad():
        if "torch.compile" in engines:
            compiled_torch = torch.compile(enc)
        workdir = tempfile.mkdtemp(prefix="bench-ort-")
        rows = []
        for batch, seq in cases:
            session, ort_kind = ort_session(enc32, d, heads, batch, seq, workdir, bool(quantize)) \
                if "ort" in engines else (None, "")
            x = np.random.default_rng(1).standard_normal((batch, seq, d)).astype(np.float32)
            want = enc32(torch.from_numpy(x)).numpy()
            xt = torch.from_numpy(x).to(getattr(torch, dtype))  # a half build takes float32 and rounds it itself
            runners = {"attngraph": lambda x=x: compiled({"x": x}),
                       "torch": lambda xt=xt: enc(xt)}
            if base is not None:
                runners[FLOAT32] = lambda x=x: base({"x": x})
            if "torch.compile" in engines:
                runners["torch.compile"] = lambda xt=xt: compiled_torch(xt)
            if session is not None:
                runners["ort"] = lambda x=x: session.run(None, {"x": x})
            if imported is not None:
                runners[IMPORTED] = lambda x=x: imported({"src": x})
            outputs = {"attngraph": lambda: compiled({"x": x})["y"], FLOAT32: lambda: base({"x": x})["y"],
                       "torch": lambda: enc(xt), "torch.compile": lambda: compiled_torch(xt),
                       "ort": lambda: session.run(None, {"x": x})[0], IMPORTED: lambda: imported({"src": x})["output"]}
            diffs = {e: float(np.abs(as_float32(outputs[e]()) - want).max()) for e in runners
                     if e != "torch" or other}
            flops = model_flops(d, ff, layers, batch, seq)
            timed = [e for e in engines if e in runners] + ([FLOAT32] if base is not None else [])
            ms = interleaved_ms({e: runners[e] for e in timed}, repeat)
            peers = {e: t for e, t in ms.items() if e not in ("attngraph", FLOAT32, IMPORTED)}
            best = min(peers, key=peers.get) if peers else None
            row = {"model": name, "batch": batch, "seq": seq, "ms": ms, "best_peer": best, "diffs": diffs,
                   "ratio": ms["attngraph"] / peers[best] if best and "attngraph" in ms else None}
            rows.append(row)
            cells = "  ".join(f"{e} {t:8.2f} ms ({flops / t / 1e6 / peak_gflops(cpu=cpu):4.0%})" for e, t in ms.items())
            ratio = f"ratio vs best peer ({best}) {row['ratio']:.2f}" if row["ratio"] else ""
            if IMPORTED in ms and "attngraph" in ms:
                row["imported"] = ms[IMPORTED] / ms["attngraph"]
                ratio += f", imported / DSL {row['imported']:.2f}"
            if base is not None:
                row["of_float32"] = ms["attngraph"] / ms[FLOAT32]
                ratio += f", {quantize or dtype} / float32 {row['of_float32']:.2f}"
            print(f"batch {batch:2d} seq {seq:4d}: {cells}  {ratio}  "
                  f"[max |diff| vs torch float32: {', '.join(f'{k} {v:.1e}' for k, v in diffs.items())}]"
                  + (f" [ONNX Runtime: {ort_kind}]" if session is not None else ""), flush=True)
            if "attngraph" in engines:
                print_kernels(compiled, {"x": x}, peak_gflops(cpu=cpu))
    return rows


def imported_encoder(enc, d: int, target: str, dtype: str | None, quantize: str | None = None):
    """``enc`` through ``attngraph.from_torch`` (batch and length symbolic), compiled as the DSL model is."""
    import torch
    from torch.export import Dim

    from attngraph import api, from_torch
    torch.backends.mha.set_fastpath_enabled(False)  # the plain ops, not the whole-layer shortcut
    try:
        graph, params = from_torch(enc, (torch.zeros(2, 16, d),), dynamic_shapes={"src": {0: Dim("batch"),
                                                                                           1: Dim("seq")}})
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    compiled = api.compile(graph, params, target=target, opt_level=3, dtype=dtype, quantize=quantize)
    print(f"imported: torch.nn.TransformerEncoder through torch.export, {compiled.kernel_count} kernel calls")
    return compiled


def as_float32(y) -> np.ndarray:
    """An engine's output (a NumPy array of any float type, a torch tensor) as float32 NumPy."""
    return y.float().numpy() if hasattr(y, "float") else np.asarray(y, np.float32)


def print_kernels(compiled, inputs, peak: float) -> None:
    """The attngraph build's matmul kernels at these inputs, each timed alone, by distinct kernel."""
    time.sleep(0.3)  # the peers' thread pools go quiet first
    compiled(inputs)
    per = {key: v for key, v in kernel_totals(compiled, inputs).items() if v[1]}
    total = sum(t for t, _, _ in per.values())
    for (kernel, op), (t, f, n) in sorted(per.items(), key=lambda kv: -kv[1][1]):
        gf = f / t / 1e9
        print(f"    {kernel:28s} {op:16s} x{n:<3d} {t * 1e3:8.2f} ms  {gf:6.1f} GFLOP/s ({gf / peak:4.0%} of peak)"
              f"  {t / total:4.0%} of kernel time")


AVX2_TORCH = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
              "DNNL_MAX_CPU_ISA": "AVX2"}


def hold_torch_to_avx2() -> None:
    """PyTorch's CPU kernels without AVX-512 (an AVX2 machine's, on this one).  Its libraries read these
    variables when they load, and importing TVM loads PyTorch: so this process runs itself again with them."""
    if any(os.environ.get(k) != v for k, v in AVX2_TORCH.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **AVX2_TORCH})


@click.command()
@click.option("--model", "model_names", multiple=True, type=click.Choice(list(MODELS)), help="Default: all.")
@click.option("--case", "case_names", multiple=True, metavar="BxS", help="batch x sequence, e.g. 8x128. Default: all.")
@click.option("--engines", default=",".join(ENGINES), show_default=True)
@click.option("--repeat", default=5, show_default=True)
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Every engine in this type (ONNX Runtime only in float32); a half type adds attngraph float32.")
@click.option("--quantize", default="none", show_default=True, type=click.Choice(["none", "int8"]),
              help="int8: attngraph's int8 build (compile(quantize='int8')) beside ONNX Runtime's quantize_dynamic "
                   "and PyTorch's dynamic quantization (torch.compile left out) and attngraph float32.")
@click.option("--cpu", default=None, metavar="CPU",
              help="Build attngraph for this CPU model (llvm:CPU), e.g. x86-64-v3 for AVX2 kernels on an AVX-512 "
                   "machine; without AVX-512 there, PyTorch's kernels (ATen, MKL, oneDNN, Inductor) are held to "
                   "AVX2 too. ONNX Runtime cannot be held back: it still runs AVX-512.")
def main(model_names, case_names, engines, repeat, cpu, dtype, quantize):
    """Benchmark attngraph against PyTorch eager, torch.compile and ONNX Runtime."""
    cases = [tuple(int(v) for v in c.split("x")) for c in case_names] or list(CASES)
    quantize = None if quantize == "none" else quantize
    if quantize and dtype != "float32":
        raise click.BadParameter("--quantize quantizes a float32 model: leave --dtype out")
    engines = [e for e in engines.split(",") if e and not (dtype != "float32" and e == "ort")
               and not (quantize and e == "torch.compile")]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise click.BadParameter(f"unknown engines {sorted(unknown)}; known: {', '.join(ENGINES)}")
    from attngraph.backends.tvm.targets import get_target
    llvm = get_target("llvm" if cpu is None else f"llvm:{cpu}")
    target = llvm.tvm_target
    if cpu and llvm.tiles.isa == "avx2":
        hold_torch_to_avx2()
        print("PyTorch held to AVX2 (ATen, MKL, oneDNN, Inductor); ONNX Runtime is not (it picks AVX-512 itself)")
    print(f"float32 peak of {THREADS} threads on this CPU with {target.mcpu}'s instructions ({llvm.tiles.isa} "
          f"kernels): {peak_gflops(cpu=cpu):.0f} GFLOP/s, measured by bench/peak.py")
    rows = []
    for name in model_names or MODELS:
        rows += bench_model(name, cases, engines, repeat, cpu, dtype, quantize)
    ratios = [r["ratio"] for r in rows if r["ratio"]]
    if ratios:
        print(f"\nattngraph / best peer: median {np.median(ratios):.2f}, worst {max(ratios):.2f} "
              f"over {len(ratios)} cases ({sum(r < 1 for r in ratios)} faster than every peer)")
    imports = [r["imported"] for r in rows if "imported" in r]
    if imports:
        print(f"imported / DSL: median {np.median(imports):.2f}, worst {max(imports):.2f}")
    halves = [r["of_float32"] for r in rows if "of_float32" in r]
    if halves:
        print(f"attngraph {quantize or dtype} / attngraph float32: median {np.median(halves):.2f}, worst {max(halves):.2f}")


if __name__ == "__main__":
    main()
