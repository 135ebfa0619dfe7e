"""The passes: each rule on small graphs (matches and near misses), the pipeline on the zoo, and
property tests: every level keeps the float64 interpreter's outputs."""

import math

import numpy as np
import pytest
from conftest import example
from hypothesis import given, settings
from hypothesis import strategies as st

import attngraph as ag
from attngraph import nn, passes
from attngraph.nn import functional as F
from attngraph.passes import PassVerificationError
from attngraph.passes.memory import in_place_candidates


def run64(g, params, inputs):
    return ag.reference.run(g, inputs, params, dtype="float64")


def assert_same_meaning(g, level=3, seed=0, **dims):
    opt, report = passes.optimize(g, level)
    params = ag.init_params(g, seed, perturb=True)
    x = example(g, seed, **dims)
    want, got = run64(g, params, x), run64(opt, params, x)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-9, atol=1e-12)
    return opt, report


class Scores(nn.Module):
    """softmax over q @ k^T in one of the common spellings of the scale and mask."""

    def __init__(self, form, mask, d=8):
        super().__init__()
        self.form, self.mask, self.d = form, mask, d

    def forward(self, q, k, m):
        s = {"mul": lambda: (q @ k.transpose(-2, -1)) * (1 / math.sqrt(self.d)),
             "div": lambda: (q @ k.transpose(-2, -1)) / math.sqrt(self.d),
             "div-sqrt": lambda: (q @ k.transpose(-2, -1)) / F.sqrt(F.const(float(self.d), "float32")),
             "q-first": lambda: (q * (1 / math.sqrt(self.d))) @ k.transpose(-2, -1),
             "wrong": lambda: (q @ k.transpose(-2, -1)) * 0.3,
             "none": lambda: q @ k.transpose(-2, -1)}[self.form]()
        if self.mask == "additive":
            s = s + m.astype("float32") * -1e4
        elif self.mask == "keep":
            s = F.where(m, s, float("-inf"))
        elif self.mask == "drop":
            s = F.where(m, float("-inf"), s)
        elif self.mask == "causal":
            s = F.where(nn.causal_mask(q.shape[2], k.shape[2]), s, float("-inf"))
        return F.softmax(s, axis=-1)


def scores_graph(form, mask):
    spec = {"q": nn.InputSpec(("b", 2, "s", 8)), "k": nn.InputSpec(("b", 2, "s", 8)),
            "m": nn.InputSpec(("b", 1, 1, "s"), "bool")}
    g = ag.trace(Scores(form, mask), spec)
    g.meta["dims"] = {"b": 2, "s": 5}
    return g


@pytest.mark.parametrize("form", ["mul", "div", "div-sqrt", "q-first"])
@pytest.mark.parametrize("mask", ["none", "additive", "keep", "drop", "causal"])
def test_softmax_scaling_matches_every_form(form, mask):
    opt, report = assert_same_meaning(scores_graph(form, mask), level=2)
    (sms,) = [n for n in opt.nodes() if n.op == "scaled_masked_softmax"]
    assert math.isclose(sms.attrs["scale"], 1 / math.sqrt(8), rel_tol=1e-6)
    assert len(sms.attrs["mask_kinds"]) == (0 if mask == "none" else 1)
    assert "softmax" not in opt.op_counts()
    assert report.stat("softmax-scaling").near_misses == []


def test_wrong_scale_is_fused_but_reported():
    opt, report = assert_same_meaning(scores_graph("wrong", "keep"), level=2)
    assert opt.op_counts()["scaled_masked_softmax"] == 1
    (miss,) = report.stat("softmax-scaling").near_misses
    assert "scale 0.3 is not 1/sqrt(d_k) = 0.353553" in miss


def test_shared_intermediate_is_a_reported_near_miss():
    class Shared(nn.Module):
        def forward(self, q, k):
            s = (q @ k.transpose(-2, -1)) * 0.25
            masked = F.where(nn.causal_mask(q.shape[2], k.shape[2]), s, float("-inf"))
            return {"p": F.softmax(masked, axis=-1), "masked": masked}

    g = ag.trace(Shared(), {"q": nn.InputSpec((1, 2, "s", 16)), "k": nn.InputSpec((1, 2, "s", 16))})
    g.meta["dims"] = {"s": 4}
    opt, report = assert_same_meaning(g, level=2)
    assert "scaled_masked_softmax" not in opt.op_counts()
    (miss,) = report.stat("softmax-scaling").near_misses
    assert "is also used elsewhere" in miss


def test_attention_absorbs_head_split_transposes():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiHeadAttention(16, 4)

        def forward(self, x, pad):
            return self.mha(x, x, x, key_padding_mask=pad, causal=True)

    g = ag.trace(Attn(), {"x": nn.InputSpec(("b", "s", 16)), "pad": nn.InputSpec(("b", "s"), "bool")})
    g.meta["dims"] = {"b": 2, "s": 6}
    opt, report = assert_same_meaning(g)
    (att,) = [n for n in opt.nodes() if n.op == "fused_attention"]
    assert att.attrs["layout"] == "bshd" and att.attrs["mask_kinds"] == ("keep", "drop")
    assert "transpose" not in opt.op_counts()
    # Q, K and V merged into one projection (sliced per head group), plus the output projection.
    assert opt.op_counts()["linear"] == 2 and opt.op_counts()["slice"] == 3
    assert att.attrs["scale"] == 1.0  # -O3 folds 1/sqrt(d_k) into the Q weights...
    assert report.stat("fold-scale-into-q").matches == 1
    o2, _ = assert_same_meaning(g, level=2)
    (sms,) = [n for n in o2.nodes() if n.op == "scaled_masked_softmax"]
    assert sms.attrs["scale"] == 0.5  # ...-O2 keeps it in the softmax
    assert o2.op_counts()["linear"] == 4


def test_pre_ln_residual_is_a_near_miss_post_ln_fuses():
    for norm_first, fused in [(False, 2), (True, 0)]:
        m = nn.EncoderLayer(16, 4, 32, norm_first=norm_first)
        g = ag.trace(m, {"src": nn.InputSpec(("b", "s", 16))})
        g.meta["dims"] = {"b": 2, "s": 5}
        opt, report = assert_same_meaning(g)
        assert opt.op_counts().get("add_layer_norm", 0) == fused
        misses = report.stat("residual-layer-norm").near_misses
        assert bool(misses) == norm_first


def test_constant_folding_folds_the_position_table_exactly(tiny_graph):
    opt, report = passes.optimize(tiny_graph, 1)
    assert "sin" not in opt.op_counts() and "cos" not in opt.op_counts()
    assert report.stat("cse").matches > 0  # the table was built twice (source and target)
    assert report.stat("constant-fold").matches > 0


def test_transformer_base_fuses_18_attentions():
    g = ag.models.load_graph("transformer-base")
    opt, report = passes.optimize(g, 3)
    counts = opt.op_counts()
    assert counts["fused_attention"] == 18
    assert "softmax" not in counts and "scaled_masked_softmax" not in counts
    scopes = sorted(n.meta["scope"].split(".")[0] + "." + n.meta["scope"].split(".")[-1]
                    for n in opt.nodes() if n.op == "fused_attention")
    assert scopes.count("encoder.self_attn") == 6
    assert scopes.count("decoder.self_attn") == 6 and scopes.count("decoder.cross_attn") == 6
    # The one transpose left is the shared embedding's, feeding the output projection: weights only.
    (t,) = [n for n in opt.nodes() if n.op == "transpose"]
    assert opt.node(opt.operands(t.id)[0]).op == "param"
    assert all(n.attrs["layout"] == "bshd" for n in opt.nodes() if n.op == "fused_attention")
    assert report.kernels_after < report.kernels_before / 2
    assert report.bytes_after is not None and report.bytes_before is not None
    assert "fused_attention 0 -> 18" in report.format()
    # Q/K/V of every self-attention share one projection each; K/V of the memory in all six decoder layers one.
    assert report.stat("merge-projections").matches == 12 + 1
    # encoder layer: qkv + out + 2 FFN; decoder layer: qkv + out, q + out, 2 FFN; the memory's K/V; the logits
    assert counts["linear"] == 6 * 4 + 6 * 6 + 1 + 1


@pytest.mark.parametrize("level", [0, 1, 2, 3])
@pytest.mark.parametrize("model", ["transformer-tiny", "encoder-tiny"])
def test_every_level_keeps_the_zoo_models_meaning(model, level):
    assert_same_meaning(ag.models.load_graph(model), level)


def test_verify_each_names_the_broken_pass(tiny_graph, monkeypatch):
    def broken(g):
        for n in g.nodes():
            if n.op == "layer_norm":
                n.attrs["eps"] = 0.5  # a wrong rewrite
                return 1, []
        return 0, []

    monkeypatch.setitem(passes.PASSES, "broken", broken)
    with pytest.raises(PassVerificationError, match="pass 'broken' changed output 'log_probs'"):
        passes.optimize(tiny_graph, passes=["cse", "broken", "dce"], verify_each=True)
    _, report = passes.optimize(tiny_graph, 3, verify_each=True, disable=("attention",))
    assert "attention" not in [p.name for p in report.passes]


def test_memory_plan_reuses_buffers(tiny_graph):
    plan = passes.plan_memory(tiny_graph, {"batch": 2, "src_len": 16, "tgt_len": 12})
    assert plan.peak_bytes < plan.naive_bytes / 4
    reshape = next(n for n in tiny_graph.nodes() if n.op == "reshape" and n.id in plan.buffer_of
                   and tiny_graph.operands(n.id)[0] in plan.buffer_of)
    assert plan.buffer_of[reshape.id] == plan.buffer_of[tiny_graph.operands(reshape.id)[0]]


def test_pack_weights_packs_each_weight_once_and_keeps_the_meaning(tiny_graph):
    from attngraph.backends.tvm.targets.cpu.layout import pack_weights
    g, _ = passes.optimize(tiny_graph, 3)
    packed = g.copy()
    matches, misses = pack_weights(packed, 16)
    ops = [n.op for n in packed.nodes()]
    assert matches == ops.count("linear_packed") == [n.op for n in g.nodes()].count("linear")
    assert "linear" not in ops and not misses
    # The tied embedding is read by the gather and (transposed, packed) by the logits: one panel set per weight.
    panels = [n for n in packed.nodes() if n.op == "pack_panels"]
    assert len(panels) == len({packed.operands(n.id)[0] for n in panels})
    params = ag.init_params(tiny_graph, 0, perturb=True)
    x = example(tiny_graph, 0)
    want, got = run64(g, params, x), run64(packed, params, x)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-12)


class Unshifted(nn.Module):
    """``e = s.exp(); e / e.sum(-1, keepdim=True)`` over scores masked with finfo.min."""

    def input_specs(self):
        return {"s": nn.InputSpec((2, 5)), "pad": nn.InputSpec((2, 5), "bool")}

    def forward(self, s, pad):
        e = s.masked_fill(pad, float(np.finfo(np.float32).min)).exp()
        return e / e.sum(-1, keepdim=True)


def test_softmax_by_hand_keeps_the_programs_meaning():
    # a fully masked row: exp underflows to 0 everywhere, 0 / 0 is NaN in the program; softmax would make it
    # uniform, so the unshifted spelling is kept (a near miss says why), and -O3 computes what the program does
    g = ag.trace(Unshifted())
    opt, report = passes.optimize(g, 3)
    assert "softmax" not in opt.op_counts()
    assert any("without the row max" in m for m in report.stat("softmax-by-hand").near_misses)
    s = np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)
    pad = np.zeros((2, 5), bool)
    pad[0] = True
    for graph in (g, opt):
        out = run64(graph, {}, {"s": s, "pad": pad})["output"]
        assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


class GatedFFN(nn.Module):
    """SwiGLU, spelled as LLaMA's modules and as a plain function of two projections."""

    def __init__(self, d_ff, spelled="layer", d=24):
        super().__init__()
        self.spelled = spelled
        self.ffn = nn.SwiGLU(d, d_ff)
        self.up = nn.Linear(d, d_ff, bias=False)
        self.both = nn.Linear(d, 2 * d_ff, bias=False)

    def input_specs(self):
        return {"x": nn.InputSpec(("batch", "seq", 24))}

    def forward(self, x):
        if self.spelled == "layer":
            return self.ffn(x)
        if self.spelled == "value first":  # value * silu(gate)
            return self.ffn.w2(self.ffn.w3(x) * F.silu(self.ffn.w1(x)))
        if self.spelled == "chunk":  # one projection of both halves, chunked (as Phi-3's gate_up_proj)
            gate, value = self.both(x).chunk(2, dim=-1)
            return self.ffn.w2(F.silu(gate) * value)
        return self.ffn.w2(F.silu(self.ffn.w1(x)) * F.silu(self.up(x)))  # no value half: a gate of each


def _llvm_layout(g):
    from attngraph.backends.tvm.targets import get_target
    return passes.optimize(g, 3, layout=get_target("llvm").layout_passes())


@pytest.mark.parametrize("spelled", ["layer", "value first", "chunk"])
def test_gate_projections_puts_swiglus_gate_in_the_projection(spelled):
    g = ag.trace(GatedFFN(32, spelled))
    opt, report = _llvm_layout(g)
    ops = [n.op for n in opt.nodes()]
    assert ops.count("swiglu_packed") == 1 and "slice" not in ops and "fused_elementwise" not in ops, ops
    stat = next(p for p in report.passes if p.name == "gate-projections")
    assert stat.matches == 1 and not stat.near_misses
    params = ag.init_params(g, 0, perturb=True)
    x = example(g, 0, batch=2, seq=5)
    want, got = run64(g, params, x), run64(opt, params, x)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-12)


def test_gate_projections_guards():
    # a hidden width that is not whole panels (the reason said); two gates of two projections; a training step
    # (its backward reads the gate's values): each left as it was
    opt, report = _llvm_layout(ag.trace(GatedFFN(40)))
    assert "swiglu_packed" not in [n.op for n in opt.nodes()]
    stat = next(p for p in report.passes if p.name == "gate-projections")
    assert any("not a whole number of 16-column panels" in m for m in stat.near_misses), stat.near_misses
    opt, _ = _llvm_layout(ag.trace(GatedFFN(32, "two gates")))
    assert "swiglu_packed" not in [n.op for n in opt.nodes()]
    from attngraph.train import Adam, training_graph
    step = training_graph(ag.trace(Sum(GatedFFN(32))), Adam(lr=1e-3))
    opt, report = _llvm_layout(step)
    assert "swiglu_packed" not in [n.op for n in opt.nodes()]


class Sum(nn.Module):
    """A scalar loss of a module's output (its sum), to train it."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def input_specs(self):
        return self.inner.input_specs()

    def forward(self, x):
        return {"loss": self.inner(x).sum()}


def test_attention_reads_merged_qkv_in_place_and_keeps_the_meaning(tiny_graph):
    from attngraph.passes.layout import read_merged_qkv
    g, _ = passes.optimize(tiny_graph, 3)
    merged = g.copy()
    matches, _ = read_merged_qkv(merged)
    attentions = [n for n in merged.nodes() if n.op == "fused_attention"]
    windows = [n for n in attentions if n.attrs.get("heads")]
    # Self-attentions (encoder and decoder) read q, k, v from their merged projection; cross-attentions'
    # q comes from elsewhere and keep theirs.
    assert matches == len(windows) > 0 and len(windows) < len(attentions)
    for n in windows:
        assert len(set(merged.operands(n.id)[:3])) == 1 and merged.node(merged.operands(n.id)[0]).op == "reshape"
    slices = [n for n in g.nodes() if n.op == "slice"]
    assert len([n for n in merged.nodes() if n.op == "slice"]) == len(slices) - 3 * matches
    params = ag.init_params(tiny_graph, 0, perturb=True)
    x = example(tiny_graph, 0)
    want, got = run64(g, params, x), run64(merged, params, x)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, atol=1e-12)


def test_attention_head_window_out_of_range_is_a_shape_error():
    t = ag.ir.TensorType(("batch", "seq", 6, 8), "float32")
    with pytest.raises(ag.ir.ops.ShapeError, match=r"reads k heads \[5, 7\) of 6"):
        ag.ir.ops.get("fused_attention").infer([t, t, t], {"layout": "bshd", "heads": (2, 0, 5, 4)})


def test_pack_panels_pads_the_last_panel():
    from attngraph.backends.tvm.targets.cpu.ops import pack_panels
    w = np.arange(3 * 5, dtype=np.float32).reshape(3, 5)
    p = pack_panels(w, width=4)
    assert p.shape == (2, 3, 4)
    np.testing.assert_array_equal(p[0], w[:, :4])
    np.testing.assert_array_equal(p[1, :, 0], w[:, 4])
    assert not p[1, :, 1:].any()


def test_in_place_cache_updates_get_no_buffer():
    from attngraph.generate import trace_entries
    g = trace_entries(ag.models.get("gpt-tiny"), 16)["decode_step"]
    opt, _ = passes.optimize(g, 3)
    updates = in_place_candidates(opt)
    assert len(updates) == sum(1 for n in opt.nodes() if n.op == "update_slice") > 0
    plan = passes.plan_memory(opt, {"batch": 2, "step": 1, "cache": 16}, in_place=updates)
    assert not updates & set(plan.buffer_of)


# -- property tests: random small graphs ------------------------------------------------------------

class RandomBlock(nn.Module):
    def __init__(self, choices):
        super().__init__()
        self.choices = choices
        self.fc = nn.Linear(8, 8)
        self.kv = nn.Linear(8, 4, bias=False)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        b, n, _ = x.shape

        def split(t):  # two heads of 4
            return t.reshape(b, n, 2, 4).transpose(1, 2)

        def merge(t):
            return t.transpose(1, 2).reshape(b, n, 8)
        h = x
        for c in self.choices:
            if c == 0:
                h = F.relu(self.fc(h))
            elif c == 1:
                h = self.norm(h + x)
            elif c == 2:
                s = (h @ h.transpose(-2, -1)) / math.sqrt(8)
                h = F.softmax(s, axis=-1) @ h
            elif c == 3:
                h = h * 2.0 + (F.const(np.ones(8, np.float32)) * 3.0)
            elif c == 4:
                h = h.reshape(h.shape[0], h.shape[1], 2, 4).reshape(h.shape[0], h.shape[1], 8)
            elif c == 5:
                h = F.gelu(h @ self.fc.weight + self.fc.bias)
            elif c == 6:  # one projection as queries and keys (tied), its heads reused as values
                qk = split(self.fc(h))
                h = merge(F.scaled_dot_product_attention(qk, qk, qk, is_causal=True))
            elif c == 7:  # one key/value head for two query heads, a large negative fill
                kv = self.kv(h).unsqueeze(1)
                s = (split(h) / 2.0) @ kv.transpose(-2, -1)
                keep = nn.causal_mask(n, n)
                h = merge(s.masked_fill(keep == False, -1e9).softmax(dim=-1) @ kv)  # noqa: E712
            elif c == 8:  # the scaled scores reused beside the softmax
                s = (split(h) * 0.5) @ split(h).transpose(-2, -1)
                h = merge(s.softmax(dim=-1) @ split(h)) + merge(s[..., :1] * split(h))
            else:  # a softmax by hand over masked scores, finfo.min as the fill
                s = split(h) @ split(self.fc(h)).transpose(-2, -1) * 0.5
                s = F.where(nn.causal_mask(n, n), s, float(np.finfo(np.float32).min))
                e = (s - s.max(dim=-1, keepdim=True)).exp()
                h = merge(e / e.sum(dim=-1, keepdim=True) @ split(h))
        return {"y": h, "x2": x * 1.0}


@settings(max_examples=40, deadline=None)
@given(choices=st.lists(st.integers(0, 9), min_size=1, max_size=6), level=st.integers(0, 3))
def test_random_graphs_keep_their_meaning(choices, level):
    g = ag.trace(RandomBlock(choices), {"x": nn.InputSpec(("b", "s", 8))})
    g.meta["dims"] = {"b": 2, "s": 3}
    assert_same_meaning(g, level)


class Chains(nn.Module):
    """Elementwise chains as an optimizer update and a norm's backward write them: a value read twice in one
    chain, a value read by two chains, a value also read by a reduction, a graph output in the middle of a
    chain, a smaller (broadcast) intermediate, and a chain on the weights alone."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter((8,))

    def forward(self, x, m, v):
        g = x * 0.5                                  # read by two chains: its own kernel
        m2 = m * 0.9 + g * 0.1                       # an output, read by the update too
        v2 = v * 0.98 + (g * g) * 0.02
        row = (v2 - 1.0).sum(dim=-1, keepdim=True)  # a reduction reads v2 - 1
        scaled = self.w * 2.0 + 1.0                  # weights alone: computed once at bind time, not fused
        small = (row * 0.5).exp()                    # (b, s, 1): not swallowed by the (b, s, 8) chain
        update = m2 / ((v2 * v2 + 1e-9).sqrt() + 1e-9) * scaled - small
        return {"update": update.relu() * (x > 0).float(), "m": m2, "v": v2}


def test_fuse_elementwise_makes_a_kernel_of_each_chain():
    spec = {k: nn.InputSpec(("b", "s", 8)) for k in ("x", "m", "v")}
    g = ag.trace(Chains(), spec)
    g.meta["dims"] = {"b": 2, "s": 5}
    opt, report = assert_same_meaning(g, b=2, s=5)
    fused = [n for n in opt.nodes() if n.op == "fused_elementwise"]
    assert report.stat("fuse-elementwise").matches == len(fused) == 4  # m2, v2, small, update
    left = sorted((n.op, str(n.type)) for n in opt.nodes() if n.op not in ("input", "param", "const", "fused_elementwise"))
    assert left == [("add", "f32[8]"), ("mul", "f32[8]"),  # the weights' chain (bind time)
                    ("mul", "f32[b, s, 8]"), ("reduce_sum", "f32[b, s, 1]"), ("sub", "f32[b, s, 8]")]  # g; row
    for name in ("m", "v"):  # outputs stay values of their own
        assert opt.node(dict(opt.outputs)[name]).op == "fused_elementwise"
    compiled = ag.compile(opt, ag.init_params(g, 0, perturb=True), target="llvm", opt_level=0)
    x = example(g, 1, b=3, s=4)
    want = run64(g, ag.init_params(g, 0, perturb=True), x)
    got = compiled(x)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_gradients_through_fused_chains_equal_the_unfused():
    spec = {k: nn.InputSpec(("b", "s", 8)) for k in ("x", "m", "v")}

    class Loss(Chains):
        def forward(self, x, m, v):
            return {"loss": (super().forward(x, m, v)["update"] * x).sum()}
    g = ag.trace(Loss(), spec)
    g.meta["dims"] = {"b": 2, "s": 3}
    opt, _ = passes.optimize(g, 3)
    assert opt.op_counts()["fused_elementwise"] >= 3
    params, x = ag.init_params(g, 0, perturb=True), example(g, 2, b=2, s=3)
    want = run64(ag.grad(g, inputs=("x",)), params, x)
    got = run64(ag.grad(opt, inputs=("x",)), params, x)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-9, atol=1e-12)


def test_the_loss_reads_the_logits_instead_of_their_log_softmax():
    from attngraph import train
    g = ag.trace(train.TokenLoss(ag.models.get("gpt-tiny"), label_smoothing=0.1))
    opt, report = assert_same_meaning(g)
    assert report.stat("loss-of-log-softmax").matches == 1 and "log_softmax" not in opt.op_counts()

    class Both(nn.Module):
        def forward(self, x, t):
            lp = F.log_softmax(x, axis=-1)
            return {"log_probs": lp, "loss": F.cross_entropy(lp, t, log_probs=True, label_smoothing=0.2)}
    g = ag.trace(Both(), {"x": nn.InputSpec(("n", 10)), "t": nn.InputSpec(("n",), "int64", low=0, high=10)})
    g.meta["dims"] = {"n": 6}
    opt, report = assert_same_meaning(g, n=6)
    assert report.stat("loss-of-log-softmax").matches == 0
    assert "also used elsewhere (or an output)" in report.stat("loss-of-log-softmax").near_misses[0]


def test_the_gradient_of_a_merged_projection_is_one_concat():
    """q, k, v read as slices of one merged projection: their cotangents become one concat, not three writes
    into zeros added up; the gradients stay those of the unfused graph."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.EncoderLayer(16, 4, 32)

        def forward(self, x):
            return {"loss": (self.layer(x) * x).sum()}
    g = ag.trace(Block(), {"x": nn.InputSpec(("b", "s", 16))})
    g.meta["dims"] = {"b": 2, "s": 5}
    fused, _ = passes.optimize(g, 3)
    assert [n.type.shape[-1] for n in fused.nodes() if n.op == "linear"].count(48) == 1  # q, k, v merged into one
    step, report = passes.optimize(ag.grad(fused), 3)
    assert report.stat("slice-grads-to-concat").matches == 1 and "update_slice" not in step.op_counts()
    params, x = ag.init_params(g, 0, perturb=True), example(g, 1, b=2, s=5)
    want = run64(ag.grad(g), params, x)
    got = run64(step, params, x)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-9, atol=1e-12)


def test_a_fused_chain_reads_at_most_16_operands():
    """A global norm's sum over every gradient: chains of at most 16 operands (a kernel's buffers are bounded:
    32 storage buffers on lavapipe), the same sum."""
    class Total(nn.Module):
        def forward(self, **xs):
            total = None
            for x in xs.values():
                total = x * x if total is None else total + x * x
            return total
    g = ag.trace(Total(), {f"x{i}": nn.InputSpec(("n",)) for i in range(40)})
    g.meta["dims"] = {"n": 3}
    opt, _ = assert_same_meaning(g, n=3)
    fused = [n for n in opt.nodes() if n.op == "fused_elementwise"]
    assert len(fused) == 3 and all(len(opt.operands(n.id)) <= 16 for n in fused)


def test_a_tied_projections_gradient_has_no_transposed_copies():
    """h @ E^T with E the embedding table: the input gradient reads E (not E^T^T) and the table's gradient
    is g^T h as one weight_grad (not (h^T g)^T); the gradients stay the unfused graph's."""
    from attngraph import train
    g = ag.trace(train.TokenLoss(ag.models.get("gpt-tiny")))
    step, report = passes.optimize(ag.grad(g), 3)
    # the (h^T g)^T here; E^T^T is a chain of layout ops, collapsed earlier (layout-chains)
    assert report.stat("fold-transposes").matches >= 1 and report.stat("layout-chains").matches >= 1
    for n in step.nodes():
        if n.op == "transpose":
            assert step.node(step.operands(n.id)[0]).op not in ("transpose", "weight_grad"), step.describe(n.id)
    params, x = ag.init_params(g, 0, perturb=True), example(g, 1)
    want, got = run64(ag.grad(g), params, x), run64(step, params, x)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-9, atol=1e-12)


def test_the_activations_a_backward_reads_are_reported():
    """relu(x @ W1) @ W2 summed: the backward keeps the hidden values (for W2's gradient), the relu's input (for
    its mask) and the summed product (the sum's derivative spreads the cotangent to its shape): 2 x batch x 16 +
    batch x 4 floats; the weights and the inputs are not activations."""
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = nn.Parameter((8, 16)), nn.Parameter((16, 4))

        def forward(self, x):
            return {"loss": ((x @ self.w1).relu() @ self.w2).sum()}
    g = ag.trace(MLP(), {"x": nn.InputSpec(("b", 8))})
    g.meta["dims"] = {"b": 5}
    _, forward_only = passes.optimize(g, 0, passes=["dce"])
    assert forward_only.activations_after is None
    _, report = passes.optimize(ag.grad(g), 0, passes=["dce"])
    assert report.activations_after == (2 * 5 * 16 + 5 * 4) * 4
    assert "activations the backward reads (default dims) 720 bytes" in report.format()


class HandRMSNorm(nn.Module):
    """LLaMA's RMSNorm as its code writes it: x * rsqrt(mean(x²) + eps) * w (``shared``: the mean also returned)."""

    def __init__(self, shared=False):
        super().__init__()
        self.shared = shared
        self.weight = nn.Parameter((8,), init=("normal", 1.0))

    def input_specs(self):
        return {"x": nn.InputSpec(("batch", "seq", 8))}

    def default_dims(self):
        return {"batch": 2, "seq": 3}

    def forward(self, x):
        mean = (x * x).mean(dim=-1, keepdim=True)
        y = self.weight * (x * F.rsqrt(mean + 1e-6))
        return (y, mean) if self.shared else y


def test_an_rms_norm_written_by_hand_becomes_one_rms_norm_unless_its_parts_are_used_elsewhere():
    opt, report = assert_same_meaning(ag.trace(HandRMSNorm()), batch=2, seq=3)
    assert report.stat("rms-norm-by-hand").matches == 1
    assert opt.op_counts().get("rms_norm") == 1 and "reduce_mean" not in opt.op_counts()
    opt, report = assert_same_meaning(ag.trace(HandRMSNorm(shared=True)), batch=2, seq=3)
    assert "rms_norm" not in opt.op_counts() and "also used elsewhere" in report.stat("rms-norm-by-hand").near_misses[0]
