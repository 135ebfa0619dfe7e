"""The DSL: tracing records ops with the user's line and module scope; bad models fail clearly."""

import os

import numpy as np
import pytest

import attngraph as ag
from attngraph import nn
from attngraph.ir import GraphError
from attngraph.nn import functional as F


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def input_specs(self):
        return {"x": nn.InputSpec(("batch", 8))}

    def forward(self, x):
        return F.softmax(self.fc2(F.relu(self.fc1(x))), axis=-1)


def test_parameters_have_dotted_paths_and_trace_records_scopes():
    m = TwoLayer()
    assert [n for n, _ in m.named_parameters()] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    g = ag.trace(m)
    assert list(g.params) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert g.output_types() == {"output": ag.TensorType(("batch", 4))}
    scopes = {n.meta.get("scope") for n in g.nodes() if n.op == "matmul"}
    assert scopes == {"fc1", "fc2"}
    loc = next(n for n in g.nodes() if n.op == "softmax").meta["loc"]
    assert loc.endswith("in forward") and "test_dsl.py" in loc


def test_shape_error_names_op_shapes_and_user_line():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter((5, 3))

        def forward(self, x):
            return x @ self.w  # the line the error must name

    with pytest.raises(GraphError) as err:
        ag.trace(Bad(), {"x": (("batch", 4), "float32")})
    msg = str(err.value)
    assert "matmul(%x: f32[batch, 4], %w: f32[5, 3])" in msg
    assert "contracting dims differ" in msg
    assert "test_dsl.py" in msg and "in forward" in msg


def test_shape_error_in_a_library_layer_names_the_module_and_the_users_call():
    """A Linear given the wrong width fails in attngraph's layer code: the error also names the module
    path and the user's line that called it, not only the library's line."""
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 4)
            self.b = nn.Linear(8, 4)

        def forward(self, x):
            return self.b(self.a(x))  # the call the error must name

    with pytest.raises(GraphError) as err:
        ag.trace(Stack(), {"x": (("batch", 8), "float32")})
    msg = str(err.value)
    line = next(i for i, text in enumerate(open(__file__), 1) if "the call the error must name" in text)
    assert "in module b," in msg and "layers.py" in msg, msg
    assert f"(called from {os.path.relpath(__file__)}:{line} in forward)" in msg, msg


def test_tensor_ops_outside_trace_are_a_clear_error():
    with pytest.raises(nn.TraceError, match="only work while tracing"):
        nn.Linear(2, 2)(np.zeros((1, 2)))


def test_forward_must_return_tensors():
    class NoOut(nn.Module):
        def forward(self, x):
            return 3

    with pytest.raises(nn.TraceError, match="must return a Tensor"):
        ag.trace(NoOut(), {"x": ((2,), "float32")})


def test_super_init_is_required():
    class Forgot(nn.Module):
        def __init__(self):
            self.w = nn.Parameter((2,))

    with pytest.raises(AttributeError, match="must call super"):
        Forgot()


def test_indexing_and_layout_methods():
    class Idx(nn.Module):
        def forward(self, x):
            return {"a": x[:, 1:3], "b": x[0], "c": x[None, ..., 2], "d": x.transpose(0, 1).unsqueeze(0),
                    "e": x[:, :x.shape[1]]}

    g = ag.trace(Idx(), {"x": (("n", 4), "float32")})
    x = np.arange(12.0).reshape(3, 4)
    out = ag.reference.run(g, {"x": x}, {}, dtype="float64")
    np.testing.assert_array_equal(out["a"], x[:, 1:3])
    np.testing.assert_array_equal(out["b"], x[0])
    np.testing.assert_array_equal(out["c"], x[None, ..., 2])
    np.testing.assert_array_equal(out["d"], x.T[None])
    np.testing.assert_array_equal(out["e"], x)
    assert g.output_types()["c"].shape == (1, "n")


def test_shared_parameters_trace_to_one_node():
    m = ag.models.get("transformer-tiny")
    names = [n for n, _ in m.named_parameters()]
    assert "src_embed.weight" in names and "tgt_embed.weight" not in names
    g = ag.trace(m)
    table = g.params["src_embed.weight"]
    assert len(g.users(table)) == 3  # source lookup, target lookup, output projection


def test_model_zoo_and_user_models(tmp_path):
    assert {"transformer-tiny", "transformer-base", "transformer-big"} <= set(ag.models.names())
    with pytest.raises(ag.models.ModelNotFound, match="Did you mean transformer-base"):
        ag.models.get("transformer-bas")
    f = tmp_path / "mymodel.py"
    f.write_text("from attngraph import nn\n"
                 "class M(nn.Module):\n"
                 "    def __init__(self):\n"
                 "        super().__init__()\n"
                 "        self.fc = nn.Linear(3, 2)\n"
                 "    def input_specs(self):\n"
                 "        return {'x': nn.InputSpec(('n', 3))}\n"
                 "    def forward(self, x):\n"
                 "        return self.fc(x)\n"
                 "def make():\n"
                 "    return M()\n"
                 "def sized(d):\n"
                 "    return M()\n"
                 "def wrong():\n"
                 "    return 5\n")
    g = ag.models.load_graph(f"{f}:make")
    assert g.output_types()["output"] == ag.TensorType(("n", 2))
    assert ag.models.load_graph(f"{f}:M").output_types() == g.output_types()  # a class is a factory too
    with pytest.raises(ag.models.ModelNotFound, match="has no 'nope'; callables there: M, make, sized, wrong"):
        ag.models.get(f"{f}:nope")
    with pytest.raises(ag.models.ModelNotFound, match="callable without arguments, but it needs d"):
        ag.models.get(f"{f}:sized")
    with pytest.raises(ag.models.ModelNotFound, match="wrong returned int, not an attngraph.nn.Module"):
        ag.models.get(f"{f}:wrong")
    with pytest.raises(ag.models.ModelNotFound, match="not found"):
        ag.models.get(f"{tmp_path}/missing.py:make")


@pytest.mark.parametrize("name, dims, layers", [("transformer-base", (512, 8, 2048), 6),
                                                ("transformer-big", (1024, 16, 4096), 6)])
def test_paper_configurations(name, dims, layers):
    m = ag.models.get(name)
    d, h, ff = dims
    types = m.parameter_types()
    assert types["encoder.layers.0.ffn.linear1.weight"].shape == (d, ff)
    assert len(m.encoder.layers) == len(m.decoder.layers) == layers
    assert m.encoder.layers[0].self_attn.num_heads == h
    assert f"encoder.layers.{layers - 1}.norm2.weight" in types


@pytest.mark.parametrize("make, match", [
    (lambda: nn.Linear(0, 3), r"Parameter shape \(0, 3\): sizes must be integers of at least 1"),
    (lambda: nn.Linear(-1, 3), r"Parameter shape \(-1, 3\)"),
    (lambda: nn.Linear(2.5, 3), r"Parameter shape \(2.5, 3\)"),  # int(2.5) would have been 2, silently
    (lambda: nn.LayerNorm(0), r"Parameter shape \(0,\)"),
])
def test_layers_of_impossible_sizes_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("spec, match", [
    (((-1, 2), "float32"), r"input 'x' \(f32\[-1, 2\]\): axis 0 has the fixed size -1; sizes are at least 1"),
    ((("n", 0), "float32"), r"axis 1 has the fixed size 0"),
    ((("n", 2), "float99"), r"input 'x': unsupported dtype 'float99'"),
    ((("n+*", 2), "float32"), r"input 'x': cannot parse dimension 'n\+\*'"),
])
def test_bad_input_specs_are_named(spec, match):
    class Id(nn.Module):
        def forward(self, x):
            return x * 2

    with pytest.raises(nn.TraceError, match=match):
        ag.trace(Id(), {"x": spec})


@pytest.mark.parametrize("body, ok", [
    (lambda x: x.transpose(-1, -2), True), (lambda x: x.unsqueeze(-1), True), (lambda x: x.unsqueeze(2), True),
    (lambda x: x.transpose(0, 5), False), (lambda x: x.unsqueeze(7), False), (lambda x: x.unsqueeze(-4), False),
])
def test_axes_out_of_range_are_errors_not_wrapped(body, ok):
    """As in PyTorch: unsqueeze(7) of a rank-2 tensor is an error (``7 % 3`` would have put the axis at 1)."""
    class M(nn.Module):
        def forward(self, x):
            return body(x)

    if ok:
        ag.trace(M(), {"x": (("n", 2), "float32")})
    else:
        with pytest.raises(nn.TraceError, match=r"of %x: f32\[n, 2\] at .*test_dsl.py:\d+ in <lambda>: axis -?\d "
                                                r"is out of range \[-\d, \d\)"):
            ag.trace(M(), {"x": (("n", 2), "float32")})


def test_python_errors_in_the_users_forward_name_its_line(tmp_path):
    f = tmp_path / "branchy.py"
    f.write_text("from attngraph import nn\n"
                 "class M(nn.Module):\n"
                 "    def input_specs(self):\n"
                 "        return {'x': nn.InputSpec(('batch', 4))}\n"
                 "    def forward(self, x):\n"
                 "        if x.shape[0] > 3:\n"
                 "            return x\n"
                 "        return x * 2\n"
                 "class Broken(nn.Module):\n"
                 "    def __init__(self):\n"
                 "        super().__init__()\n"
                 "        self.fc = nn.Linear(0, 4)\n")
    with pytest.raises(nn.TraceError, match=r"batch > 3 at .*branchy.py:6 in forward: a symbolic size has no "
                                            r"value while tracing"):
        ag.models.load_graph(f"{f}:M")
    with pytest.raises(ag.models.ModelNotFound, match=r"Broken: creating the model failed at .*branchy.py:12: "
                                                      r"ValueError: Parameter shape \(0, 4\)"):
        ag.models.get(f"{f}:Broken")


def test_comparisons_are_ops_and_never_python_bools():
    """``mask == 0`` records an op (as in PyTorch), so the Annotated Transformer's masked_fill(mask == 0, -1e9)
    masks; ``if t:`` and ``bool(t)`` are errors naming the line; ``~`` is the not of a bool tensor."""
    class M(nn.Module):
        def forward(self, x, mask):
            s = x @ x.transpose(-2, -1)
            return {"eq": s.masked_fill(mask[:, None, :] == 0, -1e9).softmax(dim=-1),
                    "ne": (mask != 0).astype("int64"), "not": ~(mask == 1)}

    g = ag.trace(M(), {"x": nn.InputSpec(("b", 4, 8)), "mask": nn.InputSpec(("b", 4), "int64")})
    assert {"eq", "ne", "logical_not"} <= set(g.op_counts())
    x = np.random.default_rng(0).standard_normal((1, 4, 8))
    mask = np.array([[1, 1, 0, 0]])
    out = ag.reference.run(g, {"x": x, "mask": mask}, {}, dtype="float64")
    assert out["eq"][0, :, 2:].max() < 1e-12 and np.allclose(out["eq"].sum(-1), 1)
    np.testing.assert_array_equal(out["ne"], mask)
    np.testing.assert_array_equal(out["not"], mask == 0)

    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(nn.TraceError, match=r"no truth value .*test_dsl.py:\d+ in forward"):
        ag.trace(Branchy(), {"x": nn.InputSpec((2,))})

    class NotOfFloat(nn.Module):
        def forward(self, x):
            return ~x

    with pytest.raises(nn.TraceError, match=r"~ is the logical not of a bool tensor"):
        ag.trace(NotOfFloat(), {"x": nn.InputSpec((2,))})


def test_pytorch_spellings_contiguous_matmul_einsum_buffers_and_symbolic_slices():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("bias", np.tril(np.ones((16, 16), bool)).reshape(1, 1, 16, 16))

        def forward(self, q, k):
            n = q.shape[2]
            s = q.matmul(k.transpose(-2, -1).contiguous())
            return {"masked": F.where(self.bias[:, :, :n, :n], s, -1.0),
                    "einsum": F.einsum("bhqd,bhkd->bhqk", q, k), "implicit": F.einsum("bhqd,bhkd", q, k)}

    g = ag.trace(M(), {"q": nn.InputSpec((2, 3, "seq", 4)), "k": nn.InputSpec((2, 3, "seq", 4))})
    (buf,) = [n for n in g.nodes() if n.op == "const" and n.meta.get("buffer")]
    assert buf.name == "bias" and buf.type.shape == (1, 1, 16, 16)
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 3, 5, 4)), rng.standard_normal((2, 3, 5, 4))
    out = ag.reference.run(g, {"q": q, "k": k}, {}, dtype="float64")
    s = q @ k.swapaxes(-1, -2)
    np.testing.assert_allclose(out["masked"], np.where(np.tril(np.ones((5, 5), bool)), s, -1.0))
    np.testing.assert_allclose(out["einsum"], np.einsum("bhqd,bhkd->bhqk", q, k))
    np.testing.assert_allclose(out["implicit"], np.einsum("bhqd,bhkd", q, k))
    # the sliced buffer depends on the run's length: computed per run, not folded into a weight
    from attngraph.passes.memory import weights_only
    sliced = [n.id for n in g.nodes() if n.op == "slice"]
    assert sliced and not set(sliced) & weights_only(g)


@pytest.mark.parametrize("equation, shapes", [
    ("bsd,de->bse", [("b", "s", 4), (4, 5)]),      # a projection: symbolic leading dims merged and split again
    ("bqhd,bkhd->bhqk", [(2, 5, 3, 4), (2, 6, 3, 4)]),
    ("bhqk,bkhd->bqhd", [(2, 3, 5, 6), (2, 6, 3, 4)]),
    ("...qd,...kd->...qk", [(2, 3, 5, 4), (2, 3, 6, 4)]),
    ("abcd,cde->abe", [(2, 3, 4, 5), (4, 5, 6)]),
    ("i,i->", [(4,), (4,)]), ("bi,bj->bij", [(2, 3), (2, 4)]), ("ij->ji", [(3, 4)]), ("ij->i", [(3, 4)]),
])
def test_einsum_matches_numpy(equation, shapes):
    class M(nn.Module):
        def forward(self, **xs):
            return F.einsum(equation, *xs.values())

    g = ag.trace(M(), {f"x{i}": nn.InputSpec(s) for i, s in enumerate(shapes)})
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal([{"b": 2, "s": 3}.get(d, d) for d in s]) for s in shapes]
    got = ag.reference.run(g, {f"x{i}": a for i, a in enumerate(arrays)}, {}, dtype="float64")["output"]
    np.testing.assert_allclose(got, np.einsum(equation, *arrays), atol=1e-12)


@pytest.mark.parametrize("equation, match", [
    ("ii->i", "a letter repeated"), ("ij,jk,kl->il", "one or two are supported"), ("ijk->i", "names 3 axes"),
    ("ij->z", "appear in no operand"),
])
def test_einsum_errors_name_the_equation(equation, match):
    class M(nn.Module):
        def forward(self, x):
            return F.einsum(equation, *([x] * equation.split("->")[0].count(",")), x)

    with pytest.raises(nn.TraceError, match=match):
        ag.trace(M(), {"x": nn.InputSpec((3, 3))})
