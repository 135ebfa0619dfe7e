"""The hand-scheduled CPU kernels against the NumPy reference functions, in float64.

Each kernel is built once with symbolic dims and run at several sizes: 1, sizes that are not
multiples of the tile factors, and a size spanning several tiles.
"""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from conftest import TOLERANCE  # noqa: E402

from attngraph.backends.tvm.plan import FEW_ROWS, ONE_ROW, KernelSpec  # noqa: E402
from attngraph.backends.tvm.shapes import DimVars  # noqa: E402
from attngraph.backends.tvm.targets import get_target  # noqa: E402
from attngraph.backends.tvm.targets.cpu import kernels  # noqa: E402
from attngraph.backends.tvm.targets.cpu.tiles import AVX2, AVX512, AVX512_BF16, cpu_tiles  # noqa: E402
from attngraph.ir import TensorType  # noqa: E402
from attngraph.ir import dims as D  # noqa: E402
from attngraph.ir import ops as O  # noqa: E402

LLVM = get_target("llvm")
TARGET = LLVM.tvm_target


def spec_of(op: str, attrs: dict, in_types: list[TensorType]) -> KernelSpec:
    opdef = O.get(op)
    attrs = {**opdef.defaults, **attrs}
    return KernelSpec("k", op, attrs, tuple(in_types), opdef.infer(in_types, attrs))


def build(op: str, attrs: dict, in_types: list[TensorType], form: str | None = None, tiles=None):
    """(compiled function, output type, full attrs) for the scheduled kernel of ``op`` (or its ``form``),
    with this CPU's tiles or ``tiles``."""
    spec = spec_of(op, attrs, in_types)
    tiles = tiles or LLVM.tiles
    f = kernels.KERNELS.kernel(spec, DimVars(), tiles) if form is None else kernels.KERNELS.forms(spec, DimVars(), tiles).get(form)
    assert f is not None, f"no scheduled kernel for {op} {in_types}"
    ex = tvm.compile(tvm.IRModule({"k": f.with_attr("global_symbol", "k")}), target=TARGET)
    return ex["k"], spec.out_type, spec.attrs


def random(t: TensorType, sizes: dict, rng) -> np.ndarray:
    shape = tuple(D.evaluate(d, sizes) for d in t.shape)
    if t.dtype == "bool":
        return rng.random(shape) < 0.3
    return rng.standard_normal(shape).astype(t.dtype)


def check(op: str, attrs: dict, in_types: list[TensorType], size_list: list[dict], seed=0, form=None, tiles=None):
    """Run the kernel at every binding in ``size_list`` and compare with the float64 reference."""
    fn, out_type, attrs = build(op, attrs, in_types, form, tiles)
    rtol, atol = TOLERANCE[out_type.dtype]
    rng = np.random.default_rng(seed)
    for sizes in size_list:
        args = [random(t, sizes, rng) for t in in_types]
        want = O.get(op).ref(*[a.astype("float64") if a.dtype != bool else a for a in args], **attrs)
        out = tvm.runtime.empty(tuple(D.evaluate(d, sizes) for d in out_type.shape), out_type.dtype, tvm.cpu())
        fn(*[tvm.runtime.tensor(a) for a in args], out)
        np.testing.assert_allclose(out.numpy(), want, rtol=rtol, atol=atol, err_msg=f"{op} at {sizes}")


T = TensorType
SEQS = [{"batch": 1, "seq": 1}, {"batch": 2, "seq": 7}, {"batch": 3, "seq": 45}]


@pytest.mark.parametrize("k,n", [(32, 48), (24, 20), (64, 1)])
def test_matmul_dense_symbolic_rows(k, n):
    # N = 20 and 1 are not multiples of the 16-column tile; M = 1, 14, 135 not of the 4-row tile.
    check("matmul", {}, [T(("batch", "seq", k), "float32"), T((k, n), "float32")], SEQS)


def test_matmul_dense_2d_and_3_leading_dims():
    check("matmul", {}, [T(("seq", 40), "float32"), T((40, 32), "float32")], [{"seq": 1}, {"seq": 9}])
    check("matmul", {}, [T(("batch", 3, "seq", 16), "float32"), T((16, 16), "float32")],
          [{"batch": 1, "seq": 1}, {"batch": 2, "seq": 5}])


def test_matmul_dense_float64():
    check("matmul", {}, [T(("seq", 24), "float64"), T((24, 17), "float64")], [{"seq": 6}])


@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "gelu_tanh"])
def test_linear_epilogues(activation):
    check("linear", {"activation": activation},
          [T(("batch", "seq", 32), "float32"), T((32, 40), "float32"), T((40,), "float32")], SEQS)


def test_linear_without_bias():
    check("linear", {"activation": "relu"}, [T(("batch", "seq", 16), "float32"), T((16, 16), "float32")], SEQS)


def test_params_have_the_graph_shapes():
    dv = DimVars()
    x, w, b = T(("batch", "seq", 32), "float32"), T((32, 48), "float32"), T((48,), "float32")
    out = T(("batch", "seq", 48), "float32")
    f = kernels.KERNELS.kernel(KernelSpec("k", "linear", {"activation": "none"}, (x, w, b), out), dv, LLVM.tiles)
    shapes = [[str(s) if isinstance(s, tvm.tirx.Var) else int(s) for s in p.shape] for p in f.params]
    assert shapes == [["batch", "seq", 32], [32, 48], [48], ["batch", "seq", 48]]
    # The dims are the graph's shared vars, not fresh ones.
    assert f.params[0].shape[0].same_as(dv.var("batch"))


def test_no_kernel_where_generic_lowering_must_do():
    dv = DimVars()
    i32 = T(("seq", 8), "int32")
    assert kernels.KERNELS.kernel(KernelSpec("k", "matmul", {}, (i32, T((8, 8), "int32")), i32), dv, LLVM.tiles) is None
    assert kernels.KERNELS.kernel(KernelSpec("k", "gather", {}, (i32,), i32), dv, LLVM.tiles) is None


ROWS = [{"batch": 1, "seq": 1}, {"batch": 2, "seq": 5}, {"batch": 1, "seq": 33}]


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_rows(op):
    check(op, {"axis": -1}, [T(("batch", 4, "seq", "seq"), "float32")], ROWS)


def test_log_softmax_over_a_vocabulary_row_compiles_and_matches():
    # One vector of 37000 lanes would not compile: long rows are vectorized in chunks.
    check("log_softmax", {"axis": -1}, [T(("batch", 3, 37000), "float32")], [{"batch": 2}])


def test_scaled_masked_softmax_with_every_mask_kind():
    scores = T(("batch", 2, "seq", "seq"), "float32")
    masks = [T(("seq", "seq"), "float32"), T(("batch", 1, 1, "seq"), "bool"), T((1, 1, "seq", "seq"), "bool")]
    # Rows fully masked give NaN in the reference and in the kernel alike (assert_allclose matches NaNs).
    check("scaled_masked_softmax", {"scale": 0.125, "mask_kinds": ("additive", "drop", "keep")},
          [scores] + masks, ROWS)


@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
def test_layer_norms(op):
    x = T(("batch", "seq", 48), "float32")
    types = [x, T((48,), "float32"), T((48,), "float32")]
    if op == "add_layer_norm":
        types.insert(1, x)
    check(op, {"eps": 1e-5}, types, ROWS)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_fused_attention_layouts_and_masks(layout):
    qkv = T(("batch", 3, "seq", 16) if layout == "bhsd" else ("batch", "seq", 3, 16), "float32")
    masks = [T(("seq", "seq"), "bool"), T(("batch", 1, 1, "seq"), "bool")]
    check("fused_attention", {"scale": 0.25, "mask_kinds": ("keep", "drop"), "layout": layout},
          [qkv, qkv, qkv] + masks, ROWS)


def test_fused_attention_cross_lengths_and_additive_mask():
    q = T(("batch", 2, "tgt", 8), "float32")
    kv = T(("batch", 2, "src", 8), "float32")
    sizes = [{"batch": 1, "tgt": 1, "src": 1}, {"batch": 2, "tgt": 3, "src": 19}]
    check("fused_attention", {"scale": 0.5, "mask_kinds": ("additive",)},
          [q, kv, kv, T(("tgt", "src"), "float32")], sizes)
    check("fused_attention", {"scale": 0.5}, [q, kv, kv], sizes)


def test_fused_attention_float64_one_query_against_a_long_cache():
    q = T(("batch", 1, 4, 16), "float64")
    kv = T(("batch", 37, 4, 16), "float64")
    check("fused_attention", {"scale": 0.25, "mask_kinds": ("keep",), "layout": "bshd"},
          [q, kv, kv, T((1, 37), "bool")], [{"batch": 1}, {"batch": 3}])


def test_batched_matmul_attention_shapes():
    sizes = [{"batch": 1, "seq": 1}, {"batch": 2, "seq": 9}]
    q = T(("batch", 2, "seq", 8), "float32")
    kt = T(("batch", 2, 8, "seq"), "float32")
    p = T(("batch", 2, "seq", "seq"), "float32")
    check("matmul", {}, [q, kt], sizes)   # scores: N = seq, symbolic
    check("matmul", {}, [p, q], sizes)    # P @ V: N = head dim, static
    # Broadcast batch dims and a symbolic right operand.
    check("matmul", {}, [T(("batch", 1, "seq", 8), "float32"), T((2, 8, "seq"), "float32")], sizes)


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_few_rows_forms_match(layout):
    # The decode-step forms (one query row at a time; a 2 x 32 projection tile) at any row count.
    q = T(("batch", 2, "tgt", 16) if layout == "bhsd" else ("batch", "tgt", 2, 16), "float32")
    kv = T(("batch", 2, 19, 16) if layout == "bhsd" else ("batch", 19, 2, 16), "float32")
    sizes = [{"batch": 1, "tgt": 1}, {"batch": 2, "tgt": 5}]
    check("fused_attention", {"scale": 0.25, "mask_kinds": ("keep",), "layout": layout},
          [q, kv, kv, T(("tgt", 19), "bool")], sizes, form=FEW_ROWS)
    x = T(("batch", "tgt", 24), "float32")
    w = T((3, 24, 16), "float32")  # 40 columns in panels of 16
    check("linear_packed", {"n": 40, "activation": "relu"}, [x, w, T((40,), "float32")], sizes, form=FEW_ROWS)
    check("linear_packed", {"n": 40}, [x, w], sizes)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_gated_projection_in_every_form(isa):
    # SwiGLU's gate in the projection's write back: the gate's panels then the value's, 32 columns each (whole
    # panels), with and without a bias; every form, at 1 to 45 rows, with both instruction sets' tiles
    tiles = {"avx2": AVX2, "avx512": AVX512}[isa]
    x = T(("batch", "seq", 24), "float32")
    w = T((4, 24, 16), "float32")
    sizes = [{"batch": 1, "seq": 1}, {"batch": 2, "seq": 7}, {"batch": 1, "seq": 45}]
    check("swiglu_packed", {"n": 32}, [x, w, T((64,), "float32")], sizes, tiles=tiles)
    check("swiglu_packed", {"n": 32, "gate": 1}, [x, w], sizes, tiles=tiles)
    check("swiglu_packed", {"n": 32}, [x, w], sizes, form=FEW_ROWS, tiles=tiles)
    if tiles.one_row:
        check("swiglu_packed", {"n": 32}, [x, w], sizes, form=ONE_ROW, tiles=tiles)
    check("swiglu_packed", {"n": 32}, [T(("batch", "seq", 24), "float64"), T((4, 24, 16), "float64")], sizes[:2],
          tiles=tiles)


def test_tiles_follow_the_vector_instruction_set():
    assert cpu_tiles(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})) is AVX2
    assert cpu_tiles(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})) is AVX512
    assert cpu_tiles(tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})) is AVX512_BF16
    assert get_target("llvm:x86-64-v3").tiles is AVX2 and get_target("llvm:x86-64-v4").tiles is AVX512


def test_avx2_projection_prefetches_the_next_tile():
    # The AVX2 projection prefetches the next column tile's weights in its first row blocks (K a
    # multiple of PREFETCH_EVERY; other K run without); the AVX-512 one does not (see tiles.AVX512).
    def kernel(tiles, k):
        spec = spec_of("linear_packed", {"n": 40}, [T(("rows", k), "float32"), T((3, k, 16), "float32")])
        return kernels.KERNELS.kernel(spec, DimVars(), tiles).script()
    assert "llvm.prefetch" in kernel(AVX2, 24)
    assert "llvm.prefetch" not in kernel(AVX2, 20)
    assert "llvm.prefetch" not in kernel(AVX512, 24)
    x = T(("batch", "seq", 20), "float32")
    check("linear_packed", {"n": 40}, [x, T((3, 20, 16), "float32")], [{"batch": 2, "seq": 9}], tiles=AVX2)
    # K 24: the first 8 row blocks of each tile prefetch, the rest (111 rows: 19 blocks) run the plain loop
    x = T(("batch", "seq", 24), "float32")
    check("linear_packed", {"n": 40, "activation": "relu"}, [x, T((3, 24, 16), "float32"), T((40,), "float32")],
          [{"batch": 1, "seq": 5}, {"batch": 3, "seq": 37}], tiles=AVX2)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_each_instruction_sets_tiles_compute_the_same(isa):
    # Both tile sets are plain loop nests (LLVM splits vectors wider than the machine's), so each is
    # checked here whatever this CPU has: the host's own set runs in every other test as well.
    tiles = {"avx2": AVX2, "avx512": AVX512}[isa]
    x = T(("batch", "seq", 24), "float32")
    w = T((5, 24, 16), "float32")  # 70 columns in panels of 16: not a multiple of 64 columns
    sizes = [{"batch": 1, "seq": 1}, {"batch": 2, "seq": 7}, {"batch": 1, "seq": 45}]
    check("linear_packed", {"n": 70, "activation": "gelu"}, [x, w, T((70,), "float32")], sizes, tiles=tiles)
    check("linear_packed", {"n": 70}, [x, w], sizes, form=FEW_ROWS, tiles=tiles)
    if tiles.one_row:
        check("linear_packed", {"n": 70, "activation": "relu"}, [x, w, T((70,), "float32")], sizes, form=ONE_ROW,
              tiles=tiles)
    qkv = T(("batch", 3, "seq", 16), "float32")
    check("fused_attention", {"scale": 0.25, "mask_kinds": ("drop",)},
          [qkv, qkv, qkv, T(("batch", 1, 1, "seq"), "bool")], sizes + [{"batch": 1, "seq": 70}], tiles=tiles)
    # q, k and v as windows of heads of one merged tensor (read in place), in both forms
    merged = T(("batch", "seq", 6, 16), "float32")
    attrs = {"scale": 0.25, "mask_kinds": ("drop",), "layout": "bshd", "heads": (2, 4, 0, 2)}
    for form in (None, FEW_ROWS):
        check("fused_attention", attrs, [merged, merged, merged, T(("batch", 1, 1, "seq"), "bool")],
              sizes + [{"batch": 2, "seq": 70}], form=form, tiles=tiles)


@pytest.mark.parametrize("n", [96, 1000, 1024])
@pytest.mark.parametrize("keepdims", [False, True])
def test_sums_over_the_leading_axes(n, keepdims):
    """A bias's gradient, x (batch, seq, n) summed over batch and seq: the generic schedule streams the rows
    with the columns split across the threads (from 128 columns; 1000 leaves a partial chunk)."""
    from attngraph.api import compile as compile_graph
    from attngraph.ir import Graph
    g = Graph("column_sums")
    x = g.add("input", (), {"type": T(("batch", "seq", n), "float32")}, name="x")
    g.set_outputs([("y", g.add("reduce_sum", [x], {"axes": (0, 1), "keepdims": keepdims}))])
    m = compile_graph(g, {}, target="llvm", opt_level=0)
    rng = np.random.default_rng(0)
    for b, s in ((1, 1), (3, 45)):
        a = rng.standard_normal((b, s, n)).astype(np.float32)
        np.testing.assert_allclose(m({"x": a})["y"], a.astype(np.float64).sum((0, 1), keepdims=keepdims),
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("log_probs", [False, True])
@pytest.mark.parametrize("vocab, dtype", [(4000, "float32"), (37, "float32"), (1000, "float64")])
def test_cross_entropy_one_row_a_loss(log_probs, vocab, dtype):
    """The loss's row op scheduled row by row (its statistics over the vocabulary in vector lanes, the row in
    cache), with label smoothing and ignored positions, against the float64 reference."""
    from attngraph.api import compile as compile_graph
    from attngraph.ir import Graph
    g = Graph("loss")
    x = g.add("input", (), {"type": T(("batch", "seq", vocab), dtype)}, name="x")
    t = g.add("input", (), {"type": T(("batch", "seq"), "int64")}, name="t")
    attrs = {"label_smoothing": 0.1, "ignore_index": 0, "log_probs": log_probs}
    g.set_outputs([("y", g.add("cross_entropy", [x, t], attrs))])
    m = compile_graph(g, {}, target="llvm", opt_level=0)
    rng = np.random.default_rng(0)
    rtol, atol = TOLERANCE[dtype]
    for b, s in ((1, 1), (3, 45)):
        a = 3 * rng.standard_normal((b, s, vocab))
        if log_probs:
            a = a - np.log(np.exp(a).sum(-1, keepdims=True))
        labels = rng.integers(0, vocab, (b, s))
        want = O.get("cross_entropy").ref(a, labels, **attrs)
        np.testing.assert_allclose(m({"x": a.astype(dtype), "t": labels})["y"], want, rtol=rtol, atol=atol)


def test_every_kernel_of_a_decode_step_declares_its_pointers_noalias():
    """TVM's LLVM code generator drops ``noalias`` for a whole module when one of its functions lacks the
    attribute; the projections' register tiles were then stored to memory after every multiply-add (2.3x
    slower).  The in-place cache write, whose cache parameter aliases its output, must declare it too (it never
    accesses memory through that parameter)."""
    import attngraph as ag
    from attngraph.backends.tvm.build import for_target, lower_kernels
    from attngraph.generate import trace_entries
    from attngraph.passes import optimize
    graph, _ = optimize(trace_entries(ag.models.get("gpt-tiny"), 16)["decode_step"], 3)
    funcs, _ = lower_kernels(for_target(graph, "llvm"), "llvm")
    assert any(name.endswith("__inplace") for name in funcs)
    assert [name for name, f in funcs.items() if not (f.attrs and f.attrs.get("tirx.noalias"))] == []


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_blocked_transpose_moves_values_as_they_are(dtype):
    # a weight's transpose (the input gradient's W^T) in blocks, any float type: every value's bits moved, NaN and
    # infinities included, in one pass (a half type widened and rounded inside the copy: no whole float32 copies
    # before it, 10x slower)
    import ml_dtypes
    spec = spec_of("transpose", {"perm": (1, 0)}, [T((40, 72), dtype)])
    f = kernels.KERNELS.kernel(spec, DimVars(), LLVM.tiles)
    assert f is not None and "sblock_alloc_buffer" not in f.script()
    from attngraph.backends.tvm.targets.cpu.schedule import scalar_bfloat16
    fn = tvm.compile(tvm.IRModule({"k": scalar_bfloat16(f).with_attr("global_symbol", "k")}), target=TARGET)["k"]
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    x = np.random.default_rng(0).standard_normal((40, 72)).astype(np_dtype)
    x[3, 5], x[7, 0], x[39, 71] = np.nan, np.inf, -np.inf
    out = tvm.runtime.empty((72, 40), dtype, tvm.cpu())
    fn(tvm.runtime.tensor(x), out)
    bits = np.uint32 if dtype == "float32" else np.uint16
    np.testing.assert_array_equal(out.numpy().view(bits), np.ascontiguousarray(x.T).view(bits))
