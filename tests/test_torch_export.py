"""The torch.export frontend: PyTorch modules as they are written, imported, fused, compiled and checked against
PyTorch itself (and the float64 interpreter)."""

from __future__ import annotations

import math

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


MODELS = {"encoder": (torch_encoder, "src", 2), "gpt": (GPTBlock, "x", 1), "llama": (LlamaBlock, "x", 1)}


@pytest.mark.parametrize("kind", list(MODELS))
def test_imported_model_matches_pytorch_on_the_interpreter_and_llvm_with_every_attention_fused(kind):
    make, arg, attentions = MODELS[kind]
    torch.manual_seed(0)
    module = make().eval()
    graph, params = imported(module, arg)
    assert graph.input_types()[arg].shape == ("batch", "seq", 32)  # the Dims given, by their names
    assert set(params) == {k for k, _ in module.named_parameters()}  # the module's own names
    x = torch.randn(3, 11, 32)  # another batch and length than the example's: one graph for all
    with torch.no_grad():
        want = module(x).numpy()
    got = ag.reference.run(graph, {arg: x.numpy()}, params)["output"]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    f64 = ag.reference.run(graph, {arg: x.double().numpy()}, {k: v.astype(np.float64) for k, v in params.items()},
                           dtype="float64")["output"]
    np.testing.assert_allclose(f64, module.double()(x.double()).detach().numpy(), rtol=1e-10, atol=1e-10)
    module.float()
    optimized, _ = optimize(graph, 3)
    counts = optimized.op_counts()
    assert counts.get("fused_attention") == attentions and "softmax" not in counts
    compiled = ag.compile(graph, params, target="llvm")
    np.testing.assert_allclose(compiled({arg: x.numpy()})["output"], want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("target", ["vulkan", "cuda"])
def test_imported_llama_block_runs_on_vulkan_and_the_cuda_emulator(target):
    if target == "vulkan" and target_status("vulkan")["run"] is not None:
        pytest.skip(f"no Vulkan device here: {target_status('vulkan')['run']}")
    if target == "cuda" and cuda.find_nvcc() is None:
        pytest.skip("nvcc is not installed")
    torch.manual_seed(0)
    module = LlamaBlock().eval()
    graph, params = imported(module)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        want = module(x).numpy()
    compiled = ag.compile(graph, params, target=target, **({"device": "emulator"} if target == "cuda" else {}))
    np.testing.assert_allclose(compiled({"x": x.numpy()})["output"], want, rtol=RTOL, atol=ATOL)


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


#: Hugging Face classes with small configs (random weights, nothing downloaded): the class, its config, what the
#: output to compare is called, and its attentions (one per layer)
HF_MODELS = {
    "bert": ("BertModel", "BertConfig", dict(hidden_size=32, num_attention_heads=4), "last_hidden_state"),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(n_embd=32, n_head=4, n_positions=64, use_cache=False), "logits"),
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                                      use_cache=False), "logits"),
}


@pytest.mark.parametrize("kind", list(HF_MODELS))
def test_hugging_face_models_import_with_their_padding_masks_fuse_every_attention_and_match(kind):
    transformers = pytest.importorskip("transformers")  # in the test extra
    cls, config_cls, sizes, output = HF_MODELS[kind]
    common = {"vocab_size": 100} | ({} if kind == "gpt2" else {"num_hidden_layers": 2, "intermediate_size": 64,
                                                                "max_position_embeddings": 64})
    config = getattr(transformers, config_cls)(**common, **sizes, **({"n_layer": 2} if kind == "gpt2" else {}))
    torch.manual_seed(0)
    model = getattr(transformers, cls)(config).eval()
    seq = {0: Dim("batch"), 1: Dim("seq", max=63)}
    graph, params = ag.from_torch(model, (torch.randint(0, 100, (2, 8)),), dynamic_shapes={
        "input_ids": seq, "attention_mask": seq}, example_kwargs={"attention_mask": torch.ones(2, 8, dtype=torch.long)})
    assert output in [name for name, _ in graph.outputs]  # the ModelOutput's names
    ids = torch.randint(0, 100, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0  # padding: those keys must be ignored
    with torch.no_grad():
        want = getattr(model(ids, attention_mask=mask), output).numpy()
    inputs = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    counts = optimize(graph, 3)[0].op_counts()
    assert counts.get("fused_attention") == 2 and "softmax" not in counts
    compiled = ag.compile(graph, params, target="llvm")
    got = compiled(inputs)[output]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_hugging_face_marian_the_papers_architecture_imports_fuses_its_six_attentions_and_matches():
    transformers = pytest.importorskip("transformers")
    config = transformers.MarianConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                       decoder_ffn_dim=64, max_position_embeddings=64, use_cache=False, pad_token_id=0,
                                       decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.MarianMTModel(config).eval()
    src, tgt = {0: Dim("batch"), 1: Dim("src_len", max=63)}, {0: Dim("batch"), 1: Dim("tgt_len", max=63)}
    graph, params = ag.from_torch(
        model, (torch.randint(1, 100, (2, 8)),),
        dynamic_shapes={"input_ids": src, "attention_mask": src, "decoder_input_ids": tgt},
        example_kwargs={"attention_mask": torch.ones(2, 8, dtype=torch.long),
                        "decoder_input_ids": torch.randint(1, 100, (2, 6))})
    ids, mask, out_ids = torch.randint(1, 100, (3, 9)), torch.ones(3, 9, dtype=torch.long), torch.randint(1, 100, (3, 7))
    mask[1, 5:] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask, decoder_input_ids=out_ids).logits.numpy()
    counts = optimize(graph, 3)[0].op_counts()
    assert counts.get("fused_attention") == 6 and "softmax" not in counts  # 2 encoder, 2 decoder, 2 cross
    compiled = ag.compile(graph, params, target="llvm")
    got = compiled({"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "decoder_input_ids": out_ids.numpy()})
    np.testing.assert_allclose(got["logits"], want, rtol=RTOL, atol=ATOL)
