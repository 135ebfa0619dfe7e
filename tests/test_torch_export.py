"""The torch.export frontend: PyTorch modules as they are written, imported, fused, compiled and checked against
PyTorch itself (and the float64 interpreter)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from conftest import TOLERANCE
from torch import nn
from torch.export import Dim

import attngraph as ag
from attngraph.backends.tvm.targets import cuda, target_status
from attngraph.frontends.torch_export import ATEN, TorchImportError
from attngraph.passes import optimize

RTOL, ATOL = TOLERANCE["float32"]


class GPTBlock(nn.Module):
    """nanoGPT's block: one projection split in three, attention written by hand with a causal mask buffer."""

    def __init__(self, d=32, h=4, max_len=32):
        super().__init__()
        self.h = h
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len, dtype=torch.bool)))

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (t.view(b, s, self.h, d // self.h).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // self.h))
        att = att.masked_fill(~self.bias[:s, :s], float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).contiguous().view(b, s, d)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(TF.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class LlamaBlock(nn.Module):
    """A LLaMA layer: RMSNorm (written out, and torch's), rotary embeddings from buffers, grouped-query SDPA
    with ``is_causal``, a SwiGLU feed-forward, no biases."""

    def __init__(self, d=32, h=4, kv=2, ff=64, max_len=32):
        super().__init__()
        self.h, self.kv, self.hd = h, kv, d // h
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj, self.v_proj = nn.Linear(d, kv * self.hd, bias=False), nn.Linear(d, kv * self.hd, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.input_norm = nn.Parameter(1 + 0.1 * torch.randn(d))
        self.post_norm = nn.RMSNorm(d, eps=1e-5)
        self.gate, self.up, self.down = (nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False),
                                         nn.Linear(ff, d, bias=False))
        inv = 1.0 / 10000 ** (torch.arange(0, self.hd, 2).float() / self.hd)
        angles = torch.arange(max_len).float()[:, None] * inv[None]
        self.register_buffer("cos", torch.cat([angles, angles], -1).cos(), persistent=False)
        self.register_buffer("sin", torch.cat([angles, angles], -1).sin(), persistent=False)

    def rotate(self, x):
        s, half = x.shape[2], x.shape[-1] // 2
        return x * self.cos[:s] + torch.cat([-x[..., half:], x[..., :half]], -1) * self.sin[:s]

    def forward(self, x):
        b, s, _ = x.shape
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.input_norm
        q = self.q_proj(y).view(b, s, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(y).view(b, s, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(y).view(b, s, self.kv, self.hd).transpose(1, 2)
        a = TF.scaled_dot_product_attention(self.rotate(q), self.rotate(k), v, is_causal=True, enable_gqa=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(b, s, -1))
        y = self.post_norm(x)
        return x + self.down(TF.silu(self.gate(y)) * self.up(y))


def torch_encoder():
    """torch.nn.TransformerEncoder of two layers, with PyTorch's fused fast path off (the importer sees the
    plain ops: in_proj, the MHA head split, SDPA, post-LN)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


@pytest.fixture(autouse=True)
def no_fast_path():
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(before)


def imported(module, name="x", seq_max=31):
    torch.manual_seed(1)
    return ag.from_torch(module.eval(), (torch.randn(2, 8, 32),),
                         dynamic_shapes={name: {0: Dim("batch"), 1: Dim("seq", max=seq_max)}})


@dataclass
class Case:
    """A model as a user exports it (example inputs, dynamic shapes) and the inputs it is checked on."""
    module: nn.Module
    args: tuple
    kwargs: dict
    dynamic: dict
    inputs: dict  # graph input -> torch tensor (another batch and length than the example's)
    output: str  # the output compared
    attentions: int  # fused at -O3: every one


def block(make, arg="x"):
    torch.manual_seed(0)
    module = make()
    return Case(module, (torch.randn(2, 8, 32),), {}, {arg: {0: Dim("batch"), 1: Dim("seq", max=31)}},
                {arg: torch.randn(3, 11, 32)}, "output", {"src": 2}.get(arg, 1))


class Translator(nn.Module):
    """torch.nn.Transformer as its documentation uses it: a causal target mask, the sources' padding masks."""

    def __init__(self):
        super().__init__()
        self.transformer = nn.Transformer(32, 4, 2, 2, 64, dropout=0.1, batch_first=True)

    def forward(self, src, tgt, src_pad):
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.transformer(src, tgt, tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=src_pad,
                                memory_key_padding_mask=src_pad)


def translator():
    torch.manual_seed(0)
    batch, src, tgt = Dim("batch"), Dim("src_len", max=63), Dim("tgt_len", max=63)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = True
    return Case(Translator(), (torch.randn(2, 7, 32), torch.randn(2, 5, 32), torch.zeros(2, 7, dtype=torch.bool)), {},
                {"src": {0: batch, 1: src}, "tgt": {0: batch, 1: tgt}, "src_pad": {0: batch, 1: src}},
                {"src": torch.randn(3, 9, 32), "tgt": torch.randn(3, 6, 32), "src_pad": pad}, "output", 6)


def hugging_face(cls, config, output, attentions, **sizes):
    """A ``transformers`` class with a small config (random weights, nothing downloaded), called with a padding
    mask (one sequence padded)."""
    transformers = pytest.importorskip("transformers")  # in the test extra
    torch.manual_seed(0)
    module = getattr(transformers, cls)(getattr(transformers, config)(vocab_size=100, **sizes))
    seq = {0: Dim("batch"), 1: Dim("seq", max=63)}
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    case = Case(module, (torch.randint(1, 100, (2, 8)),), {"attention_mask": torch.ones(2, 8, dtype=torch.long)},
                {"input_ids": seq, "attention_mask": seq},
                {"input_ids": torch.randint(1, 100, (3, 10)), "attention_mask": mask}, output, attentions)
    if cls == "MarianMTModel":  # the paper's encoder-decoder: a target of its own length
        case.kwargs["decoder_input_ids"] = torch.randint(1, 100, (2, 6))
        case.dynamic = {"input_ids": seq, "attention_mask": seq, "decoder_input_ids": {0: Dim("batch"),
                                                                                       1: Dim("tgt", max=63)}}
        case.inputs["decoder_input_ids"] = torch.randint(1, 100, (3, 7))
    return case


LAYERS = dict(num_hidden_layers=2, intermediate_size=64, max_position_embeddings=64)
FAMILIES = {
    "torch-encoder": lambda: block(torch_encoder, "src"),
    "torch-transformer": translator,
    "nanogpt-block": lambda: block(GPTBlock),
    "llama-block": lambda: block(LlamaBlock),
    "hf-bert": lambda: hugging_face("BertModel", "BertConfig", "last_hidden_state", 2, hidden_size=32,
                                    num_attention_heads=4, **LAYERS),
    "hf-gpt2": lambda: hugging_face("GPT2LMHeadModel", "GPT2Config", "logits", 2, n_embd=32, n_head=4, n_layer=2,
                                    n_positions=64, use_cache=False),
    "hf-llama": lambda: hugging_face("LlamaForCausalLM", "LlamaConfig", "logits", 2, hidden_size=32,
                                     num_attention_heads=4, num_key_value_heads=2, use_cache=False, **LAYERS),
    "hf-marian": lambda: hugging_face("MarianMTModel", "MarianConfig", "logits", 6, d_model=32, encoder_layers=2,
                                      decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                                      encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                                      use_cache=False, pad_token_id=0, decoder_start_token_id=0),
}


def run_torch(case: Case, dtype=torch.float32) -> np.ndarray:
    module = case.module.to(dtype).eval()
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in case.inputs.items()}
    with torch.no_grad():
        out = module(**inputs)
    out = out if isinstance(out, torch.Tensor) else getattr(out, case.output)
    module.float()
    return out.numpy()


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_imported_model_matches_pytorch_on_the_interpreter_and_llvm_with_every_attention_fused(kind):
    case = FAMILIES[kind]()
    graph, params = ag.from_torch(case.module, case.args, dynamic_shapes=case.dynamic, example_kwargs=case.kwargs)
    names = dict(case.module.named_parameters(remove_duplicate=False))  # a tied weight under one of its names
    assert set(params) <= set(names) and len(params) == len({id(p) for p in names.values()})
    assert case.output in [name for name, _ in graph.outputs]  # a ModelOutput's names where it has them
    first = next(iter(case.dynamic))
    assert graph.input_types()[first].shape[:2] == tuple(d.__name__ for d in case.dynamic[first].values())
    inputs = {k: v.numpy() for k, v in case.inputs.items()}
    want = run_torch(case)
    np.testing.assert_allclose(ag.reference.run(graph, inputs, params)[case.output], want, rtol=RTOL, atol=ATOL)
    f64 = ag.reference.run(graph, {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in inputs.items()},
                           {k: v.astype(np.float64) for k, v in params.items()}, dtype="float64")[case.output]
    # exact but for LLaMA's rotary tables, which transformers computes in float32 whatever the model's type
    f64_tol = 1e-6 if kind == "hf-llama" else 1e-9
    np.testing.assert_allclose(f64, run_torch(case, torch.float64), rtol=f64_tol, atol=f64_tol / 10)
    counts = optimize(graph, 3)[0].op_counts()
    assert counts.get("fused_attention") == case.attentions and "softmax" not in counts
    assert "reduce_mean" not in counts  # every norm whole, LLaMA's RMSNorm written by hand too
    compiled = ag.compile(graph, params, target="llvm")
    np.testing.assert_allclose(compiled(inputs)[case.output], want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("target", ["vulkan", "cuda"])
@pytest.mark.parametrize("kind", ["torch-transformer", "llama-block", "hf-bert", "hf-gpt2", "hf-llama", "hf-marian"])
def test_imported_model_runs_on_vulkan_and_the_cuda_emulator(kind, target):
    if target == "vulkan" and target_status("vulkan")["run"] is not None:
        pytest.skip(f"no Vulkan device here: {target_status('vulkan')['run']}")
    if target == "cuda" and cuda.find_nvcc() is None:
        pytest.skip("nvcc is not installed")
    case = FAMILIES[kind]()
    graph, params = ag.from_torch(case.module, case.args, dynamic_shapes=case.dynamic, example_kwargs=case.kwargs)
    compiled = ag.compile(graph, params, target=target, **({"device": "emulator"} if target == "cuda" else {}))
    got = compiled({k: v.numpy() for k, v in case.inputs.items()})[case.output]
    np.testing.assert_allclose(got, run_torch(case), rtol=RTOL, atol=ATOL)


def test_nodes_keep_the_module_path_and_the_source_line_that_made_them():
    graph, _ = imported(GPTBlock())
    softmax = next(n for n in graph.nodes() if n.op == "softmax")
    assert not softmax.meta.get("scope")  # the top module's own code
    assert f"{__file__.rsplit('/', 1)[-1]}:" in softmax.meta["loc"] and "in forward" in softmax.meta["loc"]
    norm = next(n for n in graph.nodes() if n.op == "layer_norm")
    assert norm.meta["scope"] == "ln_1" and "aten.layer_norm" in norm.meta["loc"]
    encoder, _ = imported(torch_encoder(), "src")
    scopes = {n.meta.get("scope") for n in encoder.nodes() if n.op == "matmul"}
    assert {"layers.0.self_attn", "layers.1.linear2"} <= scopes


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 32)

    def forward(self, x):
        y = torch.cumsum(self.proj(x), dim=1)  # no attngraph op
        z = torch.flip(y, dims=[1])  # nor this
        return torch.cumsum(z, dim=1) + y.sort(dim=-1).values


def test_unsupported_ops_are_one_error_naming_each_op_its_module_and_line():
    with pytest.raises(TorchImportError) as e:
        imported(Unsupported())
    text = str(e.value)
    assert "3 op(s)" in text
    for op in ("aten.cumsum.default", "aten.flip.default", "aten.sort.default"):
        assert op in text
    assert "test_torch_export.py:" in text and "in forward" in text
    assert "Traceback" not in text


def test_a_refused_argument_names_the_op_the_module_and_the_line():
    class Dropping(nn.Module):
        def forward(self, q):
            return TF.scaled_dot_product_attention(q, q, q, dropout_p=0.1)  # dropout in attention: not supported
    with pytest.raises(TorchImportError, match=r"aten.scaled_dot_product_attention.*test_torch_export.py:\d+ in "
                                               r"forward.*dropout_p"):
        ag.from_torch(Dropping().eval(), (torch.randn(1, 2, 4, 8),))


def test_a_saved_program_imports_with_its_dims_named_after_their_inputs(tmp_path):
    module = GPTBlock().eval()
    program = torch.export.export(module, (torch.randn(2, 8, 32),),
                                  dynamic_shapes={"x": {0: Dim("batch"), 1: Dim("seq", max=31)}})
    torch.export.save(program, str(tmp_path / "gpt.pt2"))
    graph, params = ag.from_exported(torch.export.load(str(tmp_path / "gpt.pt2")))
    assert graph.input_types()["x"].shape == ("x_0", "x_1", 32)
    x = torch.randn(1, 3, 32)
    with torch.no_grad():
        want = module(x).numpy()
    np.testing.assert_allclose(ag.reference.run(graph, {"x": x.numpy()}, params)["output"], want,
                               rtol=RTOL, atol=ATOL)


def test_every_table_entry_names_an_aten_op_of_the_pinned_torch():
    import operator
    for name in ATEN:
        if name == "<built-in function getitem>":
            assert str(operator.getitem) == name
            continue
        namespace, op, overload = name.split(".")
        assert str(getattr(getattr(getattr(torch.ops, namespace), op), overload)) == name


def test_a_saved_program_builds_runs_and_verifies_from_the_command_line(tmp_path):
    from click.testing import CliRunner

    from attngraph.cli import main
    torch.manual_seed(0)
    program = torch.export.export(GPTBlock().eval(), (torch.randn(2, 8, 32),),
                                  dynamic_shapes={"x": {0: Dim("batch"), 1: Dim("seq", max=31)}})
    path = str(tmp_path / "gpt.pt2")
    torch.export.save(program, path)
    own = ag.models.get(path).default_params()  # the program's weights, not random ones
    assert np.array_equal(own["c_attn.weight"], program.state_dict["c_attn.weight"].detach().numpy())
    runner = CliRunner()
    shown = runner.invoke(main, ["show", path])
    assert shown.exit_code == 0 and "%x: f32[x_0, x_1, 32]" in shown.output and "# ln_1" in shown.output
    built = runner.invoke(main, ["build", path, "--target", "llvm", "-o", str(tmp_path / "out")])
    assert built.exit_code == 0, built.output
    verified = runner.invoke(main, ["verify", str(tmp_path / "out"), "--dim", "x_1=5"])
    assert verified.exit_code == 0 and "PASS" in verified.output, verified.output
    ran = runner.invoke(main, ["run", path, "--dim", "x_1=5"])
    assert ran.exit_code == 0 and "float32[2, 5, 32]" in ran.output, ran.output
    (tmp_path / "bad.pt2").write_text("not a program")
    bad = runner.invoke(main, ["show", str(tmp_path / "bad.pt2")])
    assert bad.exit_code != 0 and "is not a torch.export program" in bad.output and "Traceback" not in bad.output


def test_a_module_that_updates_its_buffers_is_refused_by_name():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(1))

        def forward(self, x):
            self.calls.add_(1)  # state carried between calls: the graph would return it as an output of its own
            return x * 2
    with pytest.raises(TorchImportError, match="updates calls in place"):
        ag.from_torch(Counting().eval(), (torch.randn(2, 3),))


def tiny_lm(kind):
    """A tiny random causal LM of transformers' (its weights spread wider than the default 0.02, so that greedy
    decoding does not repeat one token and a wrong step would show)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=100, initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                                    **common)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, **common)).eval()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hugging_face_decoders_generate_the_tokens_transformers_generates(kind):
    """The KV-cached decode step of an imported GPT-2 / LLaMA, compiled for llvm: its attentions fused, its caches
    written in place and grown past 16 positions; greedy tokens equal to transformers' `generate`, and the beam
    search on the compiled entries equal to the one on the interpreter's."""
    from attngraph import generate as G
    from attngraph.frontends.hf_decoding import compile_decoder, decoder_entries
    model = tiny_lm(kind)
    torch.manual_seed(1)
    prompts = torch.randint(1, 100, (2, 5))
    with torch.no_grad():
        want = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=20,
                              do_sample=False)[:, 5:].tolist()
    graphs, _, info = decoder_entries(model)
    assert info.decoder_only and len(info.caches) == 4 and info.cache_len == 64
    assert optimize(graphs["decode_step"], 3)[0].op_counts()["fused_attention"] == 2
    stepper = compile_decoder(model, "llvm")
    assert len(stepper.models["decode_step"].in_place) == 4  # each layer's keys and values, written where they are
    assert [h.tokens for h in G.generate(stepper, prompts.tolist(), max_len=20, alpha=0.0)] == want
    beams = [h.tokens for h in G.generate(stepper, prompts.tolist(), beam=4, max_len=10, alpha=0.0)]
    assert beams == [h.tokens for h in G.generate(compile_decoder(model), prompts.tolist(), beam=4, max_len=10,
                                                  alpha=0.0)]


def test_index_copy_at_positions_that_are_not_a_run_is_refused():
    class Scatter(nn.Module):
        def forward(self, x, y):
            return x.index_copy(0, torch.tensor([2, 0]), y)  # an update_slice would write them in the wrong places
    with pytest.raises(TorchImportError, match="aten.index_copy.*consecutive positions"):
        ag.from_torch(Scatter().eval(), (torch.randn(3, 4), torch.randn(2, 4)))


def test_advanced_indexing_reads_the_entries_asked_for_at_any_indices():
    """x[rows, cols] with index tensors that broadcast: through the one-hot selection for arbitrary indices, as a
    view where they are the positions themselves in order (Hugging Face's mask builders)."""
    class Pick(nn.Module):
        def forward(self, x, rows, cols):
            every = x[torch.arange(x.shape[0])[:, None, None], torch.arange(x.shape[1])[None, None, :]]
            return x[rows, cols] + every.sum()
    x = torch.randn(4, 5)
    rows, cols = torch.tensor([[3], [0], [3]]), torch.tensor([[4, 0, 2, 2]])
    graph, params = ag.from_torch(Pick().eval(), (x, rows, cols))
    got = ag.reference.run(graph, {"x": x.numpy(), "rows": rows.numpy(), "cols": cols.numpy()}, params)["output"]
    np.testing.assert_allclose(got, Pick()(x, rows, cols).numpy(), rtol=1e-6)
    assert sum(n.op == "where" for n in graph.nodes()) == 1  # the arbitrary pair only
