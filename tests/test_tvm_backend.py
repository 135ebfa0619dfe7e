"""The TVM backend (llvm): compiled graphs against the float64 interpreter, one build for any
sequence length, at -O0 (primitive ops) and -O3 (fused ops)."""

import numpy as np
import pytest
from conftest import TOLERANCE, example

import attngraph as ag
from attngraph import nn, passes
from attngraph.backends.tvm import BuildError, compile_graph
from attngraph.inputs import InputError
from attngraph.ir.ops import IndexOutOfRange
from attngraph.nn import functional as F

RTOL, ATOL = TOLERANCE["float32"]


def check(model, x, params):
    want = ag.reference.run(model.graph, x, params, dtype="float64")
    got = model(x)
    for name, w in want.items():
        assert got[name].shape == w.shape
        np.testing.assert_allclose(got[name], w, rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.fixture(scope="module", params=[0, 3], ids=["O0", "O3"])
def tiny_compiled(request):
    g, _ = passes.optimize(ag.models.load_graph("transformer-tiny"), request.param)
    params = ag.init_params(g, 0, perturb=True)
    return compile_graph(g, params), params


@pytest.mark.parametrize("dims", [{}, {"batch": 1, "src_len": 1, "tgt_len": 1}, {"batch": 3, "src_len": 23, "tgt_len": 5}])
def test_transformer_tiny_any_length_one_build(tiny_compiled, dims):
    model, params = tiny_compiled
    check(model, example(model.graph, seed=1, **dims), params)


def test_projections_have_a_few_rows_form_used_at_one_token(tiny_compiled):
    model, params = tiny_compiled
    assert model.few_rows  # the packed projections (llvm) carry a short tile form for decode-sized inputs
    x = example(model.graph, seed=2, batch=1, src_len=1, tgt_len=1)
    kernels = model.kernels_at(batch=1, src_len=1, tgt_len=1)
    # one row: the one-row form where this CPU's tiles have one (AVX-512), else the few-rows form
    assert any(name.endswith("__one" if model.one_row else "__few") for name in kernels.values())
    check(model, x, params)
    kernels = model.kernels_at(batch=3, src_len=1, tgt_len=1)
    assert any(name.endswith("__few") for name in kernels.values())
    assert not any(name.endswith("__one") for name in kernels.values())
    check(model, example(model.graph, seed=3, batch=3, src_len=1, tgt_len=1), params)


def test_o3_build_has_fewer_kernels():
    g = ag.models.load_graph("encoder-tiny")
    o3, _ = passes.optimize(g, 3)
    assert compile_graph(o3, ag.init_params(o3, 0)).kernel_count < compile_graph(g, ag.init_params(g, 0)).kernel_count


class EveryOp(nn.Module):
    """The ops the zoo models do not reach at -O0 or -O3."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter((8, 8))

    def forward(self, x, cache, pos):
        a = F.gelu(x) + F.gelu(x, "tanh") - F.tanh(x) / (F.exp(-x) + 1.0)
        b = F.sqrt(x * x + 1.0) * F.rsqrt(x * x + 2.0) + F.erf(x) + (x * x + 1.0).log()
        c = (a.sum(-1, keepdims=True) + b.mean(-1, keepdims=True)) + x.max(-1, keepdims=True)
        d = F.where((x > 0.0) & (x < 1.0), -x, c) + F.cast(x > 0.0, "float32")
        e = F.concat([d[:, :, :3], (d @ self.w)[:, :, 3:]], axis=2)
        cache = F.update_slice(cache, e[:, :1, :], pos, axis=1)
        return {"e": e, "sm": F.softmax(e.transpose(1, 2), axis=-1), "cache": cache}


def test_remaining_ops_match_the_interpreter():
    g = ag.trace(EveryOp(), {"x": nn.InputSpec(("b", "s", 8)), "cache": nn.InputSpec(("b", 10, 8)),
                             "pos": nn.InputSpec((), "int64")})
    params = ag.init_params(g, 0)
    model = compile_graph(g, params)
    rng = np.random.default_rng(0)
    for s in (1, 4):
        x = {"x": rng.standard_normal((2, s, 8)).astype(np.float32), "cache": np.zeros((2, 10, 8), np.float32),
             "pos": np.array(3)}
        check(model, x, params)


def test_token_out_of_vocabulary_is_a_clear_error(tiny_compiled):
    model, _ = tiny_compiled
    x = example(model.graph)
    x["tgt"][1, 2] = 1000
    with pytest.raises(IndexOutOfRange, match="index 1000 is out of range for a table of 64 rows"):
        model(x)


def test_wrong_input_shape_is_a_clear_error(tiny_compiled):
    model, _ = tiny_compiled
    x = example(model.graph)
    x["tgt"] = x["tgt"][:1]
    with pytest.raises(InputError, match="batch = 2"):
        model(x)


def test_unknown_target():
    g = ag.models.load_graph("encoder-tiny")
    with pytest.raises(BuildError, match="unknown or not yet supported target 'metal'"):
        compile_graph(g, ag.init_params(g, 0), target="metal")


def test_transformer_base_verifies_at_o3():
    """The README's main job: the paper's base model compiled at -O3 matches the float64 interpreter."""
    from click.testing import CliRunner

    from attngraph.cli import main
    r = CliRunner().invoke(main, ["verify", "transformer-base", "-O3", "--dim", "src_len=9", "--dim", "tgt_len=5"])
    assert r.exit_code == 0, r.output
    assert "38 distinct kernels" in r.output and "log_probs: max abs error" in r.output and ": PASS" in r.output


@pytest.mark.slow
@pytest.mark.parametrize("level", [0, 3], ids=["O0", "O3"])
@pytest.mark.parametrize("name", ag.models.names())
def test_every_zoo_model_verifies(name, level):
    """attngraph verify for the whole zoo: every output within the float32 tolerance of the float64
    interpreter (full-size models: minutes in all)."""
    from attngraph import api
    from attngraph.ir import dims as D
    names = set().union(*(D.symbols(d) for t in ag.models.load_graph(name).input_types().values()
                          for d in t.shape if isinstance(d, str)))
    sizes = {k: v for k, v in {"src_len": 9, "tgt_len": 5, "seq": 9}.items() if k in names}  # others: an error
    report = api.verify(name, opt_level=level, dims=sizes)
    assert report.ok, report.format()


def test_float16_weights_halve_the_panels_and_verify_against_the_same_rounding(recwarn):
    g = ag.models.load_graph("transformer-tiny")
    params = ag.init_params(g, 0, perturb=True)
    model = ag.compile(g, params, weight_dtype="float16")
    panels = [n for n in model.graph.nodes() if n.op == "pack_panels"]
    assert panels and all(n.type.dtype == "float16" for n in panels)
    assert not [w for w in recwarn if "generic kernel" in str(w.message)]  # the hand kernels read float16
    x = example(g, seed=3, batch=2, src_len=9, tgt_len=4)
    check(model, x, params)  # against the interpreter of the same graph: float32 tolerance
    full = ag.reference.run(g, x, params, dtype="float64")["log_probs"]
    assert 1e-6 < np.abs(model(x)["log_probs"] - full).max() < 1e-2  # float16's rounding of the weights, no more
    with pytest.raises(BuildError, match="llvm target only"):
        ag.compile(g, params, target="vulkan", weight_dtype="float16")
    with pytest.raises(BuildError, match="not one of float32, float16"):
        ag.compile(g, params, weight_dtype="bfloat16")


# -- architectures off the powers of two ---------------------------------------------------------

class Stack(nn.Module):
    """An encoder or decoder stack of the shape ``cfg`` says, with or without a padding mask."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        stack = nn.Encoder if cfg["kind"] == "encoder" else nn.Decoder
        self.body = stack(cfg["layers"], cfg["heads"] * cfg["head_dim"], cfg["heads"], cfg["ff"],
                          activation=cfg["act"], norm_first=cfg["pre"])

    def input_specs(self):
        d = self.cfg["heads"] * self.cfg["head_dim"]
        specs = {"x": nn.InputSpec(("batch", "seq", d))}
        if self.cfg["kind"] == "decoder":
            specs["memory"] = nn.InputSpec(("batch", "mem", d))
        if self.cfg["pad"]:
            padded = "mem" if self.cfg["kind"] == "decoder" else "seq"
            specs["pad"] = nn.InputSpec(("batch", padded), "bool", kind="padding_mask")
        return specs

    def forward(self, x, memory=None, pad=None):
        if self.cfg["kind"] == "encoder":
            return self.body(x, src_key_padding_mask=pad)
        return self.body(x, memory, memory_key_padding_mask=pad, tgt_is_causal=True)


ODD_SHAPES = [
    dict(kind="encoder", heads=3, head_dim=12, ff=100, layers=2, act="gelu", pre=False, pad=True, level=3),
    dict(kind="decoder", heads=6, head_dim=20, ff=12, layers=1, act="gelu_tanh", pre=True, pad=True, level=3),
    dict(kind="encoder", heads=1, head_dim=160, ff=4, layers=1, act="relu", pre=True, pad=False, level=3),
    dict(kind="decoder", heads=8, head_dim=2, ff=256, layers=2, act="relu", pre=False, pad=False, level=2),
]


@pytest.mark.parametrize("cfg", ODD_SHAPES, ids=[f"{c['kind']}-{c['heads']}x{c['head_dim']}-ff{c['ff']}-O{c['level']}"
                                                 for c in ODD_SHAPES])
def test_architectures_off_the_powers_of_two_match_the_interpreter(cfg):
    """The zoo's widths are powers of two; a bug at other shapes (a tile remainder, a head dim the
    attention kernel does not vectorize, a head dim past its limit) would pass every other test.  A
    bug hunt over 135 random stacks like these, at 1 to 200 tokens (80 on llvm, 25 on vulkan/lavapipe,
    30 on llvm with float16 weights), found none; these four stay as the guard, each at two sizes
    through one build."""
    g = ag.trace(Stack(cfg))
    g.meta["dims"] = {"batch": 2, "seq": 7, "mem": 5}
    params = ag.init_params(g, 0, perturb=True)
    opt, _ = passes.optimize(g, cfg["level"])
    model = compile_graph(opt, params)
    for dims in ({}, {"batch": 3, "seq": 33, "mem": 17}):
        x = example(g, seed=1, **dims)
        want = ag.reference.run(g, x, params, dtype="float64")
        got = model(x)
        for name, w in want.items():
            np.testing.assert_allclose(got[name], w, rtol=RTOL, atol=ATOL, err_msg=f"{dims} {name}")


class RMSBlock(nn.Module):
    """A LLaMA-like block: bias-free projections, causal attention, RMSNorm after (or before) each residual."""

    def __init__(self, pre: bool):
        super().__init__()
        self.pre = pre
        self.attn = nn.MultiHeadAttention(16, 4, bias=False)
        self.ffn = nn.FeedForward(16, 32, "gelu")
        self.norm1, self.norm2 = nn.RMSNorm(16), nn.RMSNorm(16)

    def input_specs(self):
        return {"x": nn.InputSpec(("batch", "seq", 16))}

    def default_dims(self):
        return {"batch": 2, "seq": 11}

    def forward(self, x):
        if self.pre:
            h = self.norm1(x)
            x = x + self.attn(h, h, h, causal=True)
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.attn(x, x, x, causal=True))
        return self.norm2(x + self.ffn(x))


@pytest.mark.parametrize("target, device", [("llvm", None), ("vulkan", "lavapipe"), ("cuda:sm_90", "emulator")])
def test_rms_norm_fuses_with_its_residual_and_runs_on_every_target(target, device):
    from attngraph.backends.tvm.targets import target_status
    for pre in (False, True):
        g = ag.trace(RMSBlock(pre))
        opt, report = passes.optimize(g, 3, verify_each=True)
        counts = opt.op_counts()
        assert counts.get("add_rms_norm", 0) == (0 if pre else 2) and counts.get("rms_norm", 0) == (2 if pre else 0)
        assert bool(report.stat("residual-layer-norm").near_misses) == pre  # pre-norm: the sum is needed after
        if device == "lavapipe" and target_status("vulkan")["run"]:
            pytest.skip(f"no Vulkan device here: {target_status('vulkan')['run']}")
        result = ag.verify(g, params=ag.init_params(g, seed=2, perturb=True), target=target,
                           device="emulator" if device == "emulator" else None)
        assert result.ok, result.format()
