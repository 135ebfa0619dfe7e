"""The DSL's Transformer layers against PyTorch's ``torch.nn.Transformer*`` modules, same weights."""

import math

import numpy as np
import pytest

import attngraph as ag
from attngraph import nn, passes

torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch==2.13.0 (pip install -e '.[test]')")

D_MODEL, HEADS, D_FF = 32, 4, 64
RTOL, ATOL = 1e-5, 1e-5  # float32 against float32, summation order differs


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def load_mha(tm, p, prefix):
    """Our q/k/v/out projections ((in, out) weights) into nn.MultiheadAttention's packed (out, in) layout."""
    tm.in_proj_weight.copy_(t(np.concatenate([p[f"{prefix}.{n}_proj.weight"].T for n in "qkv"])))
    tm.in_proj_bias.copy_(t(np.concatenate([p[f"{prefix}.{n}_proj.bias"] for n in "qkv"])))
    tm.out_proj.weight.copy_(t(p[f"{prefix}.out_proj.weight"].T))
    tm.out_proj.bias.copy_(t(p[f"{prefix}.out_proj.bias"]))


def load_layer(tl, p, prefix, decoder):
    load_mha(tl.self_attn, p, f"{prefix}.self_attn")
    if decoder:
        load_mha(tl.multihead_attn, p, f"{prefix}.cross_attn")
    for i in (1, 2):
        getattr(tl, f"linear{i}").weight.copy_(t(p[f"{prefix}.ffn.linear{i}.weight"].T))
        getattr(tl, f"linear{i}").bias.copy_(t(p[f"{prefix}.ffn.linear{i}.bias"]))
    for i in (1, 2, 3) if decoder else (1, 2):
        getattr(tl, f"norm{i}").weight.copy_(t(p[f"{prefix}.norm{i}.weight"]))
        getattr(tl, f"norm{i}").bias.copy_(t(p[f"{prefix}.norm{i}.bias"]))


def torch_layer(decoder, norm_first, activation):
    cls = torch.nn.TransformerDecoderLayer if decoder else torch.nn.TransformerEncoderLayer
    return cls(D_MODEL, HEADS, D_FF, dropout=0.0, activation=activation, batch_first=True,
               norm_first=norm_first).eval()


class EncLayer(nn.Module):
    def __init__(self, norm_first, activation):
        super().__init__()
        self.layer = nn.EncoderLayer(D_MODEL, HEADS, D_FF, activation, norm_first)

    def forward(self, x, pad):
        return self.layer(x, src_key_padding_mask=pad)


class DecLayer(nn.Module):
    def __init__(self, norm_first, activation):
        super().__init__()
        self.layer = nn.DecoderLayer(D_MODEL, HEADS, D_FF, activation, norm_first)

    def forward(self, x, memory, pad):
        return self.layer(x, memory, memory_key_padding_mask=pad, tgt_is_causal=True)


def padding(batch, length):
    pad = np.zeros((batch, length), bool)
    pad[1, length - 3:] = True  # the second sequence is padded
    return pad


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_matches_torch(norm_first, activation):
    g = ag.trace(EncLayer(norm_first, activation),
                 {"x": nn.InputSpec(("b", "s", D_MODEL)), "pad": nn.InputSpec(("b", "s"), "bool")})
    p = ag.init_params(g, seed=3, perturb=True)
    x = np.random.default_rng(0).standard_normal((2, 9, D_MODEL)).astype(np.float32)
    pad = padding(2, 9)
    ours = ag.reference.run(g, {"x": x, "pad": pad}, p)["output"]
    tl = torch_layer(False, norm_first, activation)
    with torch.no_grad():
        load_layer(tl, p, "layer", False)
        want = tl(t(x), src_key_padding_mask=t(pad)).numpy()
    np.testing.assert_allclose(ours, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_decoder_layer_matches_torch(norm_first):
    g = ag.trace(DecLayer(norm_first, "relu"),
                 {"x": nn.InputSpec(("b", "t", D_MODEL)), "memory": nn.InputSpec(("b", "s", D_MODEL)),
                  "pad": nn.InputSpec(("b", "s"), "bool")})
    p = ag.init_params(g, seed=4, perturb=True)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 7, D_MODEL)).astype(np.float32)
    memory = rng.standard_normal((2, 9, D_MODEL)).astype(np.float32)
    pad = padding(2, 9)
    ours = ag.reference.run(g, {"x": x, "memory": memory, "pad": pad}, p)["output"]
    tl = torch_layer(True, norm_first, "relu")
    with torch.no_grad():
        load_layer(tl, p, "layer", True)
        causal = torch.nn.Transformer.generate_square_subsequent_mask(7)
        want = tl(t(x), t(memory), tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=t(pad)).numpy()
    np.testing.assert_allclose(ours, want, rtol=RTOL, atol=ATOL)


def test_encoder_decoder_transformer_matches_torch(tiny_graph, tiny_params):
    """The whole zoo model: embeddings * sqrt(d) + sinusoidal positions, 2+2 post-LN layers, the shared
    embedding as output projection, log-softmax; the source padded."""
    model = ag.models.get("transformer-tiny")
    d, n_layers = model.d_model, len(model.encoder.layers)
    p = tiny_params
    rng = np.random.default_rng(2)
    src = rng.integers(1, 64, (2, 11))
    src[1, 8:] = 0  # padding
    tgt = rng.integers(1, 64, (2, 6))
    ours = ag.reference.run(tiny_graph, {"src": src, "tgt": tgt}, p)["log_probs"]

    def layer(decoder):
        return torch_layer(decoder, False, "relu")

    enc = torch.nn.TransformerEncoder(layer(False), n_layers, enable_nested_tensor=False).eval()
    dec = torch.nn.TransformerDecoder(layer(True), n_layers).eval()
    with torch.no_grad():
        for i in range(n_layers):
            load_layer(enc.layers[i], p, f"encoder.layers.{i}", False)
            load_layer(dec.layers[i], p, f"decoder.layers.{i}", True)
        table = t(p["src_embed.weight"])
        pe = t(nn.sinusoidal_table(model.max_len, d).astype(np.float32))

        def embed(tokens):
            return table[t(tokens)] * math.sqrt(d) + pe[: tokens.shape[1]]

        pad = t(src == 0)
        memory = enc(embed(src), src_key_padding_mask=pad)
        causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        y = dec(embed(tgt), memory, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=pad)
        want = torch.log_softmax(y @ table.T, dim=-1).numpy()
    np.testing.assert_allclose(ours, want, rtol=RTOL, atol=ATOL)


# -- PyTorch's spellings ---------------------------------------------------------------------------

class SDPA(nn.Module):
    """Attention written as a PyTorch user writes it, with ``F.scaled_dot_product_attention``."""

    def __init__(self, mask_kind):
        super().__init__()
        self.mask_kind = mask_kind

    def forward(self, q, k, v, mask=None):
        from attngraph.nn import functional as F
        if self.mask_kind == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.mask_kind == "scale":
            return F.scaled_dot_product_attention(q, k, v, scale=0.3)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("mask_kind", ["bool", "float", "causal", "scale"])
def test_scaled_dot_product_attention_matches_pytorch_and_fuses(mask_kind):
    rng = np.random.default_rng(0)
    b, h, lq, lk, d = 2, 3, 5, 7 if mask_kind != "causal" else 5, 8
    x = {n: rng.standard_normal((b, h, ln, d)).astype(np.float32) for n, ln in (("q", lq), ("k", lk), ("v", lk))}
    specs = {"q": ((b, h, lq, d), "float32"), "k": ((b, h, lk, d), "float32"), "v": ((b, h, lk, d), "float32")}
    mask = None
    if mask_kind == "bool":
        mask = rng.random((b, 1, lq, lk)) < 0.7
        mask[..., 0] = True  # every query attends at least one key (an all-False row is NaN in both)
        specs["mask"], x["mask"] = ((b, 1, lq, lk), "bool"), mask
    elif mask_kind == "float":
        mask = rng.standard_normal((lq, lk)).astype(np.float32)
        specs["mask"], x["mask"] = ((lq, lk), "float32"), mask
    g = ag.trace(SDPA(mask_kind), specs)
    got = ag.reference.run(g, x, {}, dtype="float32")["output"]
    with torch.no_grad():
        want = torch.nn.functional.scaled_dot_product_attention(
            t(x["q"]), t(x["k"]), t(x["v"]), attn_mask=None if mask is None else t(mask),
            is_causal=mask_kind == "causal", scale=0.3 if mask_kind == "scale" else None).numpy()
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    fused, _ = passes.optimize(g, 3)  # the plain ops the function writes are what the attention pass fuses
    assert fused.op_counts().get("fused_attention") == 1, fused.op_counts()


def test_pytorch_spellings_of_reductions_views_and_masks():
    from attngraph.nn import functional as F

    class M(nn.Module):
        def forward(self, x, m):
            n, s, d = x.size()
            y = x.view(n, s, 2, d // 2).sum(dim=-1, keepdim=True).view(n, s, 2)
            z = x.masked_fill(m[:, :, None], 0.0).mean(dim=(1, 2))
            return {"y": y.softmax(dim=-1), "z": z, "w": F.log_softmax(x, dim=1), "all": x.max(), "s": x.size(-1) * 1.0 + x.sum()}

    rng = np.random.default_rng(1)
    x, m = rng.standard_normal((2, 3, 4)).astype(np.float32), rng.random((2, 3)) < 0.5
    g = ag.trace(M(), {"x": ((2, 3, 4), "float32"), "m": ((2, 3), "bool")})
    out = ag.reference.run(g, {"x": x, "m": m}, {}, dtype="float64")
    tx, tm = torch.from_numpy(x).double(), torch.from_numpy(m)
    want = {"y": tx.view(2, 3, 2, 2).sum(dim=-1, keepdim=True).view(2, 3, 2).softmax(dim=-1),
            "z": tx.masked_fill(tm[:, :, None], 0.0).mean(dim=(1, 2)), "w": torch.log_softmax(tx, dim=1),
            "all": tx.max(), "s": 4.0 + tx.sum()}
    for name, w in want.items():
        np.testing.assert_allclose(out[name], w.numpy(), rtol=1e-6, atol=1e-6, err_msg=name)


def test_torch_transformer_port_example_runs():
    """The README's port of a torch.nn.Transformer (examples/port_torch_transformer.py), as a user runs it."""
    import os
    import subprocess
    import sys
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "port_torch_transformer.py")
    run = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "compiled vs torch.nn.Transformer" in run.stdout and "PASS" in run.stdout


def test_state_dict_import_names_what_does_not_fit():
    """from_torch_transformer: a missing tensor, one that maps to nothing and a misshapen one, each named."""
    ref = torch.nn.Transformer(16, 2, 1, 1, 32, batch_first=True)
    model = nn.Transformer(16, 2, 1, 1, 32, batch_first=True)
    sd = dict(ref.state_dict())
    del sd["decoder.norm.bias"]
    sd["encoder.layers.0.linear1.weight"] = sd["encoder.layers.0.linear1.weight"].T
    sd["generator.weight"] = torch.zeros(3, 16)
    with pytest.raises(ag.WeightsError) as e:
        ag.weights.from_torch_transformer(sd, model)
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "missing tensor for 'decoder.norm.bias' (expected 'decoder.norm.bias')" in msg
    assert "'encoder.layers.0.linear1.weight' (-> encoder.layers.0.ffn.linear1.weight) has shape (16, 32), " \
           "expected (32, 16)" in msg
    assert "unexpected tensor 'generator.weight'" in msg
    params = ag.weights.from_torch_transformer(ref.state_dict(), model)
    np.testing.assert_array_equal(params["decoder.layers.0.cross_attn.k_proj.weight"],
                                  ref.decoder.layers[0].multihead_attn.in_proj_weight[16:32].detach().numpy().T)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_transformer_with_every_torch_mask_matches_torch(norm_first):
    """nn.Transformer as torch.nn.Transformer, (seq, batch, d) inputs (batch_first=False), with each of
    PyTorch's masks: a bool src_mask and memory_mask (True = not allowed), the float causal tgt_mask and
    both key padding masks; weights from the torch state dict."""
    S, T, B = 7, 5, 2
    ref = torch.nn.Transformer(D_MODEL, HEADS, 2, 2, D_FF, dropout=0.0, norm_first=norm_first).eval()

    class Port(nn.Module):
        def __init__(self):
            super().__init__()
            self.t = nn.Transformer(D_MODEL, HEADS, 2, 2, D_FF, norm_first=norm_first)

        def forward(self, src, tgt, src_mask, memory_mask, src_pad, tgt_pad):
            return self.t(src, tgt, src_mask=src_mask, tgt_mask=nn.Transformer.generate_square_subsequent_mask(T),
                          memory_mask=memory_mask, src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad,
                          memory_key_padding_mask=src_pad)

    g = ag.trace(Port(), {"src": nn.InputSpec((S, B, D_MODEL)), "tgt": nn.InputSpec((T, B, D_MODEL)),
                          "src_mask": nn.InputSpec((S, S), "bool"), "memory_mask": nn.InputSpec((T, S), "bool"),
                          "src_pad": nn.InputSpec((B, S), "bool"), "tgt_pad": nn.InputSpec((B, T), "bool")})
    params = ag.weights.from_torch_transformer(ref.state_dict(), ag.nn.Transformer(D_MODEL, HEADS, 2, 2, D_FF), at="t")
    rng = np.random.default_rng(5)
    x = {"src": rng.standard_normal((S, B, D_MODEL)).astype(np.float32),
         "tgt": rng.standard_normal((T, B, D_MODEL)).astype(np.float32),
         "src_mask": rng.random((S, S)) < 0.3, "memory_mask": rng.random((T, S)) < 0.3,
         "src_pad": np.zeros((B, S), bool), "tgt_pad": np.zeros((B, T), bool)}
    np.fill_diagonal(x["src_mask"], False)  # every query keeps a key: no NaN rows
    x["memory_mask"][:, 0] = False
    x["src_pad"][1, 5:] = True
    x["tgt_pad"][1, 4:] = True
    with torch.no_grad():
        want = ref(t(x["src"]), t(x["tgt"]), src_mask=t(x["src_mask"]),
                   tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(T), memory_mask=t(x["memory_mask"]),
                   src_key_padding_mask=t(x["src_pad"]), tgt_key_padding_mask=t(x["tgt_pad"]),
                   memory_key_padding_mask=t(x["src_pad"])).numpy()
    for level in (0, 3):
        opt, _ = passes.optimize(g, level)
        ours = ag.reference.run(opt, x, params)["output"]
        np.testing.assert_allclose(ours, want, rtol=RTOL, atol=ATOL, err_msg=f"-O{level}")


def test_silu_sigmoid_and_a_swiglu_feed_forward_match_torch():
    """``F.silu``, ``F.sigmoid`` / ``Tensor.sigmoid()`` and ``nn.SwiGLU`` (LLaMA's feed-forward) against PyTorch:
    the interpreter in float64 and the llvm build, large negative inputs included (no overflow)."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn = nn.SwiGLU(16, 40)

        def input_specs(self):
            return {"x": nn.InputSpec(("batch", "seq", 16))}

        def forward(self, x):
            return {"ffn": self.ffn(x), "gate": x.sigmoid() * nn.functional.sigmoid(x), "silu": nn.functional.silu(x)}

    model = Block()
    g = ag.trace(model)
    params = ag.init_params(g, 0)
    x = np.random.default_rng(0).standard_normal((2, 5, 16)) * 4
    x[0, 0, :3] = [-200.0, 200.0, 0.0]
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in params.items()}
    tx = torch.tensor(x)
    want = {"ffn": (torch.nn.functional.silu(tx @ t["ffn.w1.weight"]) * (tx @ t["ffn.w3.weight"])) @ t["ffn.w2.weight"],
            "gate": torch.sigmoid(tx) ** 2, "silu": torch.nn.functional.silu(tx)}
    got = ag.reference.run(g, {"x": x}, params, dtype="float64")
    compiled = ag.compile(g, params, target="llvm")({"x": x.astype(np.float32)})
    for k, w in want.items():
        np.testing.assert_allclose(got[k], w.numpy(), rtol=1e-12, atol=1e-12, err_msg=k)
        np.testing.assert_allclose(compiled[k], w.numpy(), rtol=1e-4, atol=1e-4, err_msg=k)
