"""The bfloat16 projection on the CPU's bfloat16 dot products (``targets/cpu/dot.py``: AVX512_BF16's ``vdpbf16ps``).

Where this CPU has the instruction, the kernels run against the float64 reference and whole bfloat16 builds against
the interpreter; on every CPU, the kernel compiles for a CPU model that has it (``llvm:sapphirerapids``) and the
build chooses it only where the CPU has it."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

import attngraph as ag  # noqa: E402
from attngraph.backends.tvm.plan import FEW_ROWS, ONE_ROW, KernelSpec  # noqa: E402
from attngraph.backends.tvm.shapes import DimVars  # noqa: E402
from attngraph.backends.tvm.targets import get_target  # noqa: E402
from attngraph.backends.tvm.targets.cpu import kernels  # noqa: E402
from attngraph.backends.tvm.targets.cpu.tiles import AVX512, AVX512_BF16, AVX512_VNNI, cpu_tiles  # noqa: E402
from attngraph.ir import TensorType as T  # noqa: E402
from attngraph.ir import dims as D  # noqa: E402
from attngraph.ir import ops as O  # noqa: E402

HERE = get_target("llvm")
HAS_DOT = HERE.tiles.bf16_dot is not None
needs_dot = pytest.mark.skipif(not HAS_DOT, reason="this CPU has no AVX512_BF16 (the kernels compile-only here)")
BF16 = "bfloat16"
FORMS = {"main": None, "few rows": FEW_ROWS, "one row": ONE_ROW}


def spec_of(op, attrs, in_types):
    attrs = {**O.get(op).defaults, **attrs}
    return KernelSpec("k", op, attrs, tuple(in_types), O.get(op).infer(in_types, attrs))


def kernel(spec, form, tiles):
    if form is None:
        return kernels.KERNELS.kernel(spec, DimVars(), tiles)
    return kernels.KERNELS.forms(spec, DimVars(), tiles).get(form)


def projection(k: int, n: int, bias: bool, activation: str = "none"):
    x = T(("batch", "seq", k), BF16)
    w = O.get("pack_panels").infer([T((k, n), BF16)], {"width": 16, "dtype": None, "interleave": 2})
    return spec_of("linear_packed", {"n": n, "activation": activation}, [x, w] + ([T((n,), BF16)] if bias else []))


@needs_dot
@pytest.mark.parametrize("form,k,n,bias,activation", [
    ("main", 24, 70, True, "gelu"), ("main", 24, 70, False, "none"), ("main", 64, 32, True, "relu"),
    ("main", 4, 16, False, "none"), ("few rows", 24, 70, True, "gelu"), ("few rows", 4, 16, False, "none"),
    ("one row", 24, 70, True, "relu"), ("one row", 64, 32, False, "none")])
def test_kernel_against_float64(form, k, n, bias, activation):
    # 70 columns: not whole 64-column tiles (the last panel read clamped, its padding zero); 1 to 45 rows: not whole
    # row tiles; K = 4: two pairs (at K = 2 no hand kernel: the generic lowering)
    spec = projection(k, n, bias, activation)
    f = kernel(spec, FORMS[form], HERE.tiles)
    assert f is not None and "attngraph_dpbf16ps" in f.script(), "not the dot-product kernel"
    check_projection(f, spec, k, n, bias, activation)


def check_projection(f, spec, k, n, bias, activation, sizes_list=({"batch": 1, "seq": 1}, {"batch": 2, "seq": 7},
                                                                  {"batch": 1, "seq": 45})):
    """Kernel ``f`` of bfloat16 projection ``spec`` (x (batch, seq, k) @ pair panels of k x n) against float64."""
    fn = tvm.compile(tvm.IRModule({"k": f.with_attr("global_symbol", "k")}), target=HERE.tvm_target)["k"]
    rng = np.random.default_rng(k + n)
    for sizes in sizes_list:
        x = rng.standard_normal((sizes["batch"], sizes["seq"], k)).astype(ml_dtypes.bfloat16)
        w = rng.standard_normal((k, n)).astype(ml_dtypes.bfloat16)
        args = [x, O.get("pack_panels").ref(w, width=16, interleave=2)]
        if bias:
            args.append(rng.standard_normal(n).astype(ml_dtypes.bfloat16))
        want = O.get("linear").ref(x.astype(np.float64), w.astype(np.float64),
                                   args[2].astype(np.float64) if bias else None, activation=activation)
        out = tvm.runtime.empty(tuple(D.evaluate(d, sizes) for d in spec.out_type.shape), BF16, tvm.cpu())
        fn(*[tvm.runtime.tensor(a) for a in args], out)
        # one rounding to bfloat16 (a relative 2^-9) over float32 sums of exact products
        np.testing.assert_allclose(out.numpy().astype(np.float64), want, rtol=8e-3, atol=1e-3, err_msg=f"{sizes}")


@needs_dot
@pytest.mark.parametrize("op,k,n,bias", [("linear", 24, 70, True), ("matmul", 64, 48, False)])
def test_kernel_over_a_weight_known_when_it_runs(op, k, n, bias):
    # a training step's weights (its float32 master copy cast to bfloat16) are packed in pairs per call, per tile
    x = T(("batch", "seq", k), BF16)
    ts = [x, T((k, n), BF16)] + ([T((n,), BF16)] if bias else [])
    spec = spec_of(op, {"activation": "relu"} if op == "linear" else {}, ts)
    f = kernel(spec, None, HERE.tiles)
    assert f is not None and "attngraph_dpbf16ps" in f.script(), "not the dot-product kernel"
    fn = tvm.compile(tvm.IRModule({"k": f.with_attr("global_symbol", "k")}), target=HERE.tvm_target)["k"]
    rng = np.random.default_rng(k)
    for sizes in ({"batch": 1, "seq": 1}, {"batch": 2, "seq": 7}, {"batch": 1, "seq": 45}):
        args = [rng.standard_normal(tuple(D.evaluate(d, sizes) for d in t.shape)).astype(ml_dtypes.bfloat16)
                for t in ts]
        want = O.get(op).ref(*[a.astype(np.float64) for a in args], **{k: v for k, v in spec.attrs.items()})
        out = tvm.runtime.empty(tuple(D.evaluate(d, sizes) for d in spec.out_type.shape), BF16, tvm.cpu())
        fn(*[tvm.runtime.tensor(a) for a in args], out)
        np.testing.assert_allclose(out.numpy().astype(np.float64), want, rtol=8e-3, atol=1e-3, err_msg=f"{sizes}")


@needs_dot
@pytest.mark.parametrize("k,n", [(24, 70), (64, 32)])
def test_weight_gradient_against_float64(k, n):
    # the positions in pairs: 1, 14 and 45 of them (odd: the last paired with zeros); N = 70 not whole 64-column
    # tiles; K = 24 not whole 4-row tiles
    x, g = T(("batch", "seq", k), BF16), T(("batch", "seq", n), BF16)
    spec = spec_of("weight_grad", {}, [x, g])
    f = kernel(spec, None, HERE.tiles)
    assert f is not None and "attngraph_dpbf16ps" in f.script(), "not the dot-product kernel"
    fn = tvm.compile(tvm.IRModule({"k": f.with_attr("global_symbol", "k")}), target=HERE.tvm_target)["k"]
    rng = np.random.default_rng(k)
    for sizes in ({"batch": 1, "seq": 1}, {"batch": 2, "seq": 7}, {"batch": 1, "seq": 45}):
        args = [rng.standard_normal((sizes["batch"], sizes["seq"], d)).astype(ml_dtypes.bfloat16) for d in (k, n)]
        want = O.get("weight_grad").ref(*[a.astype(np.float64) for a in args])
        out = tvm.runtime.empty((k, n), BF16, tvm.cpu())
        fn(*[tvm.runtime.tensor(a) for a in args], out)
        np.testing.assert_allclose(out.numpy().astype(np.float64), want, rtol=8e-3, atol=1e-3, err_msg=f"{sizes}")


def attention_spec(attrs, in_types):
    return spec_of("fused_attention", attrs, in_types)


def random_bf16(t, sizes, rng):
    shape = tuple(D.evaluate(d, sizes) for d in t.shape)
    if t.dtype == "bool":
        return rng.random(shape) < 0.3
    return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)


#: (what the case covers, attrs, operand types, sizes): rows 1 to 70 (blocks of 8 query rows, chunks of 32 keys: none
#: whole), masks of each kind, both layouts, heads read from one merged tensor, grouped K and V heads, q and k's head
#: dim apart from v's (v's whole register tile, or slices of it)
ATTENTION_CASES = [
    ("keep and drop masks", {"scale": 0.25, "mask_kinds": ("keep", "drop")},
     [T(("batch", 3, "seq", 16), BF16)] * 3 + [T(("seq", "seq"), "bool"), T(("batch", 1, 1, "seq"), "bool")],
     [{"batch": 1, "seq": 1}, {"batch": 2, "seq": 7}, {"batch": 1, "seq": 70}]),
    ("cross lengths, an additive mask", {"scale": 0.5, "mask_kinds": ("additive",)},
     [T(("batch", 2, "tgt", 24), BF16), T(("batch", 2, "src", 24), BF16), T(("batch", 2, "src", 32), BF16),
      T(("tgt", "src"), BF16)],
     [{"batch": 1, "tgt": 1, "src": 1}, {"batch": 2, "tgt": 9, "src": 45}]),
    ("heads of one merged tensor", {"scale": 0.25, "mask_kinds": ("drop",), "layout": "bshd", "heads": (2, 4, 0, 2)},
     [T(("batch", "seq", 6, 16), BF16)] * 3 + [T(("batch", 1, 1, "seq"), "bool")],
     [{"batch": 2, "seq": 7}, {"batch": 1, "seq": 70}]),
    ("grouped heads, head dim 64", {"scale": 0.125},
     [T(("batch", 4, "seq", 64), BF16), T(("batch", 2, "seq", 64), BF16), T(("batch", 2, "seq", 64), BF16)],
     [{"batch": 1, "seq": 5}, {"batch": 1, "seq": 77}]),
]


@needs_dot
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_attention_against_float64(case):
    _, attrs, in_types, size_list = case
    spec = attention_spec(attrs, in_types)
    f = kernel(spec, None, HERE.tiles)
    assert f is not None and "attngraph_dpbf16ps" in f.script(), "not the dot-product kernel"
    fn = tvm.compile(tvm.IRModule({"k": f.with_attr("global_symbol", "k")}), target=HERE.tvm_target)["k"]
    rng = np.random.default_rng(0)
    for sizes in size_list:
        args = [random_bf16(t, sizes, rng) for t in in_types]
        want = O.get("fused_attention").ref(*[a if a.dtype == bool else a.astype(np.float64) for a in args],
                                            **spec.attrs)
        out = tvm.runtime.empty(tuple(D.evaluate(d, sizes) for d in spec.out_type.shape), BF16, tvm.cpu())
        fn(*[tvm.runtime.tensor(a) for a in args], out)
        # the probabilities rounded to bfloat16 before P V (a relative 2^-9 each), the output once more
        np.testing.assert_allclose(out.numpy().astype(np.float64), want, rtol=1e-2, atol=1e-2, err_msg=f"{sizes}")


def test_attention_kernel_chosen_by_the_cpu_feature_and_shape():
    # the dot-product attention where the CPU has the instruction and the head dims suit it (q and k's even, v's a
    # multiple of 16); else the float32 kernel widening bfloat16 (``half.py``); the decode form always that one
    qkv = T(("batch", 2, "seq", 16), BF16)
    assert kernel(attention_spec({}, [qkv] * 3), None, AVX512) is None
    assert "attngraph_dpbf16ps" in kernel(attention_spec({}, [qkv] * 3), None, AVX512_BF16).script()
    odd_v = [qkv, qkv, T(("batch", 2, "seq", 24), BF16)]
    assert kernel(attention_spec({}, odd_v), None, AVX512_BF16) is None
    assert kernel(attention_spec({}, [T(("batch", 2, "seq", 2), BF16)] * 3), None, AVX512_BF16) is None
    assert FEW_ROWS not in kernels.KERNELS.forms(attention_spec({}, [qkv] * 3), DimVars(), AVX512_BF16)


def test_pair_panels_round_trip():
    # pack_panels(interleave=2) keeps each column's K values in pairs: W[2q + j, 16p + c] at [p, q, c, j]
    w = np.arange(6 * 20, dtype=np.float32).reshape(6, 20)
    p = O.get("pack_panels").ref(w, width=16, interleave=2)
    assert p.shape == (2, 3, 16, 2) and p[1, 2, 3, 1] == w[5, 19] and p[1, 0, 5, 0] == 0  # padding past column 20
    from attngraph.backends.tvm.targets.cpu.ops import unpacked
    np.testing.assert_array_equal(unpacked(p, 20), w)
    with pytest.raises(O.ShapeError, match="interleave must be a positive int dividing the weight's 5 rows"):
        O.get("pack_panels").infer([T((5, 20), "float32")], {"width": 16, "interleave": 2})


def test_kernel_chosen_by_the_cpu_feature():
    # the dot-product rows apply where the tiles say the CPU has the instruction; elsewhere no hand kernel takes
    # the pair panels (the generic lowering reads them: tested by the build below)
    spec = projection(32, 48, True)
    assert cpu_tiles(tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})) is AVX512_BF16
    assert cpu_tiles(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})) is AVX512_BF16
    assert cpu_tiles(tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server"})) is AVX512_VNNI  # int8 only
    assert kernel(spec, None, AVX512) is None
    assert kernel(projection(2, 48, True), None, AVX512_BF16) is None
    for form in FORMS.values():
        assert "attngraph_dpbf16ps" in kernel(spec, form, AVX512_BF16).script()


@pytest.mark.parametrize("what", ["projection", "attention"])
def test_compiles_for_a_cpu_that_has_it(what):
    # whatever this CPU: LLVM emits vdpbf16ps for a CPU model with AVX512_BF16
    target = get_target("llvm:sapphirerapids")
    spec = projection(64, 64, True, "gelu") if what == "projection" else attention_spec(
        {"mask_kinds": ("keep",)}, [T(("batch", 2, "seq", 64), BF16)] * 3 + [T(("seq", "seq"), "bool")])
    f = kernel(spec, None, target.tiles)
    lib = tvm.compile(tvm.IRModule({"k": f.with_attr("global_symbol", "k")}), target=target.tvm_target)
    assert "vdpbf16ps" in lib.mod.inspect_source("asm")


def _packed(graph):
    return [n.type for n in graph.nodes() if n.op == "pack_panels"]


@pytest.mark.parametrize("target", ["llvm", "llvm:icelake-server"])
def test_bfloat16_build_packs_pairs_where_the_cpu_has_the_instruction(target):
    from attngraph.backends.tvm.build import lower_kernels
    from attngraph.backends.tvm.plan import plan_kernels
    g = ag.compile("encoder-tiny", target=target, dtype=BF16).graph
    tiles = get_target(target).tiles
    ranks = {t.rank for t in _packed(g)}
    assert ranks == ({4} if tiles.bf16_dot else {3}), ranks
    specs, _ = plan_kernels(g)
    lowered, _ = lower_kernels(g, target, plan=plan_kernels(g))
    projections = [lowered[s.name].script() for s in specs if s.op == "linear_packed"]
    assert projections and all(("attngraph_dpbf16ps" in p) == bool(tiles.bf16_dot) for p in projections)
    # a float32 build packs plain panels everywhere
    assert {t.rank for t in _packed(ag.compile("encoder-tiny", target=target).graph)} == {3}


@needs_dot
@pytest.mark.parametrize("model", ["encoder-tiny", "transformer-tiny", "gpt-tiny"])
def test_bfloat16_builds_match_the_interpreter(model):
    # every kernel's result against the interpreter's value of the same node (each op rounded to bfloat16 where the
    # build stores it), the projections on the dot products
    report = ag.verify(model, target="llvm", dtype=BF16, per_node=True)
    assert report.ok, report.format()
