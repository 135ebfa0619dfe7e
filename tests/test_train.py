"""Training steps (``attngraph.train``): Adam under the paper's schedule, SGD with momentum and gradient
clipping against ``torch.optim`` with the same weights and batches, in the float64 interpreter (rtol 1e-9)
and compiled in float32 (rtol 1e-4 of each parameter's scale); saving and resuming; errors.
"""

from __future__ import annotations

import numpy as np
import pytest

import attngraph as ag
from attngraph import nn, train
from attngraph.nn import functional as F
from attngraph.passes.autodiff import AutodiffError

from tiny_models import D_MODEL, TorchTranslator, Translator, as_ours, batch

pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")  # torch's float mask


def torch_run(torch, theirs, make_optimizer, schedule, batches, clip=None):
    """``len(batches)`` steps of PyTorch training: the step's rate from ``schedule`` (LambdaLR, base rate 1).
    Returns the losses and the gradients' global norms (before clipping)."""
    params = [p for _, p in theirs.named()]
    opt = make_optimizer(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: schedule(epoch + 1))
    losses, norms = [], []
    for data in batches:
        opt.zero_grad()
        loss = theirs.loss(**data)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, float("inf") if clip is None else clip)))
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses, norms


def batches(n, seed=0):
    rng = np.random.default_rng(seed)
    return [batch(rng) for _ in range(n)]


#: the key projections' biases have a gradient of exactly 0 (a softmax does not see a shift shared by all its
#: keys): what Adam sees there is rounding noise, normalized into steps that differ from run to run.  They
#: are compared apart: they must stay where they started, to the noise's small steps.
KEY_BIAS = "k_proj.bias"


def compare_params(got, want, rtol, start=None, noise=1e-6):
    for name, w in want.items():
        if name.endswith(KEY_BIAS):
            if start is not None:
                np.testing.assert_allclose(got[name], start[name], rtol=0, atol=noise, err_msg=name)
            continue
        scale = float(np.abs(w).max())
        np.testing.assert_allclose(got[name], w, rtol=rtol, atol=rtol * scale, err_msg=name)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def test_adam_with_the_papers_schedule_matches_torch(torch):
    """Ten steps of Adam (betas 0.9, 0.98, eps 1e-9) under lrate = d^-0.5 min(step^-0.5, step warmup^-1.5) on
    the tiny translator (label smoothing, padding ignored, tied output projection)."""
    schedule = train.Noam(D_MODEL, warmup=4)
    model, theirs = Translator(), TorchTranslator(torch)
    params = as_ours(theirs.state(), model)
    data = batches(10)
    want_losses, want_norms = torch_run(torch, theirs, lambda p: torch.optim.Adam(p, lr=1.0, betas=(0.9, 0.98),
                                                                                 eps=1e-9), schedule, data)
    step = train.TrainStep(ag.trace(model), params, train.Adam(lr=schedule), target="numpy", dtype="float64")
    losses, norms = zip(*[(step(b), step.grad_norm) for b in data])
    np.testing.assert_allclose(losses, want_losses, rtol=1e-10)
    np.testing.assert_allclose(norms, want_norms, rtol=1e-9)
    compare_params(step.params(), as_ours(theirs.state(), model, exact=True), rtol=1e-9, start=params)
    state = step.optimizer_state()
    assert int(state["step"]) == 10 and set(state) == {"step"} | {f"adam.{s}:{n}" for n in params for s in "mv"}


def test_sgd_momentum_weight_decay_and_clipping_match_torch(torch):
    model, theirs = Translator(), TorchTranslator(torch)
    params = as_ours(theirs.state(), model)
    data = batches(4, seed=1)
    want_losses, want_norms = torch_run(torch, theirs, lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9, nesterov=True,
                                                                                 weight_decay=1e-2),
                                        train.Constant(0.05), data, clip=0.5)
    opt = train.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2, clip_norm=0.5)
    step = train.TrainStep(ag.trace(model), params, opt, target="numpy", dtype="float64")
    losses, norms = zip(*[(step(b), step.grad_norm) for b in data])
    np.testing.assert_allclose(losses, want_losses, rtol=1e-10)
    np.testing.assert_allclose(norms, want_norms, rtol=1e-9)  # before clipping, as clip_grad_norm_ returns it
    compare_params(step.params(), as_ours(theirs.state(), model, exact=True), rtol=1e-9, start=params)


def test_adamw_matches_torch(torch):
    model, theirs = Translator(), TorchTranslator(torch)
    params = as_ours(theirs.state(), model)
    data = batches(3, seed=2)
    torch_run(torch, theirs, lambda p: torch.optim.AdamW(p, lr=1.0, weight_decay=0.1), train.Constant(1e-2), data)
    step = train.TrainStep(ag.trace(model), params, train.AdamW(lr=1e-2, weight_decay=0.1), target="numpy", dtype="float64")
    for b in data:
        step(b)
    compare_params(step.params(), as_ours(theirs.state(), model, exact=True), rtol=1e-9)


@pytest.mark.parametrize("target", ["llvm", "vulkan", "emulator"])
def test_compiled_steps_match_the_interpreter(target):
    """Five Adam steps of the translator in training mode (dropout 0.1) in float32 on each target that runs
    here against the float64 interpreter: the same elements dropped, step by step."""
    from attngraph.backends.tvm.targets import target_status
    device = None
    if target == "emulator":
        import shutil
        if not shutil.which("g++"):
            pytest.skip("the CUDA source emulator needs g++")
        target, device = "cuda", "emulator"
    elif target_status(target)["run"]:
        pytest.skip(f"{target} does not run here: {target_status(target)['run']}")
    model = Translator()
    g = ag.trace(model.train())
    params = ag.init_params(g, seed=1, perturb=True)
    opt = train.Adam(lr=train.Noam(D_MODEL, warmup=4), clip_norm=1.0)
    oracle = train.TrainStep(g, params, opt, target="numpy", dtype="float64", seed=3)
    step = train.TrainStep(g, params, opt, target=target, device=device, seed=3)
    data = batches(5, seed=3)
    without_dropout = train.TrainStep(ag.trace(model.eval()), params, opt, target="numpy", dtype="float64")(data[0])
    for i, b in enumerate(data):
        loss = step(b)
        assert loss == pytest.approx(oracle(b), rel=1e-4)
        if i == 0:
            assert abs(loss - without_dropout) > 1e-3
    # the key biases: Adam's normalized noise moves them at most the rate a step
    compare_params(step.params(), oracle.params(), rtol=1e-4, start=params,
                   noise=1.01 * sum(opt.schedule(t) for t in range(1, 6)))


def test_resuming_from_saved_state_continues_the_run(tmp_path):
    g = ag.trace(Translator())
    params = ag.init_params(g, seed=4)
    opt = train.Adam(lr=train.Noam(D_MODEL, warmup=4))
    data = batches(5, seed=4)
    straight = train.TrainStep(g, params, opt, target="numpy", dtype="float64")
    for b in data:
        straight(b)
    first = train.TrainStep(g, params, opt, target="numpy", dtype="float64")
    for b in data[:3]:
        first(b)
    first.save(str(tmp_path / "params.safetensors"))
    first.save_state(str(tmp_path / "adam.safetensors"))
    resumed = train.TrainStep(g, params, opt, target="numpy", dtype="float64")
    resumed.load_state(ag.load_weights(str(tmp_path / "params.safetensors")), str(tmp_path / "adam.safetensors"))
    assert resumed.step == 3
    for b in data[3:]:
        resumed(b)
    compare_params(resumed.params(), straight.params(), rtol=1e-12)


def test_a_compiled_model_learns():
    """A decoder learns to count (each token the one after the last, modulo the vocabulary): llvm, float32."""
    vocab = 8
    gpt = ag.models.gpt.GPT(vocab_size=vocab, d_model=32, num_heads=2, d_ff=64, num_layers=1, max_len=16)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = gpt

        def forward(self, tokens, targets):
            return {"loss": F.nll_loss(self.gpt(tokens)["log_probs"].reshape(-1, vocab), targets.reshape(-1))}
    ids = nn.InputSpec(("b", "s"), "int64", low=0, high=vocab)
    g = ag.trace(LM(), {"tokens": ids, "targets": ids})
    step = train.TrainStep(g, ag.init_params(g, seed=0), train.Adam(lr=1e-2), target="llvm")
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(40):
        seq = (rng.integers(0, vocab, (8, 1)) + np.arange(11)) % vocab
        losses.append(step({"tokens": seq[:, :-1], "targets": seq[:, 1:]}))
    assert losses[0] > 1.5 and np.mean(losses[-5:]) < 0.05, losses


def test_schedules():
    noam = train.Noam(512, warmup=4000)
    assert noam(4000) == pytest.approx(512 ** -0.5 * 4000 ** -0.5)
    assert noam(1) < noam(2000) < noam(4000) > noam(8000)
    cos = train.WarmupCosine(peak=1.0, warmup=10, total=110)
    assert cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(1.0) and cos(110) == pytest.approx(0.0)
    assert train.Adam(lr=0.1).schedule(7) == 0.1
    from attngraph.train.trainer import RunConfig, learning_rate
    paper = learning_rate(RunConfig("transformer-small", warmup=400), 256)
    assert paper(400) == pytest.approx(256 ** -0.5 * 400 ** -0.5) and paper(100) == pytest.approx(paper(400) / 4)
    scaled = learning_rate(RunConfig("transformer-small", warmup=400, lr=1e-3), 256)
    assert scaled(400) == pytest.approx(1e-3) and scaled(1600) == pytest.approx(5e-4)  # the peak, then 1/sqrt(step)
    cosine = learning_rate(RunConfig("transformer-small", warmup=400, lr=1e-3, schedule="cosine", steps=2400), 256)
    assert cosine(400) == pytest.approx(1e-3) and cosine(1400) == pytest.approx(5e-4) and cosine(2400) == 0


def test_errors_name_what_is_wrong():
    g = ag.trace(Translator())
    params = ag.init_params(g)
    with pytest.raises(ValueError, match="betas must be in"):
        train.Adam(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="learning rate"):
        train.SGD(lr=-1)
    with pytest.raises(ValueError, match="clip_norm"):
        train.SGD(clip_norm=0)
    step = train.TrainStep(g, params, train.SGD(lr=0.1), target="numpy", dtype="float64")
    with pytest.raises(KeyError, match="the batch has labels"):
        step({**batches(1)[0], "labels": np.zeros(3)})
    with pytest.raises(KeyError, match="the batch lacks tgt_out"):
        step({k: v for k, v in batches(1)[0].items() if k != "tgt_out"})
    with pytest.raises(ag.WeightsError, match="missing tensor"):
        train.TrainStep(g, {}, train.SGD(lr=0.1), target="numpy", dtype="float64")

    class NoParams(nn.Module):
        def forward(self, x):
            return {"loss": (x * x).sum()}
    with pytest.raises(AutodiffError, match="no parameters to train"):
        train.training_graph(ag.trace(NoParams(), {"x": nn.InputSpec((3,))}), train.SGD())


def test_the_step_graph_is_an_ordinary_graph():
    """Parameters, slots and step scalars are inputs; the new values are outputs of the same names; the
    forward is fused before it is differentiated (at level 0: not)."""
    g = ag.trace(Translator())
    tg = train.training_graph(g, train.Adam())
    assert tg.op_counts()["fused_attention"] == 3
    assert "fused_attention" not in train.training_graph(g, train.Adam(), level=0).op_counts()
    names = set(g.params)
    inputs = set(tg.input_types())
    assert names <= inputs and {f"adam.m:{n}" for n in names} <= inputs and {"adam.step_size", "adam.bias2_sqrt"} <= inputs
    assert [n for n, _ in tg.outputs] == ["loss", "grad_norm"] + [x for n in g.params for x in (n, f"adam.m:{n}", f"adam.v:{n}")]
    assert not tg.params


def test_the_attention_backward_holds_no_score_matrix():
    """The step of the fused model differentiates each attention as FlashAttention does: the row statistics
    and the two gradient kernels, no (batch, heads, q_len, k_len) value anywhere in the graph (the level-0
    step, through the plain ops, has them).  The masks' (t, t) and (b, 1, 1, s) are not scores."""
    g = ag.trace(Translator())

    def score_shaped(tg):
        return [n for n in tg.nodes() if n.type.is_float and n.type.rank == 4 and n.type.shape[1] != 1
                and all(isinstance(d, str) for d in n.type.shape[2:])]
    tg = train.training_graph(g, train.Adam())
    counts = tg.op_counts()
    assert counts["attention_lse"] == counts["attention_grad_q"] == counts["attention_grad_kv"] == 3
    assert not score_shaped(tg), [str(n.type) for n in score_shaped(tg)]
    assert score_shaped(train.training_graph(g, train.Adam(), level=0))


def test_the_training_example_learns_to_reverse():
    """The README's example (examples/train_reverse.py), as a user runs it: most reversed tokens right."""
    import os
    import re
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "train_reverse.py")
    run = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    accuracy = float(re.search(r"([0-9.]+)% of the reversed tokens", run.stdout).group(1))
    assert accuracy > 90, run.stdout


# -- dropout -----------------------------------------------------------------------------------------------

def test_dropout_drops_a_fraction_p_and_keeps_the_mean():
    class Drop(nn.Module):
        def forward(self, x):
            return {"a": F.dropout(x, 0.1), "b": F.dropout(x, 0.1), "c": F.dropout(x, 0.5)}
    g = ag.trace(Drop(), {"x": nn.InputSpec(("n", 1000))})
    x = np.ones((200, 1000))
    out = ag.reference.run(g, {"x": x, "dropout_seed": np.array(7)}, {}, dtype="float64")
    for name, p in (("a", 0.1), ("b", 0.1), ("c", 0.5)):
        kept = out[name] != 0
        assert abs(1 - kept.mean() - p) < 4 * (p * (1 - p) / x.size) ** 0.5, name  # within 4 standard errors
        np.testing.assert_allclose(out[name][kept], 1 / (1 - p))
    assert (out["a"] != out["b"]).mean() > 0.1  # two sites, two masks
    again = ag.reference.run(g, {"x": x, "dropout_seed": np.array(8)}, {}, dtype="float64")
    assert (again["a"] != out["a"]).mean() > 0.1  # another step, another mask
    # neighbours are independent: as often both dropped as chance says
    both = ((out["c"][:, 1:] == 0) & (out["c"][:, :-1] == 0)).mean()
    assert abs(both - 0.25) < 0.01


def test_dropout_is_only_in_training_graphs():
    model = Translator()
    assert "dropout" not in ag.trace(model).op_counts()  # a module starts in eval mode
    g = ag.trace(model.train())
    assert g.op_counts()["dropout"] == 7 and "dropout_seed" in g.input_types()  # 3 per encoder layer, 4 per decoder
    assert "dropout" not in ag.trace(model.eval()).op_counts()


def test_a_resumed_run_drops_what_the_straight_run_drops(tmp_path):
    model = Translator()
    g = ag.trace(model.train())
    params = ag.init_params(g, seed=4)
    opt = train.SGD(lr=0.1)
    data = batches(4, seed=7)
    straight = train.TrainStep(g, params, opt, target="numpy", dtype="float64", seed=11)
    losses = [straight(b) for b in data]
    first = train.TrainStep(g, params, opt, target="numpy", dtype="float64", seed=11)
    for b in data[:2]:
        first(b)
    resumed = train.TrainStep(g, params, opt, target="numpy", dtype="float64", seed=11)
    resumed.load_state(first.params(), first.optimizer_state())
    assert [resumed(b) for b in data[2:]] == pytest.approx(losses[2:], rel=1e-12)


def _token_loss_reference(log_probs, labels, smoothing, pad):
    """PyTorch's label-smoothed cross-entropy of log-probabilities, mean over the labels that are not ``pad``."""
    lp = log_probs.reshape(-1, log_probs.shape[-1])
    t = labels.reshape(-1)
    per = (1 - smoothing) * -lp[np.arange(t.size), t] + smoothing * -lp.mean(axis=-1)
    keep = t != pad if pad is not None else np.ones_like(t, bool)
    return per[keep].sum() / keep.sum()


@pytest.mark.parametrize("name", ["transformer-tiny", "gpt-tiny"])
def test_token_loss_is_the_papers_loss_on_the_models_own_parameters(name):
    model = ag.models.get(name)
    loss = train.TokenLoss(model, label_smoothing=0.1)
    assert dict(loss.named_parameters()).keys() == dict(model.named_parameters()).keys()
    g, m = ag.trace(loss), ag.trace(model)
    assert set(g.input_types()) == set(m.input_types()) | {"labels"}
    params = ag.init_params(m, 0, perturb=True)
    x = ag.inputs.random_inputs(g.input_types(), g.meta["dims"], 3, {g.node(i).name: g.node(i).meta for i in g.inputs})
    pad = getattr(model, "pad_id", None)
    if pad is not None:
        x["labels"][0, -3:] = pad  # padded positions do not count
    got = ag.reference.run(g, x, params, dtype="float64")["loss"]
    log_probs = ag.reference.run(m, {k: v for k, v in x.items() if k != "labels"}, params, dtype="float64")["log_probs"]
    np.testing.assert_allclose(got, _token_loss_reference(log_probs, x["labels"], 0.1, pad), rtol=1e-12)
    with pytest.raises(train.objective.NotATokenModel, match="no log_probs output"):
        train.TokenLoss(ag.models.get("encoder-tiny"))


def test_a_zoo_transformer_trains_with_dropout_and_its_weights_load_into_the_model():
    """The paper's model, dropout 0.1 in training: a compiled step (llvm) against the float64 interpreter's,
    then the trained parameters run the inference graph (no dropout) as they are."""
    model = ag.models.get("transformer-tiny")
    g = ag.trace(train.TokenLoss(model).train())
    # the two embeddings; per encoder layer attention, FFN inside, FFN out; per decoder layer one more (cross)
    assert g.op_counts()["dropout"] == 2 + 2 * 3 + 2 * 4
    params = ag.init_params(ag.trace(model), 0)
    rng = np.random.default_rng(0)
    tgt = rng.integers(1, 64, (2, 7))
    data = {"src": rng.integers(1, 64, (2, 9)), "tgt": tgt[:, :-1], "labels": tgt[:, 1:]}
    data["src"][1, -2:] = 0
    steps = {t: train.TrainStep(g, params, train.Adam(lr=train.Noam(32, warmup=10)), target=t, seed=5,
                                dtype="float64" if t == "numpy" else None)
             for t in ("numpy", "llvm")}
    for _ in range(3):
        ours, ref = steps["llvm"](data), steps["numpy"](data)
        assert abs(ours - ref) <= 1e-4 * abs(ref)
    trained = steps["llvm"].params()
    model.eval()  # as in PyTorch: the loss's train() set its (the model's) layers training
    out = ag.compile(ag.trace(model), trained, target="llvm")({"src": data["src"], "tgt": data["tgt"]})
    want = ag.reference.run(ag.trace(model), {"src": data["src"], "tgt": data["tgt"]}, trained, dtype="float64")
    np.testing.assert_allclose(out["log_probs"], want["log_probs"], rtol=1e-4, atol=1e-4)


def test_bfloat16_mixed_precision_steps_match_their_interpreter_run():
    """Mixed precision (``dtype="bfloat16"``): the parameters, the gradients that update them and the optimizer's
    state in float32, the forward and the backward in bfloat16.  Compiled steps against the interpreter's run of the
    same mixed graph (which rounds where the build stores) and against the float64 steps (bfloat16's precision)."""
    model = Translator()
    g = ag.trace(model)
    params = ag.init_params(g, seed=1, perturb=True)
    opt = train.SGD(lr=0.1, momentum=0.9)  # the first step's update: the gradient itself, times the rate
    step, oracle, exact = (train.TrainStep(g, params, opt, target=target, dtype=dtype)
                           for target, dtype in (("llvm", "bfloat16"), ("numpy", "bfloat16"), ("numpy", "float64")))
    types = step.graph.input_types()
    assert {types[k].dtype for k in step.state} == {"float32"}, "master weights and momentum in float32"
    assert {n.type.dtype for n in step.graph.nodes() if n.op in ("linear", "matmul", "weight_grad")} == {"bfloat16"}
    data = batches(3, seed=5)
    loss, want, far = step(data[0]), oracle(data[0]), exact(data[0])
    assert loss == want and want == pytest.approx(far, rel=1e-2)
    for name, new in exact.params().items():
        if name.endswith(KEY_BIAS):  # a gradient of exactly 0 in exact arithmetic
            continue
        update = new - params[name]
        scale = float(np.abs(update).max())
        # the same roundings as the interpreter (float32 sums in another order); bfloat16's error against float64
        np.testing.assert_allclose(step.params()[name] - params[name], oracle.params()[name] - params[name],
                                   rtol=0, atol=1e-3 * scale, err_msg=name)
        np.testing.assert_allclose(step.params()[name] - params[name], update, rtol=0, atol=5e-2 * scale,
                                   err_msg=name)
    for b in data[1:]:
        # the loss is a mean stored in bfloat16 (8 bits: a relative 2^-9 a rounding), of a sum rounded too
        loss, want, far = step(b), oracle(b), exact(b)
        assert loss == pytest.approx(want, rel=2e-2) and loss == pytest.approx(far, rel=3e-2)
