"""The IR: symbolic dims, types, the op registry (each op against NumPy), the graph and its views."""

import numpy as np
import pytest

from attngraph.ir import Graph, GraphError, TensorType, to_dot, to_text
from attngraph.ir import dims as D
from attngraph.ir import fused as FU
from attngraph.ir import ops as O

# -- dims ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("a, b, op, want", [
    ("batch", "seq", D.mul, "batch*seq"),
    ("seq", "batch", D.mul, "batch*seq"),
    ("seq", 1, D.add, "seq + 1"),
    ("seq + 1", 1, D.sub, "seq"),
    ("2*seq", "seq", D.sub, "seq"),
    (8, 64, D.mul, 512),
    ("batch*seq", "seq", D.divide, "batch"),
    ("batch*seq", 3, D.divide, None),
])
def test_dim_algebra(a, b, op, want):
    assert op(a, b) == want


def test_dim_evaluate_and_errors():
    assert D.evaluate("batch*seq + 2", {"batch": 3, "seq": 5}) == 17
    with pytest.raises(D.DimError, match="no value for symbolic dimension 'seq'"):
        D.evaluate("seq", {})
    with pytest.raises(D.DimError, match="cannot parse"):
        D.canonical("seq/2")


def test_tensor_type_prints_and_normalizes():
    t = TensorType(("batch", "seq*batch", 512), "float32")
    assert t.shape == ("batch", "batch*seq", 512)
    assert str(t) == "f32[batch, batch*seq, 512]"
    with pytest.raises(TypeError, match="unsupported dtype"):
        TensorType((1,), "complex64")


# -- every op against a NumPy formula, one line each ---------------------------------------------

rng = np.random.default_rng(0)
A = rng.standard_normal((2, 3, 4))
B = rng.standard_normal((2, 4, 5))
P = np.abs(A) + 0.5
G, BETA = rng.standard_normal(4), rng.standard_normal(4)
IDX = np.array([[0, 2], [1, 1]])


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


OP_CASES = [
    ("neg", [A], {}, -A),
    ("exp", [A], {}, np.exp(A)),
    ("log", [P], {}, np.log(P)),
    ("sqrt", [P], {}, np.sqrt(P)),
    ("rsqrt", [P], {}, 1 / np.sqrt(P)),
    ("tanh", [A], {}, np.tanh(A)),
    ("erf", [np.array([0.0, 0.5, -1.0])], {}, np.array([0.0, 0.5204998778130465, -0.8427007929497149])),
    ("relu", [A], {}, np.where(A > 0, A, 0)),
    ("gelu", [np.array([1.0, -0.5])], {}, np.array([0.8413447460685429, -0.15426876936299347])),
    ("gelu", [np.array([1.0])], {"approximate": "tanh"}, np.array([0.8411919906082768])),
    ("sin", [A], {}, np.sin(A)),
    ("cos", [A], {}, np.cos(A)),
    ("add", [A, G], {}, A + G),
    ("sub", [A, G], {}, A - G),
    ("mul", [A, G], {}, A * G),
    ("div", [A, P], {}, A / P),
    ("maximum", [A, G], {}, np.maximum(A, G)),
    ("lt", [A, G], {}, A < G),
    ("eq", [IDX, np.array(1)], {}, IDX == 1),
    ("where", [A > 0, A, G], {}, np.where(A > 0, A, G)),
    ("matmul", [A, B], {}, np.einsum("bij,bjk->bik", A, B)),
    ("softmax", [A], {"axis": -1}, _softmax(A)),
    ("log_softmax", [A], {"axis": -1}, np.log(_softmax(A))),
    ("layer_norm", [A, G, BETA], {"eps": 1e-5},
     (A - A.mean(-1, keepdims=True)) / np.sqrt(A.var(-1, keepdims=True) + 1e-5) * G + BETA),
    ("reduce_sum", [A], {"axes": (1,)}, A.sum(1)),
    ("reduce_mean", [A], {"axes": (0, 2), "keepdims": True}, A.mean((0, 2), keepdims=True)),
    ("reduce_max", [A], {"axes": (-1,)}, A.max(-1)),
    ("reshape", [A], {"shape": (6, 4)}, A.reshape(6, 4)),
    ("transpose", [A], {"perm": (2, 0, 1)}, A.transpose(2, 0, 1)),
    ("slice", [A], {"axis": 2, "start": 1, "stop": 4, "step": 2}, A[:, :, 1:4:2]),
    ("concat", [A, A], {"axis": 1}, np.concatenate([A, A], 1)),
    ("gather", [A[0], IDX], {}, A[0][IDX]),
    ("cast", [A], {"dtype": "int32"}, A.astype(np.int32)),
    ("arange", [], {"n": 5}, np.arange(5)),
    ("update_slice", [A, A[:, :1] * 2, np.array(2)], {"axis": 1}, np.concatenate([A[:, :2], A[:, :1] * 2], 1)),
    ("linear", [A, B[0], G[:1].repeat(5)], {"activation": "relu"}, np.maximum(A @ B[0] + G[0], 0)),
    ("add_layer_norm", [A, A, G, BETA], {"eps": 1e-5},
     O.layer_norm(2 * A, G, BETA, eps=1e-5)),
    ("scaled_masked_softmax", [A, A[0] > 0], {"scale": 0.5, "mask_kinds": ("drop",)},
     _softmax(np.where(A[0] > 0, -np.inf, A * 0.5))),
]


@pytest.mark.parametrize("name, args, attrs, want", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_reference_and_type(name, args, attrs, want):
    opdef = O.get(name)
    got = opdef.ref(*args, **{**opdef.defaults, **attrs})
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    types = [TensorType(a.shape, a.dtype.name) for a in args]
    inferred = opdef.infer(types, {**opdef.defaults, **attrs})
    assert inferred.shape == got.shape and inferred.dtype == np.asarray(got).dtype.name


def test_fused_attention_matches_its_definition():
    q, k, v = (rng.standard_normal((2, 3, 5, 4)) for _ in range(3))
    mask = rng.standard_normal((5, 5))
    want = _softmax(q @ k.swapaxes(-1, -2) * 0.5 + mask) @ v
    got = FU.fused_attention(q, k, v, mask, scale=0.5, mask_kinds=("additive",))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    sw = lambda t: t.swapaxes(1, 2)  # noqa: E731
    got = FU.fused_attention(sw(q), sw(k), sw(v), mask, scale=0.5, mask_kinds=("additive",), layout="bshd")
    np.testing.assert_allclose(sw(got), want, rtol=1e-12)


@pytest.mark.parametrize("name, types, attrs, match", [
    ("add", [((2, 3), "float32"), ((4,), "float32")], {}, "do not broadcast"),
    ("add", [((3,), "float32"), ((3,), "int64")], {}, "dtypes differ"),
    ("matmul", [((2, 3), "float32"), ((4, 5), "float32")], {}, "contracting dims differ"),
    ("reshape", [(("b", 6), "float32")], {"shape": ("b", 4)}, "element counts"),
    ("transpose", [((2, 3), "float32")], {"perm": (0, 0)}, "not a permutation"),
    ("softmax", [((2, 3), "int64")], {"axis": -1}, "floating-point"),
    ("gather", [((5, 3), "float32"), ((2,), "float32")], {}, "must be integers"),
    ("slice", [((5,), "float32")], {"axis": 0, "start": 0, "stop": 7}, "past the end"),
    ("where", [((3,), "float32"), ((3,), "float32"), ((3,), "float32")], {}, "must be bool"),
])
def test_type_rules_reject_bad_operands(name, types, attrs, match):
    opdef = O.get(name)
    with pytest.raises(O.ShapeError, match=match):
        opdef.infer([TensorType(s, d) for s, d in types], {**opdef.defaults, **attrs})


def test_reshape_resolves_minus_one_symbolically():
    assert O.resolve_reshape(("b", "s", 512), ("b", "s", 8, -1)) == ("b", "s", 8, 64)
    assert O.resolve_reshape(("b", "s", 512), (-1, 512)) == ("b*s", 512)


def test_update_slice_overflow_is_clear():
    with pytest.raises(O.IndexOutOfRange, match="writing 2 entries at offset 4 overflows a cache of 5"):
        O.update_slice(np.zeros((5, 2)), np.ones((2, 2)), np.array(4), axis=0)


def test_gather_index_out_of_range_is_clear():
    with pytest.raises(O.IndexOutOfRange, match="index 7 is out of range for a table of 5 rows"):
        O.gather(np.zeros((5, 2)), np.array([1, 7]))


# -- the graph --------------------------------------------------------------------------------------

def small_graph():
    g = Graph("small")
    x = g.add("input", attrs={"type": TensorType(("n", 4))}, name="x")
    w = g.add("param", attrs={"type": TensorType((4, 4))}, name="w")
    y = g.add("matmul", [x, w])
    s = g.add("add", [y, y])  # the same operand twice: two edges
    g.set_outputs([("out", s)])
    return g, x, w, y, s


def test_operand_order_and_duplicate_operands():
    g, x, w, y, s = small_graph()
    assert g.operands(y) == [x, w]
    assert g.operands(s) == [y, y]
    assert g.uses(y) == [(s, 0), (s, 1)]
    g.validate()


def test_printer_is_stable_ssa_text():
    g = small_graph()[0]
    assert to_text(g) == (
        "graph small(%x: f32[n, 4]) {\n"
        "  %w = param() : f32[4, 4]\n"
        "  %matmul = matmul(%x, %w) : f32[n, 4]\n"
        "  %add = add(%matmul, %matmul) : f32[n, 4]\n"
        "  return out=%add\n"
        "}")


def test_dot_writer_lists_nodes_and_operand_indices():
    dot = to_dot(small_graph()[0])
    assert dot.startswith('digraph "small" {')
    assert 'label="matmul\\nmatmul\\nf32[n, 4]"' in dot
    assert '[label="1"]' in dot and "out_out" in dot


def test_add_reports_op_shapes_and_location():
    g = Graph()
    a = g.add("input", attrs={"type": TensorType((2, 3))}, name="a")
    b = g.add("input", attrs={"type": TensorType((4, 5))}, name="b")
    with pytest.raises(GraphError, match=r"matmul\(%a: f32\[2, 3\], %b: f32\[4, 5\]\) at model.py:7"):
        g.add("matmul", [a, b], meta={"loc": "model.py:7"})


def test_replace_remove_and_copy():
    g, x, w, y, s = small_graph()
    h = g.copy()
    z = g.add("mul", [y, y])
    g.replace_all_uses(s, z)
    assert g.outputs == [("out", z)]
    g.remove(s)
    g.validate()
    assert s in h and len(h) == 4  # the copy is independent
    with pytest.raises(GraphError, match="still used"):
        g.remove(y)


def test_validator_finds_corruption():
    g, x, w, y, s = small_graph()
    g.node(s).type = TensorType(("n", 5))
    g.nx.add_edge(s, y, index=2)
    with pytest.raises(GraphError) as err:
        g.validate()
    text = str(err.value)
    assert "cycle" in text and "recorded type f32[n, 5]" in text


def test_node_and_graph_metadata_follow_the_schema():
    """Every metadata key is written down in ``attngraph.ir.meta``; a graph whose metadata has another key, or a
    value of another type, is refused by name (what a new frontend must provide, and may not invent)."""
    import attngraph as ag
    from attngraph import models
    from attngraph.ir import meta as M
    g = ag.trace(models.get("transformer-tiny"))
    used = {k for n in g.nodes() for k in n.meta} | set(g.meta)
    assert used <= set(M.NODE) | set(M.GRAPH) and {"loc", "scope", "init", "low", "high", "kind"} <= used
    x = next(n for n in g.nodes() if n.op == "input")
    x.meta["source_line"] = 3
    with pytest.raises(GraphError, match=f"%{x.name}: metadata key 'source_line' is not in attngraph.ir.meta"):
        g.validate()
    del x.meta["source_line"]
    x.meta["low"] = "0"
    with pytest.raises(GraphError, match=f"%{x.name}: metadata 'low' is '0', expected int"):
        g.validate()
    x.meta["low"] = 0
    g.meta["dims"] = [("batch", 2)]
    with pytest.raises(GraphError, match="metadata 'dims' is .*, expected dict"):
        g.validate()
