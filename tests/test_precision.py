"""Models in half precision (``compile(dtype=)``, ``--dtype``; ``passes.precision``): float16 and bfloat16
storage, float32 arithmetic, the interpreter rounding each value as a build stores it.

Tolerances (``attngraph.numerics.TOLERANCE``) against the float64 interpreter of the same half-precision graph,
which rounds each op's result to the storage type: float16 rtol 1e-2, atol 1e-2; bfloat16 4e-2, 4e-2 (one
rounding of a value computed a little differently flips the last bit: 2^-11 relative in float16, 2^-8 in
bfloat16, and the flips travel through the layers).
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import tvm

import attngraph as ag
from attngraph import reference
from attngraph.backends import BuildError
from attngraph.backends.tvm.build import kernel_func
from attngraph.backends.tvm.plan import KernelSpec
from attngraph.backends.tvm.shapes import DimVars, scalar_dims
from attngraph.backends.tvm.targets import get_target, target_status
from attngraph.ir import Graph, TensorType
from attngraph.ir import ops as O
from attngraph.ir.types import numpy_dtype
from attngraph.numerics import compare
from attngraph.passes.precision import PrecisionError, to_dtype

from op_cases import CASES, SIZES, case_id, case_operands

HALF = ["float16", "bfloat16"]


def rounded(x, dtype):
    return np.asarray(x, np.float32).astype(numpy_dtype(dtype)).astype(np.float64)


def test_the_interpreter_rounds_each_value_to_its_type():
    g = Graph("g")
    x = g.add("input", (), {"type": TensorType((4,), "float32")}, name="x")
    w = g.add("param", (), {"type": TensorType((4,), "float32")}, name="w")
    g.set_outputs([("y", g.add("exp", [g.add("mul", [x, w])]))])
    h = to_dtype(g, "bfloat16")
    assert [str(t) for t in h.output_types().values()] == ["bf16[4]"] and h.input_types()["x"].dtype == "float32"
    xv, wv = np.array([0.1, 1.3, -2.7, 3.14159]), np.array([1.001, 0.77, 3.3, -0.5])
    got = reference.run(h, {"x": xv}, {"w": wv}, dtype="float64")["y"]
    want = rounded(np.exp(rounded(rounded(xv, "bfloat16") * rounded(wv, "bfloat16"), "bfloat16")), "bfloat16")
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, np.exp(xv * wv))


def test_only_float32_models_convert_to_a_half_type():
    g = Graph("g")
    x = g.add("input", (), {"type": TensorType((4,), "float64")}, name="x")
    g.set_outputs([("y", g.add("neg", [x]))])
    with pytest.raises(PrecisionError, match="float64 parameters or inputs"):
        to_dtype(g, "float16")
    with pytest.raises(PrecisionError, match="not 'int8'"):
        to_dtype(g, "int8")
    with pytest.raises(BuildError, match="dtype 'float64'"):
        ag.compile("encoder-tiny", dtype="float64")
    with pytest.raises(BuildError, match="WGSL has no bfloat16"):
        ag.compile("encoder-tiny", target="vulkan", dtype="bfloat16")


# -- every op's lowering computes in float32 from half-precision operands -------------------------------

HALF_CASES = [c for c in CASES if any(t.dtype == "float32" for t in c[2]) and not c[1].get("dtype") == "float64"
              and c[0] not in ("pack_panels", "linear_packed", "swiglu_packed", "column_scales", "quantize_panels",
                               "linear_int8")]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", HALF_CASES, ids=[case_id(c) for c in HALF_CASES])
def test_every_op_in_half_precision_on_llvm(case, dtype):
    """The generic lowering with the float32 operands in ``dtype``: the result is the float64 meaning of the
    rounded operands, rounded once to ``dtype`` (its arithmetic in float32, not in ``dtype``)."""
    op, attrs, types = case
    attrs = {**O.get(op).defaults, **attrs}
    types = [t.with_dtype(dtype) if t.dtype == "float32" else t for t in types]
    out_type = O.get(op).infer(list(types), attrs)
    target = get_target("llvm")
    func = kernel_func(KernelSpec("k", op, attrs, tuple(types), out_type), DimVars(), target, generic=True)
    fn = tvm.compile(tvm.IRModule({"k": func}), target=target.tvm_target)["k"]
    rng = np.random.default_rng(0)
    for sizes in SIZES:
        args = case_operands(case, attrs, sizes, rng)
        args = [a.astype(numpy_dtype(dtype)) if t.dtype == dtype else a for a, t in zip(args, types)]
        wide = [a.astype(np.float64) if t.dtype == dtype else a for a, t in zip(args, types)]
        want = np.asarray(O.get(op).ref(*wide, **O.bind_attrs(attrs, sizes)))
        if out_type.dtype == dtype:
            want = rounded(want, dtype)
        out = tvm.runtime.empty(out_type.concrete(sizes), out_type.dtype)
        fn(*[tvm.runtime.tensor(np.require(a, requirements="C")) for a in args], out,
           *[sizes[d] for d in scalar_dims(list(types) + [out_type])])
        got = out.numpy()
        if out_type.dtype == dtype:
            assert got.dtype == numpy_dtype(dtype)
            check = compare(op, got, want)
            assert check.ok, f"{check} at {sizes}"
        else:
            np.testing.assert_array_equal(got, want)


def test_a_cast_to_bfloat16_rounds_inside_a_kernel():
    """``cast(w, bfloat16) * scale`` in one kernel (a float32 master weight cast where a mixed-precision step reads it,
    times a folded constant): the cast rounds, as the interpreter's does.  TVM folds ``float32(bfloat16(x))`` back to
    ``x`` where the value feeds float32 arithmetic, which left a third of these products a bit off."""
    program = (("cast", (0,), (("dtype", "bfloat16"),)), ("mul", (2, 1), ()))
    types = (TensorType((4, 64), "float32"), TensorType((), "bfloat16"))
    spec = KernelSpec("k", "fused_elementwise", {"program": program}, types, TensorType((4, 64), "bfloat16"))
    target = get_target("llvm")
    fn = tvm.compile(tvm.IRModule({"k": kernel_func(spec, DimVars(), target)}), target=target.tvm_target)["k"]
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    x[0, :4] = [np.nan, np.inf, -np.inf, 3.3895314e38]  # kept; the largest bfloat16 stays finite
    scale = np.asarray(0.3535, numpy_dtype("bfloat16"))
    want = np.asarray(O.get("fused_elementwise").ref(x, scale, program=program)).astype(np.float32)
    out = tvm.runtime.empty((4, 64), "bfloat16")
    fn(tvm.runtime.tensor(x), tvm.runtime.tensor(scale), out)
    np.testing.assert_array_equal(out.numpy().astype(np.float32), want)


def long_sum_graph(dtype):
    """x (1, 4096) @ w (4096, 1): 4096 products of 0.01, 40.96 in float32 arithmetic; float16 steps would
    stall where 0.01 is below half the spacing of the running sum (0.0156 from 16 on)."""
    g = Graph("sum")
    x = g.add("input", (), {"type": TensorType((1, 4096), "float32")}, name="x")
    w = g.add("param", (), {"type": TensorType((4096, 1), "float32")}, name="w")
    g.set_outputs([("y", g.add("matmul", [x, w]))])
    return g


TARGETS = ["llvm", "vulkan", "cuda"]


def runnable(target, dtype):
    if target == "vulkan" and (dtype == "bfloat16" or target_status("vulkan")["run"]):
        return False
    return target != "cuda" or shutil.which("g++") is not None


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("target", TARGETS)
def test_products_accumulate_in_float32(target, dtype):
    if not runnable(target, dtype):
        pytest.skip(f"{target} does not run {dtype} here")
    device = "emulator" if target == "cuda" else None
    m = ag.compile(long_sum_graph(dtype), {"w": np.full((4096, 1), 0.01, np.float32)}, target=target, dtype=dtype,
                   device=device)
    y = m({"x": np.ones((1, 4096), np.float32)})["y"]
    assert y.dtype == numpy_dtype(dtype)
    w = float(rounded(0.01, dtype))
    assert float(y[0, 0]) == pytest.approx(4096 * w, rel=2 ** -7), "summed in float32, rounded once"


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("model", ["encoder-tiny", "gpt-tiny"])
def test_models_in_half_precision_match_the_rounding_interpreter(model, target, dtype):
    if not runnable(target, dtype):
        pytest.skip(f"{target} does not run {dtype} here")
    report = ag.verify(model, target=target, dtype=dtype, device="emulator" if target == "cuda" else None)
    assert report.ok, report.format()
    assert all(c.rtol == {"float16": 1e-2, "bfloat16": 4e-2}[dtype] for c in report.outputs)


def test_a_bfloat16_artifact_builds_saves_loads_and_verifies(tmp_path):
    from click.testing import CliRunner

    from attngraph.cli import main
    out = str(tmp_path / "bf16")
    runner = CliRunner()
    r = runner.invoke(main, ["build", "encoder-tiny", "--dtype", "bfloat16", "-o", out])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["verify", out])
    assert r.exit_code == 0 and "rtol 0.04" in r.output and "PASS" in r.output, r.output
    r = runner.invoke(main, ["verify", out, "--dtype", "float16"])
    assert r.exit_code != 0 and "compiled already" in r.output
    params = ag.load(out).params
    assert {v.dtype.name for v in params.values() if v.dtype.kind != "i"} == {"bfloat16"}


def test_run_in_half_precision_on_the_interpreter_and_compiled():
    from click.testing import CliRunner

    from attngraph.cli import main
    r = CliRunner().invoke(main, ["run", "encoder-tiny", "--dtype", "float16"])
    assert r.exit_code == 0 and "y: float16[2, 16, 32]" in r.output, r.output  # in the type, as a build gives it
    r = CliRunner().invoke(main, ["run", "encoder-tiny", "--dtype", "float16", "--target", "llvm"])
    assert r.exit_code == 0 and "y: float16[2, 16, 32]" in r.output, r.output


# -- tensor cores on cuda, checked on the emulator ----------------------------------------------------------

WMMA_SIGNATURE = ('extern "C" __global__ void __launch_bounds__(32) {name}(half* __restrict__ a, half* __restrict__ b, '
                  'float* __restrict__ c)')
#: c = a b of one 16 x 16 x 16 tile, b's fragment declared in ``{layout}``
WMMA_TILE = WMMA_SIGNATURE + r''' {{
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, half, nvcuda::wmma::row_major> fa;
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, half, nvcuda::wmma::{layout}> fb;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> fc;
  nvcuda::wmma::fill_fragment(fc, 0.0f);
  nvcuda::wmma::load_matrix_sync(fa, a, 16);
  nvcuda::wmma::load_matrix_sync(fb, b, 16);
  nvcuda::wmma::mma_sync(fc, fa, fb, fc);
  nvcuda::wmma::store_matrix_sync(c, fc, 16, nvcuda::wmma::mem_row_major);
}}
'''
WMMA_KERNELS = "".join(WMMA_SIGNATURE.format(name=n) + ";\n" for n in ("tile", "tile_b_as_rows", "tile_lanes_apart")) \
    + WMMA_TILE.format(name="tile", layout="col_major") + WMMA_TILE.format(name="tile_b_as_rows", layout="row_major") \
    + WMMA_SIGNATURE.format(name="tile_lanes_apart") + r''' {
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, half, nvcuda::wmma::row_major> fa;
  nvcuda::wmma::load_matrix_sync(fa, a + (threadIdx.x & 1), 16);
}
'''


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA source emulator compiles with g++")
def test_the_emulator_runs_wmma_and_honours_the_fragment_layouts(tmp_path):
    """A 16 x 16 x 16 tile: B declared col_major is read as B^T's rows (the product a @ b for b stored by
    columns); the same kernel declaring row_major reads another matrix, and its product is wrong here as on
    a GPU; a warp whose lanes load different tiles stops the process with the kernel's name."""
    import subprocess
    import sys

    from attngraph.backends.tvm.targets.cuda.emulator import emulation_library
    from test_cuda_emu import launch
    lib, _ = emulation_library(WMMA_KERNELS, str(tmp_path))
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((16, 16)).astype(np.float16), rng.standard_normal((16, 16)).astype(np.float16)
    want = a.astype(np.float32) @ b.astype(np.float32)
    for name, stored in (("tile", np.ascontiguousarray(b.T)), ("tile_b_as_rows", np.ascontiguousarray(b.T))):
        c = np.zeros((16, 16), np.float32)
        launch(lib, name, (1, 1, 1), (32, 1, 1), [a, stored, c])
        if name == "tile":
            np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-5)
        else:
            assert not np.allclose(c, want, atol=1e-2)
    (tmp_path / "k.cu").write_text(WMMA_KERNELS)
    script = (f"import numpy as np; from attngraph.backends.tvm.targets.cuda.emulator import emulation_library; "
              f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
              f"from test_cuda_emu import launch; "
              f"lib, _ = emulation_library(open({str(tmp_path / 'k.cu')!r}).read(), {str(tmp_path)!r}); "
              f"x = np.zeros((17, 16), np.float16); launch(lib, 'tile_lanes_apart', (1, 1, 1), (32, 1, 1), "
              f"[x, x, np.zeros(256, np.float32)]); print('finished')")
    caught = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert caught.returncode != 0 and "finished" not in caught.stdout
    assert "kernel tile_lanes_apart: wmma::load_matrix_sync with lanes disagreeing" in caught.stderr, caught.stderr


#: one m16n8k16 ``mma.sync`` (PTX fragments): c = a b^T for a (16, 16), b (8, 16); a's fragment read with
#: rows ``{a_row}`` and columns ``{a_col}`` apart, in a block of ``{threads}`` threads
MMA_TILE = """
@T.prim_func
def main(a_h: T.handle, b_h: T.handle, c_h: T.handle):
    T.func_attr({{'global_symbol': 'main', 'tirx.noalias': True, 'tirx.is_scheduled': True}})
    A = T.match_buffer(a_h, (16, 16), "{dtype}")
    B = T.match_buffer(b_h, (8, 16), "{dtype}")
    C = T.match_buffer(c_h, (16, 8), "float32")
    tx = T.launch_thread("threadIdx.x", {threads})
    af = T.alloc_buffer((8,), "{dtype}", scope="local")
    bf = T.alloc_buffer((4,), "{dtype}", scope="local")
    cf = T.alloc_buffer((4,), "float32", scope="local")
    for i in T.unroll(8):
        af[i] = A[tx // 4 + {a_row}, tx % 4 * 2 + i % 2 + {a_col}]
    for i in T.unroll(4):
        bf[i] = B[tx // 4, tx % 4 * 2 + i % 2 + i // 2 * 8]
    for i in T.unroll(4):
        cf[i] = T.float32(0)
    {mma}
    for i in T.unroll(4):
        C[tx // 4 + i // 2 * 8, tx % 4 * 2 + i % 2] = cf[i]
"""
#: the PTX ISA's A fragment (a2, a3 eight rows down; a4..a7 eight columns right), and the two halves mixed up
PTX_A, SWAPPED_A = {"a_row": "i // 2 % 2 * 8", "a_col": "i // 4 * 8"}, {"a_row": "i // 4 * 8", "a_col": "i // 2 % 2 * 8"}


def mma_tile(dtype, threads=32, layout=PTX_A):
    from attngraph.backends.tvm.targets.cuda.tensor_cores import _MMA_TYPE, mma
    kind = _MMA_TYPE[dtype]
    return tvm.script.from_source(MMA_TILE.format(dtype=dtype, threads=threads, mma=mma(kind, "af", "0", "bf", "0", "cf", "0"),
                                                  **layout))


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA source emulator compiles with g++")
@pytest.mark.parametrize("dtype", HALF)
def test_the_emulator_runs_mma_sync_in_the_ptx_fragment_layouts(dtype):
    """One m16n8k16 ``mma.sync`` as TVM emits it (inline PTX), on the emulator: with the PTX ISA's fragment
    layout the product is right; with A's two halves mixed up (a2/a3 taken as the columns to the right, a4..a7
    as the rows below) it is wrong here as on a GPU; a block of 16 threads (half a warp) stops the process."""

    from attngraph.backends.tvm.targets.cuda.emulator import CudaEmulator
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 16)).astype(numpy_dtype(dtype))
    b = rng.standard_normal((8, 16)).astype(numpy_dtype(dtype))
    want = a.astype(np.float64) @ b.astype(np.float64).T
    for layout, right in ((PTX_A, True), (SWAPPED_A, False)):
        emu = CudaEmulator.from_funcs({"main": mma_tile(dtype, layout=layout)})
        assert "mma.sync.aligned.m16n8k16.row.col.f32" in emu.source
        c = np.zeros((16, 8), np.float32)
        emu.call("main", [a, b, c])
        assert np.allclose(c, want, rtol=1e-5, atol=1e-5) == right, layout
    emulator_stops(f"emu = CudaEmulator.from_funcs({{'main': mma_tile({dtype!r}, threads=16)}}); "
                   f"x = np.zeros((16, 16), numpy_dtype({dtype!r})); "
                   f"emu.call('main', [x, x[:8], np.zeros((16, 8), np.float32)])",
                   "kernel main_kernel: mma.sync in a warp without all 32 lanes")


def emulator_stops(code: str, message: str) -> None:
    """Run ``code`` (this module's names, NumPy as np, ``CudaEmulator``, ``numpy_dtype`` at hand) in a fresh
    process: the emulator must stop it, saying ``message``."""
    import subprocess
    import sys
    script = (f"import sys, numpy as np; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
              f"from test_precision import *; from attngraph.ir.types import numpy_dtype; "
              f"from attngraph.backends.tvm.targets.cuda.emulator import CudaEmulator; {code}; print('finished')")
    caught = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert caught.returncode != 0 and "finished" not in caught.stdout
    assert message in caught.stderr, caught.stderr[-2000:]


#: ``ldmatrix.x4`` of a 16 x 16 tile staged in shared memory (rows padded to 24): lane l names row l % 8 of
#: matrix l / 8 (matrices: rows 0-7 / 8-15, then columns 8-15), ``{shift}`` elements past it; its 8 elements
#: come out in C[l]
LDMATRIX_TILE = """
@T.prim_func
def main(a_h: T.handle, c_h: T.handle):
    T.func_attr({{'global_symbol': 'main', 'tirx.noalias': True, 'tirx.is_scheduled': True}})
    A = T.match_buffer(a_h, (16, 16), "float16")
    C = T.match_buffer(c_h, (32, 8), "float16")
    tx = T.launch_thread("threadIdx.x", 32)
    As = T.alloc_buffer((16 * 24,), "float16", scope="shared")
    af = T.alloc_buffer((8,), "float16", scope="local")
    for i in T.unroll(8):
        As[tx // 2 * 24 + tx % 2 * 8 + i] = A[tx // 2, tx % 2 * 8 + i]
    T.tvm_storage_sync("shared")
    T.evaluate(T.ptx_legacy.ldmatrix({trans}, 4, ".b16", af.data, 0, As.access_ptr("r"), (tx // 8 % 2 * 8 + tx % 8) * 24 + tx // 16 * 8 + {shift}, dtype="float16"))
    for i in T.unroll(8):
        C[tx, i] = af[i]
"""


def ldmatrix_tile(trans, shift=0):
    return tvm.script.from_source(LDMATRIX_TILE.format(trans=trans, shift=shift))


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA source emulator compiles with g++")
def test_the_emulator_runs_ldmatrix_in_the_ptx_layouts():
    """``ldmatrix.x4`` (and ``.trans``) as TVM emits it, on the emulator, against the PTX ISA's definition: lane
    l holds in register i the elements (l / 4, 2 (l % 4) + e) of matrix i, transposed (2 (l % 4) + e, l / 4);
    a row address off the 16-byte alignment the instruction requires stops the process."""

    from attngraph.backends.tvm.targets.cuda.emulator import CudaEmulator
    a = np.arange(256, dtype=np.float16).reshape(16, 16)
    for trans in (False, True):
        emu = CudaEmulator.from_funcs({"main": ldmatrix_tile(trans)})
        c = np.zeros((32, 8), np.float16)
        emu.call("main", [a, c])
        want = np.zeros((32, 8), np.float16)
        for lane in range(32):
            for i in range(4):
                m = a[i % 2 * 8:i % 2 * 8 + 8, i // 2 * 8:i // 2 * 8 + 8]
                for e in range(2):
                    want[lane, 2 * i + e] = m[2 * (lane % 4) + e, lane // 4] if trans else m[lane // 4, 2 * (lane % 4) + e]
        np.testing.assert_array_equal(c, want)
    emulator_stops("emu = CudaEmulator.from_funcs({'main': ldmatrix_tile(False, shift=4)}); "
                   "emu.call('main', [np.zeros((16, 16), np.float16), np.zeros((32, 8), np.float16)])",
                   "kernel main_kernel: ldmatrix with a row address not 16-byte aligned")


def attention_graph(d, dv, layout, masks, heads=2):
    """q (b, heads, s, d), k (b, heads, t, d), v (b, heads, t, dv) (``layout`` bshd: seq before heads) and
    ``masks`` [(kind, shape)] into one ``fused_attention``."""
    g = Graph("att")

    def operand(name, seq, width):
        shape = ("b", seq, heads, width) if layout == "bshd" else ("b", heads, seq, width)
        return g.add("input", (), {"type": TensorType(shape, "float32")}, name=name)
    ops = [operand("q", "s", d), operand("k", "t", d), operand("v", "t", dv)]
    for i, (kind, shape) in enumerate(masks):
        dtype = "float32" if kind == "additive" else "bool"
        ops.append(g.add("input", (), {"type": TensorType(shape, dtype)}, name=f"m{i}"))
    attrs = {"scale": d ** -0.5, "mask_kinds": tuple(k for k, _ in masks), "layout": layout}
    g.set_outputs([("y", g.add("fused_attention", ops, attrs))])
    return g


def attention_inputs(g, dims, rng):
    """Random inputs of ``attention_graph`` at ``dims``; a (b, 1, 1, t) padding mask hides every key of
    sequence 1 (its rows NaN, as in the interpreter)."""
    x = {}
    for name, t in g.input_types().items():
        shape = t.concrete(dims)
        if t.dtype == "bool":
            x[name] = rng.random(shape) < 0.7
            if name == "m0" and len(shape) == 4 and shape[2] == 1:
                x[name][1] = False
        else:
            x[name] = rng.standard_normal(shape).astype(np.float32)
    return x


TC_ATTENTION = [  # (d, dv, layout, masks, dims): key tiles of 64 with a tail, query tiles of 64 with a tail
    (32, 32, "bhsd", [("keep", ("b", 1, 1, "t"))], {"b": 2, "s": 70, "t": 90}),
    (64, 32, "bshd", [("drop", ("s", "t")), ("additive", (1, 2, "s", "t"))], {"b": 1, "s": 65, "t": 65}),
    (16, 48, "bhsd", [], {"b": 1, "s": 3, "t": 130}),  # few rows: the decode form (SIMT, half operands)
]


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA source emulator compiles with g++")
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("case", TC_ATTENTION, ids=["keep-padding", "bshd-causal-bias", "decode"])
def test_half_attention_runs_on_tensor_cores_on_cuda(case, dtype):
    """The fused attention in a half type on cuda: the FlashAttention-2-style kernel (``ldmatrix``, ``mma.sync``,
    online softmax over the accumulator fragments) against the rounding interpreter; masks of every kind (an additive
    one stored in the half type, -1e9 in it overflowing to -inf as in the interpreter), a fully masked sequence
    NaN, tails of query and key tiles; at a few query rows the decode form."""
    d, dv, layout, masks, dims = case
    g = attention_graph(d, dv, layout, masks)
    g.meta["dims"] = dims
    m = ag.compile(g, {}, target="cuda", dtype=dtype, device="emulator")
    from attngraph.backends.tvm.targets.cuda import CUDA_SOURCE
    with open(os.path.join(os.path.dirname(m.kernels.library), CUDA_SOURCE)) as f:
        source = f.read()
    assert source.count("mma.sync.aligned.m16n8k16") >= 2 and "ldmatrix.sync.aligned.m8n8.x4.trans" in source
    x = attention_inputs(g, dims, np.random.default_rng(0))
    if len(masks) > 1:
        x["m1"][..., 0] = -1e9
    got = m(x)["y"]
    want = reference.run(m.graph, x, m.params, dtype="float64")["y"]
    check = compare("y", got, want)
    assert got.dtype == numpy_dtype(dtype) and check.ok, check
    launched = set(m.device.launches)
    few = dims["s"] <= 8
    assert any(k.endswith("_fused_attention__few_kernel" if few else "_fused_attention_kernel") for k in launched), launched
    if masks and len(masks[0][1]) == 4 and masks[0][1][2] == 1:
        assert np.isnan(got[1]).all() and not np.isnan(got[0]).any()


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA source emulator compiles with g++")
@pytest.mark.parametrize("dtype", HALF)
def test_a_decoder_with_wide_heads_runs_on_tensor_cores_on_cuda(dtype):
    """A GPT with heads of 32 (d 64, 2 heads, FFN 128) in a half type on cuda: the prompt through the
    tensor-core attention (causal) and projections, a decode step of one row through the few-rows forms, the
    caches stored in the type; each against the rounding interpreter of the same entry."""
    from attngraph.generate import trace_entries
    from attngraph.models.gpt import GPT
    model = GPT(vocab_size=64, d_model=64, num_heads=2, d_ff=128, num_layers=1, max_len=96, name="gpt-wide-heads")
    step = to_dtype(trace_entries(model, 80)["decode_step"], dtype)
    m = ag.compile(step, ag.init_params(step, 0, perturb=True), target="cuda", dtype=None, device="emulator")
    caches = {n: np.zeros(t.concrete({"batch": 2, "cache": 80}), numpy_dtype(dtype)) for n, t in step.input_types().items()
              if n.startswith("cache")}
    rng = np.random.default_rng(0)
    for tokens, pos in ((rng.integers(0, 64, (2, 70)), 0), (rng.integers(0, 64, (2, 1)), 70)):
        x = {"tokens": tokens, "pos": np.int64(pos), **caches}
        got = m(x)
        want = reference.run(m.graph, x, m.params, dtype="float64")
        for name in ("log_probs", "cache.0.k"):
            check = compare(name, got[name], want[name])
            assert got[name].dtype == numpy_dtype(dtype) and check.ok, f"{check} at position {pos}"
        caches = {n: got[n] for n in caches}
    launched = set(m.device.launches)
    assert any(k.endswith("_fused_attention_kernel") for k in launched), launched
    assert any(k.endswith("_fused_attention__few_kernel") for k in launched), launched
    source = m.device.source
    start = source.index("_fused_attention_kernel(", source.index("_fused_attention_kernel(") + 1)
    assert "mma.sync.aligned.m16n8k16" in source[start:source.index('extern "C"', start)]


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA source emulator compiles with g++")
def test_a_wrong_fragment_in_the_attention_kernel_fails_on_the_emulator():
    """The check can fail: the tensor-core attention with the two registers of each B fragment swapped (keys
    2q and 2q + 8 exchanged) computes another product on the emulator."""
    from attngraph.backends.tvm.targets.cuda import CUDA_SOURCE, LAUNCHES
    from attngraph.backends.tvm.targets.cuda.emulator import CudaEmulator
    d, dv, layout, masks, dims = TC_ATTENTION[0]
    g = attention_graph(d, dv, layout, masks)
    g.meta["dims"] = dims
    m = ag.compile(g, {}, target="cuda", dtype="float16", device="emulator")
    x = attention_inputs(g, dims, np.random.default_rng(0))
    want = reference.run(m.graph, x, m.params, dtype="float64")["y"]
    assert compare("y", m(x)["y"], want).ok
    b = '"r"(((unsigned *)(bf_ptr + 0))[{}])'
    swap = lambda src: src.replace(b.format(0) + ", " + b.format(1), b.format(1) + ", " + b.format(0))  # noqa: E731
    folder = os.path.dirname(m.kernels.library)
    m.device = CudaEmulator.from_files(os.path.join(folder, CUDA_SOURCE), os.path.join(folder, LAUNCHES), edit=swap)
    assert b.format(1) + ", " + b.format(0) in m.device.source
    assert not compare("y", m(x)["y"], want).ok


@pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA source emulator compiles with g++")
@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_projections_run_on_tensor_cores_on_cuda(dtype):
    """A projection with bias and GELU (K 96, N 200: a partial column tile) on cuda: the tensor-core kernel
    (``mma.sync``, bias and activation on the accumulators, one rounding) over 3 x 33 rows, and at 3 rows the
    few-rows form (dlight's schedule: in float16 its tensorized matmul, WMMA fragments), each on the
    emulator against the rounding interpreter."""
    g = Graph("proj")
    x = g.add("input", (), {"type": TensorType(("b", "s", 96), "float32")}, name="x")
    w = g.add("param", (), {"type": TensorType((96, 200), "float32")}, name="w")
    bias = g.add("param", (), {"type": TensorType((200,), "float32")}, name="bias")
    g.set_outputs([("y", g.add("gelu", [g.add("add", [g.add("matmul", [x, w]), bias])]))])
    g.meta["dims"] = {"b": 3, "s": 33}
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((96, 200)).astype(np.float32) / 10,
              "bias": rng.standard_normal(200).astype(np.float32)}
    m = ag.compile(g, params, target="cuda", dtype=dtype, device="emulator")
    from attngraph.backends.tvm.targets.cuda import CUDA_SOURCE
    with open(os.path.join(os.path.dirname(m.kernels.library), CUDA_SOURCE)) as f:
        source = f.read()
    assert "mma.sync.aligned.m16n8k16" in source and "ldmatrix.sync.aligned.m8n8.x4.trans" in source
    assert ("nvcuda::wmma::mma_sync" in source) == (dtype == "float16")
    for dims in ({"b": 3, "s": 33}, {"b": 1, "s": 3}):
        inputs = {"x": rng.standard_normal((dims["b"], dims["s"], 96)).astype(np.float32)}
        got = m(inputs)["y"]
        want = reference.run(m.graph, inputs, m.params, dtype="float64")["y"]
        check = compare("y", got, want)
        assert got.dtype == numpy_dtype(dtype) and check.ok, f"{check} at {dims}"
    assert any(k.endswith("_linear_kernel") for k in m.device.launches), m.device.launches
    assert any(k.endswith("_linear__few_kernel") for k in m.device.launches), m.device.launches


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("model", ["encoder-tiny", "transformer-tiny"])
def test_half_builds_on_llvm_take_the_float32_hand_kernels(model, dtype):
    """No half-precision cliff: every op hand-scheduled in a float32 build is hand-scheduled in a half one too (its
    float32 kernel retyped: ``targets/cpu/half.py``), the retyped projections and attention keep their vector loops,
    and the projections widen their weights once per column tile."""
    from attngraph.backends.tvm.build import lower_kernels
    from attngraph.backends.tvm.plan import plan_kernels
    hand, funcs = {}, {}
    for dt in ("float32", dtype):
        graph = ag.compile(model, target="llvm", dtype=None if dt == "float32" else dt).graph
        specs, _ = plan_kernels(graph)
        lowered, names = lower_kernels(graph, "llvm", plan=plan_kernels(graph))
        hand[dt] = sorted((s.op, str(s.out_type.dtype)) for s in specs if s.name in names)
        funcs[dt] = {s.op: lowered[s.name] for s in specs if s.name in names}
    assert [op for op, _ in hand[dtype]] == [op for op, _ in hand["float32"]]
    assert any(t == dtype for _, t in hand[dtype]), "the half build's kernels store halves"
    for op in ("linear_packed", "fused_attention"):
        assert "T.vectorized" in funcs[dtype][op].script(), f"{op} in {dtype} lost its vector loops"
    # the projection reads its half panels as stored and widens a column tile's once, for all its rows; bfloat16
    # on a CPU with bfloat16 dot products multiplies them as they are (``targets/cpu/dot.py``)
    dot = dtype == "bfloat16" and get_target("llvm").tiles.bf16_dot is not None
    assert ("attngraph_dpbf16ps" if dot else 'T.sblock("widened")') in funcs[dtype]["linear_packed"].script()
