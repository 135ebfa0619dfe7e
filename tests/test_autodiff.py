"""Reverse-mode derivatives (``attngraph.grad``): every op's against central differences in float64, whole
models' against PyTorch's autograd (same weights), and the gradient graph compiled in float32.

Tolerances: float64 derivatives against differences with step 1e-6: rtol 1e-6 (the difference's own error
is about 1e-10); float64 against PyTorch's float64 autograd: the loss to rel 1e-12, the gradients to rtol
1e-9 (and 1e-12 of the largest gradient entry); a float32 build
against the float64 interpreter: rtol 1e-4, atol 1e-5 of the largest gradient entry (some gradients are
exactly 0: a key projection's bias does not change a softmax).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import attngraph as ag
from attngraph import nn
from attngraph.ir import Graph, TensorType
from attngraph.ir import ops as O
from attngraph.nn import functional as F
from attngraph.passes.autodiff import GRAD_PREFIX, AutodiffError, grad

from op_cases import CASES, case_id, case_operands
from tiny_models import TorchTranslator, Translator, as_ours, batch

SIZES = {"b": 2, "s": 3}

#: the ops without a derivative: their results are integers or bools (or the KV-cache write, an inference op).
NOT_DIFFERENTIABLE = {"arange", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not",
                      "update_slice",
                      # made by a derivative: no second derivatives
                      "layer_norm_grad", "attention_lse", "attention_grad_q", "attention_grad_kv"}


def ir_ops():
    """The ops of the IR (a target's own layout ops come after differentiation, as its layout passes do)."""
    return {n for n, d in O.REGISTRY.items() if d.ref.__module__.startswith("attngraph.ir")} - set(O.SOURCE_OPS)


def test_every_op_has_a_derivative_or_no_float_result():
    missing = {n for n in ir_ops() if O.get(n).vjp is None} - NOT_DIFFERENTIABLE
    assert not missing, f"ops without a derivative (ir.ops.derivative): {sorted(missing)}"
    cases = {c[0] for c in DIFF_CASES}
    assert not (ir_ops() - NOT_DIFFERENTIABLE) - cases, "differentiable ops without a case in op_cases.CASES"


# -- every op against central differences ------------------------------------------------------------------

def single_op_graph(case, args, fixed=()):
    """``loss = sum(op(operands) * W)`` with the float operands as parameters p0, p1, ... and the others (and
    the operands at indices ``fixed``) as constants; W fixed and random, so that every entry of the result
    weighs differently."""
    op, attrs, types = case
    g = Graph(op)
    operands, params = [], {}
    for i, (t, a) in enumerate(zip(types, args)):
        if a.dtype.kind == "f" and i not in fixed:
            name = f"p{i}"
            operands.append(g.add("param", (), {"type": TensorType(a.shape, "float64")}, name=name))
            params[name] = a.astype(np.float64)
        else:
            operands.append(g.add("const", (), {"value": a}))
    attrs = O.bind_attrs({**O.get(op).defaults, **attrs}, SIZES)
    out = g.add(op, operands, attrs)
    t = g.node(out).type
    w = np.random.default_rng(1).standard_normal(t.shape)
    weighted = g.add("mul", [out, g.add("const", (), {"value": w, "dtype": t.dtype})])
    loss = g.add("reduce_sum", [weighted], {"axes": tuple(range(t.rank))}) if t.rank else weighted
    g.set_outputs([("loss", loss)])
    return g, params


def loss_of(g, params):
    return float(ag.reference.run(g, {}, params, dtype="float64")["loss"])


def directional_check(g, gradients, params, rtol=1e-6, directions=3, step=1e-6):
    """<gradient, v> against (L(p + h v) - L(p - h v)) / 2h for random directions v of each parameter."""
    rng = np.random.default_rng(2)
    for name, p in params.items():
        for _ in range(directions):
            v = rng.standard_normal(p.shape)
            up = loss_of(g, {**params, name: p + step * v})
            down = loss_of(g, {**params, name: p - step * v})
            numeric = (up - down) / (2 * step)
            analytic = float(np.sum(gradients[GRAD_PREFIX + name] * v))
            scale = max(abs(numeric), float(np.abs(gradients[GRAD_PREFIX + name]).sum()) * 1e-3, 1e-8)
            assert abs(analytic - numeric) <= rtol * scale + 1e-8, \
                f"d loss / d {name} along a random direction: {analytic} vs differences {numeric}"


DIFF_CASES = [c for c in CASES if c[0] in ir_ops() - NOT_DIFFERENTIABLE and any(t.is_float for t in c[2])]


@pytest.mark.parametrize("case", DIFF_CASES, ids=[case_id(c) for c in DIFF_CASES])
def test_derivative_matches_central_differences(case):
    op, attrs, _ = case
    args = case_operands(case, {**O.get(op).defaults, **attrs}, SIZES, np.random.default_rng(0))
    g, params = single_op_graph(case, args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # operands whose values are not read: zero gradients
        dg = grad(g, "loss")
    gradients = ag.reference.run(dg, {}, params, dtype="float64")
    for name, p in params.items():
        assert gradients[GRAD_PREFIX + name].shape == p.shape
    directional_check(g, gradients, params)


def types_of(args):
    return [TensorType(a.shape, "float64" if a.dtype.kind == "f" else "bool") for a in args]


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_attention_derivatives_over_shapes_masks_and_broadcast_heads(data):
    """fused_attention and scaled_masked_softmax at drawn sizes, layouts, masks (additive, keep, drop; per
    query or per key; shared by the batch or not; an additive mask learned or fixed: the two forms of the
    attention's backward) and key/value heads broadcast to the query heads."""
    draw = data.draw
    b, h, s, k, e = (draw(st.integers(1, n), label) for n, label in ((2, "b"), (3, "h"), (4, "s"), (5, "k"), (3, "e")))
    kv_heads = draw(st.sampled_from([h, 1]), "kv heads")
    layout = draw(st.sampled_from(["bhsd", "bshd"]), "layout")
    kinds = tuple(draw(st.lists(st.sampled_from(["additive", "keep", "drop"]), max_size=2), "mask kinds"))
    mask_shapes = [draw(st.sampled_from([(b, 1, 1, k), (1, 1, s, k), (b, h, s, k), (s, k)]), "mask shape")
                   for _ in kinds]
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16), "seed"))

    def qkv(heads, length):
        shape = (b, heads, length, e) if layout == "bhsd" else (b, length, heads, e)
        return rng.standard_normal(shape)
    masks = []
    for kind, shape in zip(kinds, mask_shapes):
        if kind == "additive":
            masks.append(np.where(rng.random(shape) < 0.3, -np.inf, rng.standard_normal(shape)))
        else:
            m = rng.random(shape) < 0.5
            m[..., 0] = kind == "keep"  # key 0 always attended: no fully masked row
            masks.append(m)
        if kind == "additive":
            masks[-1][..., 0] = 0.0
    attrs = {"scale": 0.4, "mask_kinds": kinds, "layout": layout}
    args = [qkv(h, s), qkv(kv_heads, k), qkv(kv_heads, k)] + masks
    learned = draw(st.booleans(), "additive masks learned")
    g, params = single_op_graph(("fused_attention", attrs, types_of(args)), args,
                                fixed=() if learned else range(3, len(args)))
    assert any(n.op == "attention_grad_q" for n in grad(g, "loss").nodes()) \
        == (not learned or "additive" not in kinds), "the backward's form"
    directional_check(g, ag.reference.run(grad(g, "loss"), {}, params, dtype="float64"), params)
    scores = [rng.standard_normal((b, h, s, k))] + masks
    sattrs = {"scale": 0.4, "mask_kinds": kinds}
    g, params = single_op_graph(("scaled_masked_softmax", sattrs, types_of(scores)), scores)
    directional_check(g, ag.reference.run(grad(g, "loss"), {}, params, dtype="float64"), params)


# -- the loss as PyTorch code spells it --------------------------------------------------------------------

LOSS_SPELLINGS = {
    "flattened (N, C), smoothed, padding ignored":
        (lambda F, x, y: F.cross_entropy(x.reshape(-1, 7), y.reshape(-1), label_smoothing=0.1, ignore_index=0)),
    "classes on axis 1 (B, C, T)": (lambda F, x, y: F.cross_entropy(x.permute(0, 2, 1), y)),
    "sum": (lambda F, x, y: F.cross_entropy(x.reshape(-1, 7), y.reshape(-1), reduction="sum")),
    "none, then a weighted sum": (lambda F, x, y: (F.cross_entropy(x.reshape(-1, 7), y.reshape(-1), reduction="none")
                                                   * 0.5).sum()),
    "nll_loss of log_softmax": (lambda F, x, y: F.nll_loss(F.log_softmax(x, -1).reshape(-1, 7), y.reshape(-1),
                                                           ignore_index=0)),
}


@pytest.mark.parametrize("spelling", LOSS_SPELLINGS)
def test_losses_and_their_gradients_match_torch(spelling):
    torch = pytest.importorskip("torch")
    loss_fn = LOSS_SPELLINGS[spelling]

    class Loss(nn.Module):
        def forward(self, logits, labels):
            return {"loss": loss_fn(F, logits, labels)}
    g = ag.trace(Loss(), {"logits": nn.InputSpec(("b", "t", 7)), "labels": nn.InputSpec(("b", "t"), "int64")})
    rng = np.random.default_rng(5)
    logits, labels = rng.standard_normal((3, 4, 7)), rng.integers(0, 7, (3, 4))
    labels[0, :2] = 0
    got = ag.reference.run(grad(g, "loss", inputs=["logits"]), {"logits": logits, "labels": labels}, {},
                           dtype="float64")
    x = torch.from_numpy(logits).requires_grad_()
    want = loss_fn(torch.nn.functional, x, torch.from_numpy(labels))
    want.backward()
    assert float(got["loss"]) == pytest.approx(want.item(), rel=1e-12)
    np.testing.assert_allclose(got["grad:logits"], x.grad.numpy(), rtol=1e-10, atol=1e-14)


# -- models: the spellings of real training code ----------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # torch's, on its float causal mask
@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")  # torch's, for pre-LN
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_translator_gradients_match_torch_autograd(norm_first):
    torch = pytest.importorskip("torch")
    model, theirs = Translator(2, norm_first), TorchTranslator(torch, 2, norm_first)
    g = ag.trace(model)
    params = as_ours(theirs.state(), model)
    data = batch(np.random.default_rng(0))
    loss = theirs.loss(**data)
    loss.backward()
    want = as_ours(theirs.state(grads=True), model, exact=True)
    dg = grad(g, "loss")
    got = ag.reference.run(dg, data, params, dtype="float64")
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-12)
    assert set(want) == {k[len(GRAD_PREFIX):] for k in got if k.startswith(GRAD_PREFIX)}
    scale = max(float(np.abs(w).max()) for w in want.values())  # the key bias's gradient is 0 (softmax shift)
    for name, w in want.items():
        np.testing.assert_allclose(got[GRAD_PREFIX + name], w, rtol=1e-9, atol=1e-12 * scale, err_msg=name)


def test_gradients_of_the_optimized_graph_are_the_same():
    """Differentiating after the fusions (fused attention, linear + bias, add + layer norm, the merged
    projections) gives the gradients of differentiating before them."""
    model = Translator()
    g = ag.trace(model)
    params = ag.init_params(g, seed=1, perturb=True)
    data = batch(np.random.default_rng(1))
    want = ag.reference.run(grad(g, "loss"), data, params, dtype="float64")
    fused, _ = ag.passes.optimize(g, level=3)
    assert fused.op_counts().get("fused_attention") == 3
    got = ag.reference.run(grad(fused, "loss"), data, params, dtype="float64")
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-10, atol=1e-13, err_msg=name)


def torch_gpt_loss(torch, p, tokens, targets, layers, heads):
    """The GPT of ``attngraph.models.gpt`` written in PyTorch over our parameters ``p`` (torch tensors in our
    layouts: linear weights (in, out)): the oracle of its gradients."""
    F = torch.nn.functional

    def linear(x, name):
        return x @ p[f"{name}.weight"] + p[f"{name}.bias"]

    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"])
    b, s = tokens.shape
    x = p["tok_embed.weight"][tokens] + p["pos_embed.weight"][:s]
    for i in range(layers):
        at = f"layers.{i}"
        h = norm(x, f"{at}.norm1")
        q, k, v = (linear(h, f"{at}.self_attn.{n}_proj").reshape(b, s, heads, -1).transpose(1, 2) for n in "qkv")
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1)
        x = x + linear(a, f"{at}.self_attn.out_proj")
        x = x + linear(F.gelu(linear(norm(x, f"{at}.norm2"), f"{at}.ffn.linear1"), approximate="tanh"),
                       f"{at}.ffn.linear2")
    logits = norm(x, "norm") @ p["tok_embed.weight"].T
    return F.nll_loss(F.log_softmax(logits, -1).reshape(-1, logits.shape[-1]), targets.reshape(-1))


def test_gpt_gradients_match_torch_autograd():
    """Decoder-only: tied embedding, learned positions, pre-LN, causal attention, GELU (tanh)."""
    torch = pytest.importorskip("torch")
    vocab, layers, heads = 13, 2, 2
    gpt = ag.models.gpt.GPT(vocab_size=vocab, d_model=16, num_heads=heads, d_ff=32, num_layers=layers, max_len=8)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = gpt

        def forward(self, tokens, targets):
            log_probs = self.gpt(tokens)["log_probs"]
            return {"loss": F.nll_loss(log_probs.reshape(-1, vocab), targets.reshape(-1))}

    ids = nn.InputSpec(("b", "s"), "int64", low=0, high=vocab)
    g = ag.trace(LM(), {"tokens": ids, "targets": ids})
    params = ag.init_params(g, seed=2, perturb=True)
    rng = np.random.default_rng(3)
    data = {"tokens": rng.integers(0, vocab, (2, 6)), "targets": rng.integers(0, vocab, (2, 6))}
    got = ag.reference.run(grad(g, "loss"), data, params, dtype="float64")
    p = {k.removeprefix("gpt."): torch.from_numpy(v.astype(np.float64)).requires_grad_() for k, v in params.items()}
    loss = torch_gpt_loss(torch, p, *(torch.from_numpy(data[k]) for k in ("tokens", "targets")), layers, heads)
    loss.backward()
    assert float(got["loss"]) == pytest.approx(loss.item(), rel=1e-12)
    for name, v in p.items():
        np.testing.assert_allclose(got[GRAD_PREFIX + "gpt." + name], v.grad.numpy(), rtol=1e-9, atol=1e-13,
                                   err_msg=name)


# -- compiled ----------------------------------------------------------------------------------------------

def test_compiled_gradients_match_the_interpreter():
    """The gradient graph builds like any other: float32 on llvm against the float64 interpreter (the training
    step's tests run it on vulkan and the CUDA emulator too)."""
    g = ag.trace(Translator())
    params = ag.init_params(g, seed=1, perturb=True)
    data = batch(np.random.default_rng(2))
    dg = grad(g, "loss")
    want = ag.reference.run(dg, data, params, dtype="float64")
    got = ag.compile(dg, params, target="llvm")(data)
    scale = max(float(np.abs(w).max()) for w in want.values())
    for name, w in want.items():
        np.testing.assert_allclose(got[name], w, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


# -- errors ------------------------------------------------------------------------------------------------

def test_errors_name_what_is_wrong():
    g = ag.trace(Translator())
    with pytest.raises(AutodiffError, match="no output 'cost'"):
        grad(g, "cost")
    with pytest.raises(AutodiffError, match="no parameter or input 'encoder.w'"):
        grad(g, "loss", wrt=["encoder.w"])
    with pytest.raises(AutodiffError, match="only float values have gradients"):
        grad(g, "loss", inputs=["src"])

    class NotScalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return {"loss": self.lin(x)}
    with pytest.raises(AutodiffError, match="must be a float scalar"):
        grad(ag.trace(NotScalar(), {"x": nn.InputSpec((2, 4))}), "loss")


def test_a_parameter_off_the_loss_path_gets_zeros_and_a_warning():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 1), nn.Linear(4, 4)

        def forward(self, x):
            return {"loss": self.used(x).sum(), "features": self.unused(x)}
    g = ag.trace(Unused(), {"x": nn.InputSpec((3, 4))})
    with pytest.warns(RuntimeWarning) as record:
        dg = grad(g, "loss")
    assert sorted(str(w.message).split("'")[1] for w in record) == ["unused.bias", "unused.weight"]
    x = np.ones((3, 4), np.float32)
    out = ag.reference.run(dg, {"x": x}, ag.init_params(g), dtype="float64")
    assert not out["grad:unused.weight"].any() and out["grad:unused.weight"].shape == (4, 4)
    np.testing.assert_allclose(out["grad:used.bias"], [3.0])
    np.testing.assert_allclose(out["grad:used.weight"], np.full((4, 1), 3.0))


def test_the_gradient_of_an_input():
    """inputs= differentiates with respect to graph inputs too (saliency, adversarial examples); a mean over
    a symbolic length divides by the length bound at run time."""
    class Quadratic(nn.Module):
        def forward(self, x):
            return {"loss": (x * x).mean()}
    g = ag.trace(Quadratic(), {"x": nn.InputSpec(("n",))})
    dg = grad(g, "loss", inputs=["x"])
    for x in (np.array([1.0, -2.0, 3.0]), np.arange(5.0)):
        out = ag.reference.run(dg, {"x": x}, {}, dtype="float64")
        np.testing.assert_allclose(out["grad:x"], 2 * x / len(x))
