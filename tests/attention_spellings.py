"""Attention written the ways real code writes it (PyTorch tutorials, Hugging Face, the Annotated
Transformer, fairseq, timm, GPT-2, LLaMA), each a small model with what -O3 should make of it:
``FUSED`` (one ``fused_attention``, no softmax left) or a near miss whose reason matches a pattern.

``SPELLINGS``: name -> (model factory, expected outcome, the pass that reports a near miss or None)."""

from __future__ import annotations

import math

import numpy as np

from attngraph import nn
from attngraph.nn import functional as F

D, H = 16, 4
HD = D // H
FUSED = "fused"
F32_MIN = float(np.finfo(np.float32).min)


class Attn(nn.Module):
    """Projections and the head split shared by the spellings; ``scores_to_out`` is what differs."""

    def __init__(self, heads=H, bias=True):
        super().__init__()
        self.h, self.hd = heads, D // heads
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias) for _ in range(4))

    def input_specs(self):
        return {"x": nn.InputSpec(("batch", "seq", D)),
                "pad": nn.InputSpec(("batch", "seq"), "bool", kind="padding_mask")}

    def default_dims(self):
        return {"batch": 2, "seq": 7}

    def split(self, t):
        b, n, _ = t.shape
        return t.reshape(b, n, self.h, self.hd).transpose(1, 2)

    def merge(self, t):
        b, _, n, _ = t.shape
        return t.transpose(1, 2).reshape(b, n, D)

    def forward(self, x, pad):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        return self.o(self.merge(self.attend(q, k, v, pad)))


def spelling(attend, **kwargs):
    """A model whose attention core is ``attend(self, q, k, v, pad)`` (q, k, v: batch, heads, seq, dim)."""
    def make():
        class Spelled(Attn):
            pass
        Spelled.attend = attend
        return Spelled(**kwargs)
    return make


def _scaled(q, k):
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])


def annotated(self, q, k, v, pad):
    """The Annotated Transformer: an int mask, ``masked_fill(mask == 0, -1e9)``."""
    mask = (~pad).astype("int64")[:, None, None, :]
    return _scaled(q, k).masked_fill(mask == 0, -1e9).softmax(dim=-1) @ v


def hf_finfo_min(self, q, k, v, pad):
    """Hugging Face: ``masked_fill`` with ``torch.finfo(dtype).min``."""
    return _scaled(q, k).masked_fill(pad[:, None, None, :], F32_MIN).softmax(dim=-1) @ v


def hf_extended_mask(self, q, k, v, pad):
    """Hugging Face's extended attention mask, ``(1 - mask) * finfo.min``, added."""
    attend = (~pad).float()[:, None, None, :]
    return (_scaled(q, k) + (1.0 - attend) * F32_MIN).softmax(dim=-1) @ v


def hand_softmax(self, q, k, v, pad):
    s = F.where(pad[:, None, None, :], float("-inf"), _scaled(q, k))
    e = (s - s.max(dim=-1, keepdim=True)).exp()
    return e / e.sum(dim=-1, keepdim=True) @ v


def hand_softmax_no_max(self, q, k, v, pad):
    e = _scaled(q, k).exp()
    return e / e.sum(dim=-1, keepdim=True) @ v


def log_softmax_exp(self, q, k, v, pad):
    return _scaled(q, k).log_softmax(dim=-1).exp() @ v


class Fairseq(Attn):
    """fairseq's MultiheadAttention: Q scaled after its projection, (batch*heads, seq, dim) products."""

    def forward(self, x, pad):
        b, n, _ = x.shape
        q = self.q(x) * (self.hd ** -0.5)

        def heads(t):
            return t.reshape(b, n, self.h, self.hd).transpose(1, 2).contiguous().view(-1, n, self.hd)
        q, k, v = heads(q), heads(self.k(x)), heads(self.v(x))
        w = q.matmul(k.transpose(1, 2))
        w = w + nn.Transformer.generate_square_subsequent_mask(n)  # attn_mask, added
        out = w.softmax(dim=-1).matmul(v)
        return self.o(out.view(b, self.h, n, self.hd).transpose(1, 2).reshape(b, n, D))


def no_scale(self, q, k, v, pad):
    """GPT-2 with ``scale_attn_weights=False``."""
    return (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def scale_on_k(self, q, k, v, pad):
    return (q @ (k / math.sqrt(self.hd)).transpose(-2, -1)).softmax(dim=-1) @ v


def scale_on_k_transposed(self, q, k, v, pad):
    return (q @ (k.transpose(-2, -1) * (1 / math.sqrt(self.hd)))).softmax(dim=-1) @ v


def sdpa_causal(self, q, k, v, pad):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def einsum_products(self, q, k, v, pad):
    """Products as einsums over the projections' (batch, seq, heads, dim) layout."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    s = F.einsum("bqhd,bkhd->bhqk", q, k) * (self.hd ** -0.5)
    return F.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).transpose(1, 2)


class Temperature(Attn):
    """A learned temperature (a parameter as the scale): one for all heads, or one per head (XCiT)."""

    def __init__(self, shape=(1,)):
        super().__init__()
        self.temperature = nn.Parameter(shape, init=("uniform", 1.0))

    def attend(self, q, k, v, pad):
        return ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1) @ v


class GPT2Causal(Attn):
    """GPT-2: a registered bool buffer sliced to the length, ``where(bias, w, finfo.min)``."""

    def __init__(self, max_positions=32):
        super().__init__()
        self.register_buffer("bias", np.tril(np.ones((max_positions, max_positions), bool)).reshape(
            1, 1, max_positions, max_positions))

    def attend(self, q, k, v, pad):
        n = q.shape[-2]
        w = _scaled(q, k)
        return F.where(self.bias[:, :, :n, :n], w, F32_MIN).softmax(dim=-1) @ v


class MultiQuery(Attn):
    """One key and value head shared by every query head (PaLM, Falcon)."""

    def __init__(self):
        super().__init__()
        self.k, self.v = nn.Linear(D, HD), nn.Linear(D, HD)

    def forward(self, x, pad):
        q = self.split(self.q(x))
        k, v = self.k(x).unsqueeze(1), self.v(x).unsqueeze(1)
        return self.o(self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=~pad[:, None, None, :])))


class LatentQueries(Attn):
    """Learned queries not expanded to the batch (Perceiver, Set Transformer, Q-Former)."""

    def __init__(self, m=3):
        super().__init__()
        self.m = m
        self.latents = nn.Parameter((m, D), init=("normal", 1.0))

    def forward(self, x, pad):
        q = self.q(self.latents).reshape(1, self.m, self.h, self.hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, self.split(self.k(x)), self.split(self.v(x)))
        return self.o(out.transpose(1, 2).reshape(x.shape[0], self.m, D))


class TiedQK(Attn):
    """One projection for queries and keys (Reformer's shared QK)."""

    def forward(self, x, pad):
        qk = self.split(self.q(x))
        return self.o(self.merge(F.scaled_dot_product_attention(qk, qk, self.split(self.v(x)))))


class ReturnsScores(Attn):
    """Attention logits returned beside the output: the scale written on Q must stay on them."""

    def forward(self, x, pad):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        scores = (q / math.sqrt(self.hd)) @ k.transpose(-2, -1)
        return {"out": self.o(self.merge(scores.softmax(dim=-1) @ v)), "scores": scores}


class ReturnsProbs(Attn):
    """Hugging Face's ``output_attentions=True``: the probabilities are an output too."""

    def forward(self, x, pad):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        p = F.where(pad[:, None, None, :], float("-inf"), _scaled(q, k)).softmax(dim=-1)
        return {"out": self.o(self.merge(p @ v)), "attentions": p}


def mask_after_scale_before(self, q, k, v, pad):
    """The mask written before the scale."""
    s = F.where(pad[:, None, None, :], float("-inf"), q @ k.transpose(-2, -1))
    return (s * (1 / math.sqrt(self.hd))).softmax(dim=-1) @ v


class LibraryMHA(nn.Module):
    """The DSL's own layer, with a bool attn_mask (True = attend, as F.scaled_dot_product_attention)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiHeadAttention(D, H)

    input_specs, default_dims = Attn.input_specs, Attn.default_dims

    def forward(self, x, pad):
        return self.attn(x, x, x, key_padding_mask=pad, attn_mask=nn.causal_mask(x.shape[1], x.shape[1]))


#: name -> (factory, FUSED or a regex of the near miss, the pass reporting it)
SPELLINGS = {
    "library-mha-bool-attn-mask": (LibraryMHA, FUSED, None),
    "sdpa-causal": (spelling(sdpa_causal), FUSED, None),
    "annotated-transformer-mask-eq-0": (spelling(annotated), FUSED, None),
    "hf-finfo-min-fill": (spelling(hf_finfo_min), FUSED, None),
    "hf-extended-additive-mask": (spelling(hf_extended_mask), FUSED, None),
    "softmax-by-hand": (spelling(hand_softmax), FUSED, None),
    "softmax-by-hand-without-max": (spelling(hand_softmax_no_max), "without the row max is not softmax",
                                    "softmax-by-hand"),
    "log-softmax-exp": (spelling(log_softmax_exp), FUSED, None),
    "fairseq-3d-bmm": (Fairseq, FUSED, None),
    "gpt2-no-scale": (spelling(no_scale), FUSED, None),
    "scale-on-k-before-transpose": (spelling(scale_on_k), FUSED, None),
    "scale-on-k-after-transpose": (spelling(scale_on_k_transposed), FUSED, None),
    "head-dim-1": (spelling(sdpa_causal, heads=D), FUSED, None),
    "learned-temperature": (Temperature, FUSED, None),
    "per-head-temperature": (lambda: Temperature((H, 1, 1)), FUSED, None),
    "bias-free-projections": (spelling(sdpa_causal, bias=False), FUSED, None),
    "einsum": (spelling(einsum_products), FUSED, None),
    "gpt2-buffer-sliced-to-length": (GPT2Causal, FUSED, None),
    "multi-query-kv-one-head": (MultiQuery, FUSED, None),
    "latent-queries-broadcast-batch": (LatentQueries, FUSED, None),
    "tied-qk-projection": (TiedQK, r"also gives this attention's K or V \(a shared projection\)", "fold-scale-into-q"),
    "scores-returned": (ReturnsScores, r"the scores %\w+ are also used elsewhere, so the scale written on Q stays",
                        "softmax-scaling"),
    "probabilities-returned": (ReturnsProbs, r"attention probabilities or scores used elsewhere", "attention"),
    "mask-before-scale": (spelling(mask_after_scale_before), r"scores are not a matmul \(where\)", "attention"),
}
