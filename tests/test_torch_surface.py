"""PyTorch's tensor surface in the DSL: each method and function as reference code spells it, against PyTorch on
the same values: the float64 interpreter to 1e-12, llvm in float32 to float32's tolerance."""

from __future__ import annotations

import numpy as np
import pytest

import attngraph as ag
from attngraph import nn
from attngraph.nn import functional as AF
from attngraph.nn.tensor import TraceError

torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch==2.13.0 (pip install -e '.[test]')")
TF = torch.nn.functional


class Fn(nn.Module):
    """``fn(T, F, *inputs)``: T is the namespace of tensor functions (``torch`` / the DSL's F), F of
    ``torch.nn.functional`` (the DSL's F)."""

    def __init__(self, fn, shapes):
        super().__init__()
        self.fn, self.shapes = fn, shapes

    def input_specs(self):
        return {f"x{i}": nn.InputSpec(shape, dtype) for i, (shape, dtype) in enumerate(self.shapes)}

    def forward(self, **xs):
        out = self.fn(AF, AF, *xs.values())
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {f"y{i}": o for i, o in enumerate(out)}


F32, I64, BOOL = "float32", "int64", "bool"

#: name -> (fn(T, F, *xs), [(shape, dtype)])
CASES = {
    "expand": (lambda T, F, x: x.expand(2, 3, 4), [((3, 1), F32)]),
    "expand -1": (lambda T, F, x: x.expand(-1, 5, -1), [((2, 1, 4), F32)]),
    "expand_as": (lambda T, F, x, y: x.expand_as(y), [((1, 4), F32), ((3, 4), F32)]),
    "repeat": (lambda T, F, x: x.repeat(2, 1, 3), [((3, 4), F32)]),
    "repeat_interleave": (lambda T, F, x: x.repeat_interleave(3, dim=1), [((2, 4, 5), F32)]),
    "repeat_interleave flat": (lambda T, F, x: T.repeat_interleave(x, 2), [((2, 3), F32)]),
    "repeat_kv": (lambda T, F, x: x[:, :, None, :, :].expand(2, 2, 3, 5, 4).reshape(2, 6, 5, 4),
                  [((2, 2, 5, 4), F32)]),
    "split": (lambda T, F, x: x.split(3, dim=-1), [((2, 8), F32)]),
    "split sizes": (lambda T, F, x: T.split(x, [2, 5, 1], dim=1), [((3, 8), F32)]),
    "chunk": (lambda T, F, x: x.chunk(3, dim=-1), [((2, 7), F32)]),
    "unbind": (lambda T, F, x: x.unbind(1), [((2, 3, 4), F32)]),
    "flatten": (lambda T, F, x: x.flatten(1), [((2, 3, 4), F32)]),
    "flatten range": (lambda T, F, x: T.flatten(x, 0, 1), [((2, 3, 4), F32)]),
    "unflatten": (lambda T, F, x: x.unflatten(-1, (2, -1)), [((3, 8), F32)]),
    "squeeze": (lambda T, F, x: (x.squeeze(), x.squeeze(1), x.squeeze(0)), [((2, 1, 3, 1), F32)]),
    "pow 2 (a norm by hand)": (lambda T, F, x: x.pow(2).mean(-1, keepdim=True), [((2, 5), F32)]),
    "pow": (lambda T, F, x: (x.abs() ** 1.7, x ** 3, 2.0 ** x, x.abs() ** 0.5, x.abs() ** -0.5), [((2, 5), F32)]),
    "pow tensor": (lambda T, F, x, y: T.pow(x.abs() + 0.5, y), [((3, 4), F32), ((4,), F32)]),
    "abs": (lambda T, F, x: (abs(x), x.abs(), T.abs(x)), [((3, 4), F32)]),
    "clamp": (lambda T, F, x: (x.clamp(-0.5, 0.5), x.clamp(min=0.1), x.clamp(max=0.0), x.clip(-1, 1)),
              [((3, 4), F32)]),
    "clamp tensors": (lambda T, F, x, lo: T.clamp(x, min=lo), [((3, 4), F32), ((4,), F32)]),
    "minimum maximum": (lambda T, F, x, y: (T.minimum(x, y), T.maximum(x, y), x.minimum(y)),
                        [((3, 4), F32), ((4,), F32)]),
    "argmax": (lambda T, F, x: (x.argmax(-1), x.argmax(dim=0, keepdim=True), x.argmax(), T.argmax(x, 1)),
               [((3, 6), F32)]),
    "argmin min": (lambda T, F, x: (x.argmin(1), x.amin(1), x.amax(0, keepdim=True)), [((3, 6), F32)]),
    "sin cos sigmoid silu": (lambda T, F, x: (x.sin(), x.cos(), x.sigmoid(), F.silu(x), F.sigmoid(x)),
                             [((3, 4), F32)]),
    "type_as to": (lambda T, F, x, m: (m.type_as(x) * x, m.to(x.dtype), x.to(torch.float16).float(), x.to("cpu")),
                   [((3, 4), F32), ((3, 4), I64)]),
    "new_zeros zeros_like": (lambda T, F, x: (x.new_zeros(2, 3), x.new_ones((4,)), T.zeros_like(x) + x,
                                               T.ones_like(x), T.full_like(x, 7.0), x.new_full((2,), 3.5)),
                             [((3, 4), F32)]),
    "triu tril": (lambda T, F, x: (x.triu(), x.tril(), x.triu(1), x.tril(-1), x.triu(-2)), [((2, 4, 5), F32)]),
    "masked_fill with a tensor": (lambda T, F, x, m, v: x.masked_fill(m, v), [((3, 4), F32), ((3, 4), BOOL),
                                                                              ((), F32)]),
    "cat stack": (lambda T, F, x, y: (T.cat((-y, x), dim=-1), T.stack([x, y], dim=1), T.stack([x, y], -1)),
                  [((3, 4), F32), ((3, 4), F32)]),
    "rotate_half": (lambda T, F, x: T.cat((-x.chunk(2, dim=-1)[1], x.chunk(2, dim=-1)[0]), dim=-1),
                    [((2, 3, 8), F32)]),
    "pad": (lambda T, F, x: (F.pad(x, (1, 2)), F.pad(x, (0, 0, 2, 1), value=-1.0), F.pad(x, (-1, 1))),
            [((2, 3, 4), F32)]),
    "normalize": (lambda T, F, x: (F.normalize(x, dim=-1), F.normalize(x, p=1.0, dim=0)), [((3, 4), F32)]),
}


def torch_outputs(fn, arrays, dtype):
    xs = [torch.from_numpy(a.astype(dtype) if a.dtype.kind == "f" else a) for a in arrays]
    out = fn(torch, TF, *xs)
    return [o.numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]


def example(shapes, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for shape, dtype in shapes:
        if dtype == F32:
            out.append(rng.standard_normal(shape).astype(np.float32))
        elif dtype == BOOL:
            out.append(rng.random(shape) < 0.4)
        else:
            out.append(rng.integers(0, 5, shape))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_method_matches_pytorch(name):
    fn, shapes = CASES[name]
    arrays = example(shapes)
    model = Fn(fn, shapes)
    inputs = {f"x{i}": a for i, a in enumerate(arrays)}
    exact = ag.compile(model, {}, target="numpy", dtype="float64", opt_level=0)(inputs)
    want = torch_outputs(fn, arrays, np.float64)
    assert len(exact) == len(want)
    for i, w in enumerate(want):
        got = exact[f"y{i}"]
        assert got.shape == w.shape, (i, got.shape, w.shape)
        np.testing.assert_allclose(got, w, rtol=1e-12, atol=1e-12, err_msg=f"{name}: output {i}")
    compiled = ag.compile(model, {}, target="llvm")(inputs)
    want32 = torch_outputs(fn, arrays, np.float32)
    for i, w in enumerate(want32):
        got = compiled[f"y{i}"]
        assert got.dtype == w.dtype or (got.dtype == np.int64 and w.dtype == np.int64), (i, got.dtype, w.dtype)
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6, err_msg=f"{name}: output {i} on llvm")


def test_silu_method():
    model = Fn(lambda T, F, x: x.silu() - F.silu(x), [((3, 4), F32)])
    assert ag.compile(model, {}, target="numpy")({"x0": example([((3, 4), F32)])[0]})["y0"].max() == 0


def test_argmax_ties_nan_and_inf():
    x = np.array([[1.0, 3.0, 3.0, 0.0], [-np.inf, -np.inf, -np.inf, -np.inf], [0.0, np.nan, 2.0, np.nan]],
                 np.float32)
    model = Fn(lambda T, F, x: x.argmax(-1), [((3, 4), F32)])
    want = torch.from_numpy(x).argmax(-1).numpy()
    for target in ("numpy", "llvm"):
        got = ag.compile(model, {}, target=target)({"x0": x})["y0"]
        np.testing.assert_array_equal(got, want, err_msg=target)


def test_symbolic_sizes():
    # expand to a symbolic size, chunk a symbolic axis in halves, flatten and unflatten through symbols, triu of a
    # (seq, seq) mask, repeat_interleave of heads
    def fn(T, F, x):
        b, s, d = x.shape
        heads = x.unflatten(-1, (2, -1)).transpose(1, 2).repeat_interleave(2, dim=1)
        return (x[:, :1].expand(b, s, d), x.chunk(2, dim=-1)[1], x.flatten(0, 1), heads,
                T.ones_like(x[0, :, :1]).expand(s, s).triu(1))
    model = Fn(fn, [(("batch", "seq", 8), F32)])
    x = np.random.default_rng(1).standard_normal((3, 6, 8)).astype(np.float32)
    want = torch_outputs(fn, [x], np.float64)
    for target in ("numpy", "llvm"):
        got = ag.compile(model, {}, target=target)({"x0": x})
        for i, w in enumerate(want):
            np.testing.assert_allclose(got[f"y{i}"], w, rtol=1e-5, atol=1e-6, err_msg=f"{target}: output {i}")


@pytest.mark.parametrize("fn, message", [
    (lambda x: x.expand(3, 5), "neither 5 nor 1"),
    (lambda x: x.split(3, dim=1), "the number of pieces would be known only at run time"),
    (lambda x: x.squeeze(1), "whether it is 1 is known only at run time"),
    (lambda x: x.chunk(2, dim=1), "is symbolic (seq) and not a multiple of 2"),
    (lambda x: x.split([2, 2], dim=0), "add up to 4, not to the axis' 3"),
    (lambda x: x.repeat(2), "at least one size per axis"),
    (lambda x: x.flatten(1, 0), "start_dim comes after end_dim"),
    (lambda x: x.nonzero(), "nonzero"),
])
def test_bad_spellings_name_the_line(fn, message):
    model = Fn(lambda T, F, x: fn(x), [((3, "seq"), F32)])
    with pytest.raises((TraceError, ValueError)) as e:
        ag.trace(model)
    assert message in str(e.value) and "test_torch_surface.py" in str(e.value), str(e.value)


class Rotary(nn.Module):
    """Rotary position embeddings as LLaMA's reference code writes them: a float64 table of inverse
    frequencies as a buffer, cos and sin of the angles, ``rotate_half`` with ``chunk`` and ``cat``, a scale."""

    def __init__(self, d=8, n=6):
        super().__init__()
        self.d = d
        self.register_buffer("inv_freq", 1.0 / (10000.0 ** (np.arange(0, d, 2) / d)))  # float64, as NumPy makes it
        self.register_buffer("positions", np.arange(n, dtype=np.float64)[:, None])

    def input_specs(self):
        return {"x": nn.InputSpec((2, 6, 8))}

    def forward(self, x):
        return rotary(AF, x, self.positions * self.inv_freq, self.d)


def rotary(T, x, angles, d):
    emb = T.cat((angles, angles), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = T.cat((-x2, x1), dim=-1)
    return (x * emb.cos() + rotated * emb.sin()) / d ** 0.5


def test_a_float64_run_holds_the_programs_constants_in_float64():
    # the float64 buffers and the Python scale are held as the program wrote them: the float64 interpreter agrees
    # with PyTorch's float64 run to rounding (a float32 table would be 1e-8 off)
    model = Rotary()
    x = np.random.default_rng(0).standard_normal((2, 6, 8))
    got = ag.compile(model, {}, target="numpy", dtype="float64")({"x": x})["output"]
    angles = torch.from_numpy(model.positions.value * model.inv_freq.value)
    want = rotary(torch, torch.from_numpy(x), angles, model.d).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14)
    graph = ag.trace(model)
    assert {n.type.dtype for n in graph.nodes() if n.op == "const"} == {"float32"}  # float32 tensors in a build
    out32 = ag.compile(model, {}, target="llvm")({"x": x.astype(np.float32)})["output"]
    np.testing.assert_allclose(out32, want, rtol=1e-5, atol=1e-6)


def test_symbolic_sizes_do_arithmetic():
    seen = {}

    def fn(T, F, x):
        b, s, d = x.shape
        seen.update(diff=s - s, double=2 * s, next=s + 1, half_d=d // 2, neg=-s)
        return x.reshape(b, s * d)[:, : s * d - d]

    model = Fn(fn, [(("batch", "seq", 8), F32)])
    g = ag.trace(model)
    assert seen == {"diff": 0, "double": "2*seq", "next": "seq + 1", "half_d": 4, "neg": "-seq"}, seen
    x = np.random.default_rng(2).standard_normal((2, 3, 8)).astype(np.float32)
    out = ag.compile(g, {}, target="numpy")({"x0": x})["y0"]
    np.testing.assert_array_equal(out, x.reshape(2, 24)[:, :16])
    with pytest.raises(TraceError, match="divides only where the quotient is exact"):
        ag.trace(Fn(lambda T, F, x: x.reshape(x.shape[0], x.shape[1] // 2, -1), [(("batch", "seq", 8), F32)]))
