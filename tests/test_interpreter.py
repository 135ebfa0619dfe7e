"""The reference interpreter against hand-written NumPy formulas, and its errors."""

import math

import numpy as np
import pytest
from conftest import example

import attngraph as ag
from attngraph import nn
from attngraph.reference import InterpreterError
from attngraph.inputs import InputError


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class Attn(nn.Module):
    def __init__(self, causal=False, padding=False):
        super().__init__()
        self.mha = nn.MultiHeadAttention(16, 4)
        self.causal, self.padding = causal, padding

    def forward(self, x, pad):
        return self.mha(x, x, x, key_padding_mask=pad if self.padding else None, causal=self.causal)


def attention_formula(x, p, causal, pad):
    """Multi-head attention written out with NumPy, head by head."""
    b, s, d = x.shape
    h, dk = 4, 4
    q, k, v = (x @ p[f"mha.{n}_proj.weight"] + p[f"mha.{n}_proj.bias"] for n in "qkv")
    out = np.zeros_like(q)
    for head in range(h):
        cols = slice(head * dk, (head + 1) * dk)
        scores = q[:, :, cols] @ k[:, :, cols].transpose(0, 2, 1) / math.sqrt(dk)
        if causal:
            scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
        if pad is not None:
            scores = np.where(pad[:, None, :], -np.inf, scores)
        out[:, :, cols] = softmax(scores) @ v[:, :, cols]
    return out @ p["mha.out_proj.weight"] + p["mha.out_proj.bias"]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", [False, True])
def test_attention_matches_formula(causal, padding):
    m = Attn(causal, padding)
    g = ag.trace(m, {"x": nn.InputSpec(("b", "s", 16)), "pad": nn.InputSpec(("b", "s"), "bool")})
    params = ag.init_params(g, seed=1, perturb=True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 16))
    pad = np.zeros((2, 6), bool)
    pad[1, 4:] = True
    out = ag.reference.run(g, {"x": x, "pad": pad}, params, dtype="float64")["output"]
    want = attention_formula(x, params, causal, pad if padding else None)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)


def test_sinusoidal_positions_match_the_paper():
    class PE(nn.Module):
        def __init__(self):
            super().__init__()
            self.pe = nn.SinusoidalPositionalEncoding(16, max_len=64)

        def forward(self, x):
            return self.pe(x.shape[1])

    g = ag.trace(PE(), {"x": nn.InputSpec(("b", "s"), "int64")})
    out = ag.reference.run(g, {"x": np.zeros((1, 10), np.int64)}, {}, dtype="float64")["output"]
    pos, i = np.arange(10)[:, None], np.arange(8)[None, :]
    # the paper's formula to float64 rounding: the constants keep their float64 values in a float64 run
    np.testing.assert_allclose(out[:, 0::2], np.sin(pos / 10000 ** (2 * i / 16)), rtol=0, atol=1e-14)
    np.testing.assert_allclose(out[:, 1::2], np.cos(pos / 10000 ** (2 * i / 16)), rtol=0, atol=1e-14)
    np.testing.assert_allclose(out, nn.sinusoidal_table(64, 16)[:10], atol=1e-6)


def test_causal_mask_formula():
    class M(nn.Module):
        def forward(self, x):
            return nn.causal_mask(x.shape[1], x.shape[1])

    g = ag.trace(M(), {"x": nn.InputSpec(("b", "s"), "int64")})
    out = ag.reference.run(g, {"x": np.zeros((1, 5), np.int64)}, {})["output"]
    np.testing.assert_array_equal(out, np.tril(np.ones((5, 5), bool)))


def test_float64_and_float32_runs_agree(tiny_graph, tiny_params):
    x = example(tiny_graph)
    hi = ag.reference.run(tiny_graph, x, tiny_params, dtype="float64")["log_probs"]
    lo = ag.reference.run(tiny_graph, x, tiny_params, dtype="float32")["log_probs"]
    assert hi.dtype == np.float64 and lo.dtype == np.float32
    np.testing.assert_allclose(lo, hi, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.exp(hi).sum(-1), 1.0, rtol=1e-12)


def test_values_are_freed_after_last_use(tiny_graph, tiny_params):
    stats = {}
    ag.reference.run(tiny_graph, example(tiny_graph), tiny_params, stats=stats)
    # 320 nodes, but only a few dozen values are ever alive at once.
    assert len(tiny_graph) > 300 and stats["peak_live_values"] < 90


def test_symbolic_dims_take_any_size(tiny_graph, tiny_params):
    for src_len, tgt_len in [(1, 1), (7, 3), (40, 33)]:
        out = ag.reference.run(tiny_graph, example(tiny_graph, batch=3, src_len=src_len, tgt_len=tgt_len),
                               tiny_params)["log_probs"]
        assert out.shape == (3, tgt_len, 64) and np.isfinite(out).all()


def test_padding_does_not_change_other_rows(tiny_graph, tiny_params):
    x = example(tiny_graph, batch=2, src_len=10, tgt_len=5)
    padded = {k: v.copy() for k, v in x.items()}
    padded["src"][1, 6:] = 0  # pad the second sentence only
    a = ag.reference.run(tiny_graph, x, tiny_params, dtype="float64")["log_probs"]
    b = ag.reference.run(tiny_graph, padded, tiny_params, dtype="float64")["log_probs"]
    np.testing.assert_allclose(a[0], b[0], rtol=1e-12)
    assert not np.allclose(a[1], b[1])


def test_error_names_node_and_model_line(tiny_graph, tiny_params):
    x = example(tiny_graph)
    x["src"][0, 0] = 64  # one past the vocabulary
    with pytest.raises(InterpreterError) as err:
        ag.reference.run(tiny_graph, x, tiny_params)
    msg = str(err.value)
    assert "while executing %gather = gather(%src_embed.weight, %src)" in msg
    assert "layers.py" in msg and "in module src_embed" in msg
    assert "index 64 is out of range for a table of 64 rows" in msg


@pytest.mark.parametrize("change, match", [
    (lambda x: x.pop("tgt"), "missing tgt"),
    (lambda x: x.update(tgt=x["tgt"][:1]), r"axis 0 is 1, expected batch = 2 \(from input 'src' axis 0\)"),
    (lambda x: x.update(src=x["src"].astype(np.float32)), "dtype float32, expected int64"),
    (lambda x: x.update(src=x["src"][0]), "expected rank 2"),
])
def test_bad_inputs_are_named(tiny_graph, tiny_params, change, match):
    x = example(tiny_graph)
    change(x)
    with pytest.raises(InputError, match=match):
        ag.reference.run(tiny_graph, x, tiny_params)


def test_inputs_that_are_not_a_mapping_and_other_precisions_are_refused(tiny_graph, tiny_params):
    x = example(tiny_graph)
    with pytest.raises(InputError, match="inputs must be a mapping of input name to array, got list; "
                                         "expected src: i64"):
        ag.reference.run(tiny_graph, list(x.values()), tiny_params)
    for dtype in ("float16", "int8", "bogus"):
        with pytest.raises(ValueError, match="the interpreter computes in float32 or float64"):
            ag.reference.run(tiny_graph, x, tiny_params, dtype=dtype)
    assert ag.reference.run(tiny_graph, x, tiny_params, dtype=np.float64)["log_probs"].dtype == np.float64


def test_missing_weights_are_named(tiny_graph, tiny_params):
    params = dict(tiny_params)
    del params["decoder.layers.1.norm3.bias"]
    with pytest.raises(ag.WeightsError, match="missing tensor 'decoder.layers.1.norm3.bias'"):
        ag.reference.run(tiny_graph, example(tiny_graph), params)


def test_the_interpreter_is_a_target():
    """``compile(model, target="numpy")``: the optimized graph run by the interpreter behind a compiled model's
    call (``put``, ``get``, ``keep``); in float64 on ``dtype="float64"``; options that compile kernels refused."""
    from attngraph.backends import BuildError
    from attngraph.inputs import random_inputs
    g = ag.trace(ag.models.get("encoder-tiny"))
    params = ag.init_params(g, 0)
    inputs = random_inputs(g.input_types(), g.meta["dims"], 0)
    want = ag.reference.run(g, inputs, params, dtype="float64")
    for dtype, rtol in (("float64", 1e-12), (None, 1e-5)):
        model = ag.compile(g, params, target="numpy", dtype=dtype)
        x = model.put(inputs["x"].astype(np.float32), "float32")
        assert x.dtype == np.dtype(dtype or "float32")
        got = model({**inputs, "x": x}, keep=list(want))
        for k in want:
            np.testing.assert_allclose(model.get(got[k]), want[k], rtol=rtol, atol=rtol)
        assert model.report.stat("attention").matches >= 1  # the level's passes ran
    half = ag.compile(g, params, target="numpy", dtype="bfloat16")
    assert {n.type.dtype for n in half.graph.nodes() if n.op == "param"} == {"bfloat16"}
    for bad in ({"weight_dtype": "float16"}, {"device": "emulator"}):
        with pytest.raises(BuildError, match="target numpy .* compiles no kernels"):
            ag.compile(g, params, target="numpy", **bad)
    with pytest.raises(BuildError, match="float64 with target numpy"):
        ag.compile(g, params, target="llvm", dtype="float64")
