"""The layout-chains pass: chains of reshapes, transposes and slices in their fewest ops, and layout ops moved past
row-wise ops to meet (PyTorch's nn.MultiheadAttention spelling of the head split)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attngraph as ag
from attngraph import nn
from attngraph.passes import kernel_count, layout_chains, optimize

LAYOUT = ("reshape", "transpose", "slice")


class Chain(nn.Module):
    """x through the layout ops ``steps``, then doubled (a reader that is not a layout op)."""

    def __init__(self, steps):
        super().__init__()
        self.steps = steps

    def forward(self, x):
        for kind, arg in self.steps:
            if kind == "reshape":
                x = x.reshape(arg)
            elif kind == "transpose":
                x = x.permute(*arg)
            else:
                x = x[(slice(None),) * arg[0] + (slice(arg[1], arg[2]),)]
        return x * 2.0


@st.composite
def chains(draw):
    """A random chain over a (2, 6, 4) tensor: merges of neighbouring axes, splits of an axis by a divisor,
    permutations and slices of an axis."""
    shape, steps = [2, 6, 4], []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["merge", "split", "transpose", "slice"]))
        if kind == "merge" and len(shape) > 1:
            i = draw(st.integers(0, len(shape) - 2))
            shape = shape[:i] + [shape[i] * shape[i + 1]] + shape[i + 2:]
            steps.append(("reshape", tuple(shape)))
        elif kind == "split":
            i = draw(st.integers(0, len(shape) - 1))
            divisors = [d for d in range(1, shape[i] + 1) if shape[i] % d == 0]
            d = draw(st.sampled_from(divisors))
            shape = shape[:i] + [d, shape[i] // d] + shape[i + 1:]
            steps.append(("reshape", tuple(shape)))
        elif kind == "transpose":
            perm = tuple(draw(st.permutations(range(len(shape)))))
            shape = [shape[p] for p in perm]
            steps.append(("transpose", perm))
        elif kind == "slice":
            i = draw(st.integers(0, len(shape) - 1))
            start = draw(st.integers(0, shape[i] - 1))
            stop = draw(st.integers(start + 1, shape[i]))
            shape = shape[:i] + [stop - start] + shape[i + 1:]
            steps.append(("slice", (i, start, stop)))
    return steps


@settings(max_examples=150, deadline=None)
@given(chains())
def test_a_collapsed_chain_computes_what_the_chain_did_in_no_more_ops(steps):
    g = ag.trace(Chain(steps), {"x": ((2, 6, 4), "float32")})
    before = sum(n.op in LAYOUT for n in g.nodes())
    x = np.random.default_rng(0).standard_normal((2, 6, 4))
    want = ag.reference.run(g, {"x": x}, {}, dtype="float64")["output"]
    out = g.copy()
    layout_chains.collapse(out)
    out.validate()
    assert sum(n.op in LAYOUT for n in out.nodes()) <= before
    np.testing.assert_array_equal(ag.reference.run(out, {"x": x}, {}, dtype="float64")["output"], want)


@pytest.mark.parametrize("steps, shape, ops", [
    ([("transpose", (1, 0, 2)), ("transpose", (1, 0, 2))], (2, 6, 4), []),  # back where it was
    ([("reshape", (2, 6, 2, 2)), ("transpose", (0, 2, 1, 3)), ("transpose", (0, 2, 1, 3)), ("reshape", (2, 6, 4))],
     (2, 6, 4), []),
    # the merged projection's second third, through a leading axis of 3: one slice of the last axis
    ([("reshape", (2, 6, 3, 4)), ("transpose", (2, 0, 1, 3)), ("slice", (0, 1, 2)), ("reshape", (2, 6, 4))],
     (2, 6, 12), ["slice"]),
    # (seq, batch*heads, dim) and back to (batch, heads, seq, dim): the head split of the DSL
    ([("transpose", (1, 0, 2)), ("reshape", (6, 4, 3)), ("transpose", (1, 0, 2)), ("reshape", (2, 2, 6, 3))],
     (2, 6, 6), ["reshape", "transpose"]),
])
def test_known_chains_collapse_to_their_fewest_ops(steps, shape, ops):
    g = ag.trace(Chain(steps), {"x": (shape, "float32")})
    x = np.random.default_rng(0).standard_normal(shape)
    want = ag.reference.run(g, {"x": x}, {}, dtype="float64")["output"]
    assert layout_chains.collapse(g) == 1
    assert [n.op for n in g.nodes() if n.op in LAYOUT] == ops
    np.testing.assert_array_equal(ag.reference.run(g, {"x": x}, {}, dtype="float64")["output"], want)


def test_the_multihead_attention_spelling_becomes_the_dsl_models_head_split():
    """nn.MultiheadAttention's batch-first transposes, its unflatten/unsqueeze/transpose/squeeze/select split of
    the merged projection and its (seq, batch*heads, dim) heads: after layout-chains, the slices of the projection
    viewed as heads, attention in the projections' layout, and as many kernels as the DSL's encoder."""
    import torch
    from torch.export import Dim
    torch.manual_seed(0)
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
        graph, _ = ag.from_torch(enc, (torch.randn(2, 8, 32),), dynamic_shapes={"src": {0: Dim("batch"),
                                                                                       1: Dim("seq")}})
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    imported, report = optimize(graph, 3, verify_each=True)  # each pass keeps the float64 interpreter's outputs
    assert report.stat("layout-chains").matches >= 8
    dsl, _ = optimize(ag.trace(ag.models.transformer.TransformerEncoderModel(32, 4, 64, 2)), 3)
    assert kernel_count(imported) == kernel_count(dsl)
    for op in ("fused_attention", "linear", "add_layer_norm"):
        assert imported.op_counts()[op] == dsl.op_counts()[op]
    assert all(n.attrs["layout"] == "bshd" for n in imported.nodes() if n.op == "fused_attention")
    from attngraph.passes.memory import weights_only
    constant = weights_only(imported)
    moved = [n.op for n in imported.nodes() if n.op == "transpose" and n.id not in constant]
    assert moved == []  # every transpose left is of a weight (folded when the weights are bound)
