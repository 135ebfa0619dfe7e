"""Blocks as their reference code writes them (Hugging Face's LLaMA, GPT-2 and T5 attention), one source run by
PyTorch and traced by the DSL with the same weights: the float64 interpreter against PyTorch's float64 run, and
every target (llvm, vulkan, the CUDA emulator) against the float64 interpreter, each attention fused at -O3."""

from __future__ import annotations

import math

import numpy as np
import pytest

import attngraph as ag
from attngraph import nn, passes
from attngraph.nn import functional as AF

torch = pytest.importorskip("torch", reason="the PyTorch oracle needs torch==2.13.0 (pip install -e '.[test]')")
TF = torch.nn.functional

D = 32


# -- the reference code: T is ``torch`` or the DSL's F, F ``torch.nn.functional`` or the DSL's F ------------------

def llama(T, F, p, x, cos, sin, heads=4, kv_heads=2):
    """LLaMA's decoder layer (transformers' LlamaDecoderLayer): RMSNorm, rotary embeddings with rotate_half,
    grouped-query attention through repeat_kv, causal SDPA, bias-free projections, a SwiGLU MLP."""
    def rms(h, w, eps=1e-6):
        variance = h.pow(2).mean(-1, keepdim=True)
        return w * (h * T.rsqrt(variance + eps))

    def rotate_half(h):
        h1, h2 = h[..., : h.shape[-1] // 2], h[..., h.shape[-1] // 2:]
        return T.cat((-h2, h1), dim=-1)

    def repeat_kv(h, n_rep):
        b, kv, slen, hd = h.shape
        if n_rep == 1:
            return h
        h = h[:, :, None, :, :].expand(b, kv, n_rep, slen, hd)
        return h.reshape(b, kv * n_rep, slen, hd)

    b, s, _ = x.shape
    hd = D // heads
    residual = x
    h = rms(x, p["input_layernorm"])
    q = (h @ p["q_proj"]).view(b, s, -1, hd).transpose(1, 2)
    k = (h @ p["k_proj"]).view(b, s, -1, hd).transpose(1, 2)
    v = (h @ p["v_proj"]).view(b, s, -1, hd).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    q = (q * cos) + (rotate_half(q) * sin)
    k = (k * cos) + (rotate_half(k) * sin)
    k, v = repeat_kv(k, heads // kv_heads), repeat_kv(v, heads // kv_heads)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    a = a.transpose(1, 2).contiguous().reshape(b, s, -1)
    h = residual + a @ p["o_proj"]
    g = rms(h, p["post_attention_layernorm"])
    return h + (F.silu(g @ p["gate_proj"]) * (g @ p["up_proj"])) @ p["down_proj"]


def gpt2(T, F, p, x, bias, heads=4):
    """GPT-2's block (transformers' GPT2Block): one c_attn projection split in three, heads by view and permute,
    the causal buffer sliced to the lengths, finfo.min where masked, gelu_new by hand with pow."""
    def split_heads(t):
        return t.view(t.size()[:-1] + (heads, t.size(-1) // heads)).permute(0, 2, 1, 3)

    def gelu_new(t):
        return 0.5 * t * (1.0 + T.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * T.pow(t, 3.0))))

    h = F.layer_norm(x, (D,), p["ln_1.weight"], p["ln_1.bias"], 1e-5)
    query, key, value = (h @ p["c_attn.weight"] + p["c_attn.bias"]).split(D, dim=2)
    query, key, value = split_heads(query), split_heads(key), split_heads(value)
    w = T.matmul(query, key.transpose(-1, -2)) / (value.size(-1) ** 0.5)
    q_len, k_len = query.size(-2), key.size(-2)
    causal = bias[:, :, k_len - q_len: k_len, :k_len]
    w = T.where(causal, w, float(np.finfo(np.float32).min))
    w = F.softmax(w, dim=-1)
    a = T.matmul(w, value).permute(0, 2, 1, 3).contiguous()
    a = a.view(a.size()[:-2] + (D,))
    x = x + a @ p["c_proj.weight"] + p["c_proj.bias"]
    h = F.layer_norm(x, (D,), p["ln_2.weight"], p["ln_2.bias"], 1e-5)
    return x + gelu_new(h @ p["c_fc.weight"] + p["c_fc.bias"]) @ p["mlp.c_proj.weight"] + p["mlp.c_proj.bias"]


def t5_bucket(T, relative_position, bidirectional=True, num_buckets=32, max_distance=128):
    """transformers' T5Attention._relative_position_bucket, as written there."""
    relative_buckets = 0
    if bidirectional:
        num_buckets //= 2
        relative_buckets += (relative_position > 0).to(T.long) * num_buckets
        relative_position = T.abs(relative_position)
    else:
        relative_position = -T.min(relative_position, T.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    relative_position_if_large = max_exact + (
        T.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(T.long)
    relative_position_if_large = T.min(relative_position_if_large,
                                       T.full_like(relative_position_if_large, num_buckets - 1))
    relative_buckets += T.where(is_small, relative_position, relative_position_if_large)
    return relative_buckets


def t5(T, F, p, x, heads=4):
    """T5's self-attention layer (transformers' T5LayerSelfAttention): T5's RMS norm, no scaling, a learned
    relative position bias from bucketed distances added to the scores."""
    b, s, _ = x.shape
    hd = D // heads
    variance = x.to(T.float32).pow(2).mean(-1, keepdim=True)
    h = p["layer_norm"] * (x * T.rsqrt(variance + 1e-6))

    def shape(t):
        return t.view(b, -1, heads, hd).transpose(1, 2)
    q, k, v = shape(h @ p["q"]), shape(h @ p["k"]), shape(h @ p["v"])
    scores = T.matmul(q, k.transpose(3, 2))
    context_position = T.arange(s, dtype=T.long)[:, None]
    memory_position = T.arange(s, dtype=T.long)[None, :]
    buckets = t5_bucket(T, memory_position - context_position)
    values = F.embedding(buckets, p["relative_attention_bias"])
    position_bias = values.permute([2, 0, 1]).unsqueeze(0)
    scores += position_bias
    attn_weights = F.softmax(scores.float(), dim=-1).type_as(scores)
    a = T.matmul(attn_weights, v).transpose(1, 2).contiguous().view(b, -1, D)
    return x + a @ p["o"]


# -- the DSL's side: the weights as parameters, the same code traced ---------------------------------------------

LLAMA = {"input_layernorm": (D,), "q_proj": (D, D), "k_proj": (D, 16), "v_proj": (D, 16), "o_proj": (D, D),
         "post_attention_layernorm": (D,), "gate_proj": (D, 64), "up_proj": (D, 64), "down_proj": (64, D)}
GPT2 = {"ln_1.weight": (D,), "ln_1.bias": (D,), "c_attn.weight": (D, 3 * D), "c_attn.bias": (3 * D,),
        "c_proj.weight": (D, D), "c_proj.bias": (D,), "ln_2.weight": (D,), "ln_2.bias": (D,),
        "c_fc.weight": (D, 4 * D), "c_fc.bias": (4 * D,), "mlp.c_proj.weight": (4 * D, D), "mlp.c_proj.bias": (D,)}
T5 = {"layer_norm": (D,), "q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D), "relative_attention_bias": (32, 4)}


class Block(nn.Module):
    def __init__(self, fn, shapes, inputs, buffers=None):
        super().__init__()
        self.fn, self.inputs = fn, inputs
        self.names = list(shapes)
        for i, shape in enumerate(shapes.values()):
            setattr(self, f"w{i}", nn.Parameter(shape, init=("normal", 0.3)))
        for name, value in (buffers or {}).items():
            self.register_buffer(name, value)
        self.buffer_names = list(buffers or {})

    def input_specs(self):
        return self.inputs

    def forward(self, **xs):
        p = {n: getattr(self, f"w{i}") for i, n in enumerate(self.names)}
        return self.fn(DSL, AF, p, *xs.values(), *(getattr(self, n) for n in self.buffer_names))


class _DSL:
    """The DSL's F, with the dtypes the reference code names (``torch.long``) as the DSL names them."""
    long, float32 = "int64", "float32"

    def __getattr__(self, name):
        return getattr(AF, name)


DSL = _DSL()


def rope(seq, hd=8):
    inv = 1.0 / (10000 ** (np.arange(0, hd, 2) / hd))
    emb = np.concatenate([np.outer(np.arange(seq), inv)] * 2, axis=-1)
    return np.cos(emb)[None], np.sin(emb)[None]


def case(name):
    """(the DSL module, its inputs, PyTorch's fn(x, p, ...) in float64)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, D))
    if name == "llama":
        cos, sin = rope(6)
        module = Block(llama, LLAMA, {"x": nn.InputSpec(("batch", "seq", D)), "cos": nn.InputSpec((1, "seq", 8)),
                                      "sin": nn.InputSpec((1, "seq", 8))})
        return module, {"x": x, "cos": cos, "sin": sin}, lambda p, xs: llama(torch, TF, p, *xs.values())
    if name == "gpt2":
        bias = np.tril(np.ones((16, 16), bool))[None, None]
        module = Block(gpt2, GPT2, {"x": nn.InputSpec(("batch", "seq", D))}, {"bias": bias})
        return module, {"x": x}, lambda p, xs: gpt2(torch, TF, p, xs["x"], torch.from_numpy(bias))
    module = Block(t5, T5, {"x": nn.InputSpec(("batch", "seq", D))})
    return module, {"x": x}, lambda p, xs: t5(torch, TF, p, xs["x"])


def torch_run(module, fn, inputs, params):
    p = {n: torch.from_numpy(params[f"w{i}"].astype(np.float64)) for i, n in enumerate(module.names)}
    with torch.no_grad():
        return fn(p, {k: torch.from_numpy(np.asarray(v, np.float64)) for k, v in inputs.items()}).numpy()


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_reference_block_matches_pytorch_and_fuses(name):
    module, inputs, fn = case(name)
    params = ag.init_params(module, seed=1)
    want = torch_run(module, fn, inputs, params)
    exact = ag.compile(module, params, target="numpy", dtype="float64", opt_level=0)(inputs)["output"]
    # T5's code rounds to float32 on purpose (x.to(torch.float32), scores.float()), in PyTorch's float64 run too;
    # in the DSL's graph, float32 already, those casts change nothing
    rtol, atol = (1e-5, 1e-6) if name == "t5" else (1e-11, 1e-12)
    np.testing.assert_allclose(exact, want, rtol=rtol, atol=atol)
    graph = ag.trace(module)
    optimized, report = passes.optimize(graph, 3)
    counts = optimized.op_counts()
    assert counts.get("fused_attention") == 1 and "softmax" not in counts, report.format()
    if name == "llama":  # repeat_kv's copies not made: the attention reads the 2 key/value heads in place
        (attention,) = [n for n in optimized.nodes() if n.op == "fused_attention"]
        assert [optimized.node(o).type.shape[1] for o in optimized.operands(attention.id)[:3]] == [4, 2, 2]
    for target, device in (("llvm", None), ("vulkan", None), ("cuda", "emulator")):
        result = ag.verify(module, target=target, device=device, params=params,
                           inputs={k: np.asarray(v, np.float32) for k, v in inputs.items()})
        assert result.ok, f"{target}: {result.format()}"
