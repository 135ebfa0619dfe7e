"""Attention as people write it (``attention_spellings.py``): each spelling fuses at -O3 or the pass
says why not, every pass keeps its meaning (``--verify-each``), and its llvm build matches the
float64 interpreter, fully padded sequences included."""

import re

import numpy as np
import pytest
from attention_spellings import FUSED, SPELLINGS

import attngraph as ag
from attngraph import passes


def padded_inputs(graph, seed=0, length=7):
    """x for three sequences of ``length`` positions: the first all padding, the second padded after 4."""
    rng = np.random.default_rng(seed)
    pad = np.zeros((3, length), bool)
    pad[0] = True
    pad[1, 4:] = True
    return {"x": rng.standard_normal((3, length, 16)).astype(np.float32), "pad": pad}


@pytest.mark.parametrize("name", SPELLINGS)
def test_each_spelling_fuses_or_says_why(name):
    factory, want, reporter = SPELLINGS[name]
    g = ag.trace(factory())
    opt, report = passes.optimize(g, 3, verify_each=True)
    counts = opt.op_counts()
    if want == FUSED:
        assert counts.get("fused_attention") == 1, report.format()
        assert not {"softmax", "scaled_masked_softmax", "exp", "log_softmax"} & set(counts), report.format()
    else:
        misses = report.stat(reporter).near_misses
        assert any(re.search(want, m) for m in misses), report.format()
    params = ag.init_params(g, seed=1, perturb=True)
    result = ag.verify(g, params=params, inputs=padded_inputs(g), target="llvm")
    assert result.ok, result.format()


def test_fills_and_broadcasts_reach_the_fused_op():
    """What the fused attentions hold: the -1e9 and finfo.min fills, the one key head of multi-query
    attention read with a stride of 0, the transposes of the head split absorbed (also around einsum)."""
    def fused(name):
        g, _ = passes.optimize(ag.trace(SPELLINGS[name][0]()), 3)
        (n,) = [n for n in g.nodes() if n.op == "fused_attention"]
        return g, n

    _, n = fused("annotated-transformer-mask-eq-0")
    assert n.attrs["mask_kinds"] == ("drop",) and n.attrs["mask_fills"] == (-1e9,)
    _, n = fused("hf-finfo-min-fill")
    assert n.attrs["mask_kinds"] == ("drop",) and n.attrs["mask_fills"] == (float(np.finfo(np.float32).min),)
    g, n = fused("multi-query-kv-one-head")
    assert n.attrs["layout"] == "bshd" and [g.node(o).type.shape[2] for o in g.operands(n.id)[:3]] == [4, 1, 1]
    g, n = fused("latent-queries-broadcast-batch")
    assert g.node(g.operands(n.id)[0]).type.shape[0] == 1 and n.type.shape[0] == "batch"
    for name in ("einsum", "sdpa-causal", "bias-free-projections"):
        g, n = fused(name)
        assert n.attrs["layout"] == "bshd" and "transpose" not in g.op_counts(), name
    g, _ = fused("bias-free-projections")  # LLaMA's projections: the scale folded, Q/K/V merged
    assert g.op_counts()["linear"] == 2 and g.op_counts()["concat"] == 1


def test_fully_masked_rows_follow_the_fill():
    """-inf makes a fully masked row NaN (as PyTorch's softmax), a finite fill uniform (as PyTorch's
    masked_fill(-1e9)); fused and unfused alike."""
    for name, nan in (("hf-finfo-min-fill", False), ("probabilities-returned", True)):
        g = ag.trace(SPELLINGS[name][0]())
        params = ag.init_params(g, seed=0)
        x = padded_inputs(g)
        for graph in (g, passes.optimize(g, 3)[0]):
            out = ag.reference.run(graph, x, params, dtype="float64")
            out = out.get("out", out.get("output"))
            assert np.isnan(out[0]).all() == nan and np.isfinite(out[1:]).all(), name
