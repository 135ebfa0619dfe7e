"""Tiny models as training code writes them, shared by the derivative and the training tests: the paper's
encoder-decoder in the DSL and the same model in PyTorch, and the map between their weights."""

from __future__ import annotations

import numpy as np

import attngraph as ag
from attngraph import nn
from attngraph.nn import functional as F

V, D_MODEL, HEADS, FF, PAD = 11, 16, 2, 24, 0


class Translator(nn.Module):
    """The paper's model in miniature, as a PyTorch training script writes it: embeddings scaled by
    sqrt(d_model) plus sinusoidal positions, torch.nn.Transformer, the output projection tied to the target
    embedding, padding masks, and the label-smoothed loss that ignores padding."""

    def __init__(self, layers=1, norm_first=False):
        super().__init__()
        self.src_embed, self.tgt_embed = nn.Embedding(V, D_MODEL), nn.Embedding(V, D_MODEL)
        self.pos = nn.SinusoidalPositionalEncoding(D_MODEL, 64)
        self.transformer = nn.Transformer(D_MODEL, HEADS, layers, layers, FF, batch_first=True, norm_first=norm_first)

    def input_specs(self):
        ids = dict(dtype="int64", low=0, high=V)
        return {"src": nn.InputSpec(("b", "s"), **ids), "tgt_in": nn.InputSpec(("b", "t"), **ids),
                "tgt_out": nn.InputSpec(("b", "t"), **ids)}

    def forward(self, src, tgt_in, tgt_out):
        scale = D_MODEL ** 0.5
        pad = src == PAD
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1])
        x = self.src_embed(src) * scale + self.pos(src.shape[1])
        y = self.tgt_embed(tgt_in) * scale + self.pos(tgt_in.shape[1])
        h = self.transformer(x, y,
                             tgt_mask=causal, src_key_padding_mask=pad, memory_key_padding_mask=pad,
                             tgt_key_padding_mask=tgt_in == PAD)
        logits = h @ self.tgt_embed.weight.T
        loss = F.cross_entropy(logits.reshape(-1, V), tgt_out.reshape(-1), label_smoothing=0.1, ignore_index=PAD)
        return {"loss": loss}


def batch(rng, b=2, s=5, t=4):
    src = rng.integers(1, V, (b, s))
    src[1, 3:] = PAD
    tgt = rng.integers(1, V, (b, t + 1))
    tgt[1, 3:] = PAD
    return {"src": src, "tgt_in": tgt[:, :-1], "tgt_out": tgt[:, 1:]}


class TorchTranslator:
    """The same model in PyTorch, float64."""

    def __init__(self, torch, layers=1, norm_first=False):
        self.torch = torch
        torch.manual_seed(0)
        self.src_embed = torch.nn.Embedding(V, D_MODEL).double()
        self.tgt_embed = torch.nn.Embedding(V, D_MODEL).double()
        self.transformer = torch.nn.Transformer(D_MODEL, HEADS, layers, layers, FF, dropout=0.0,
                                                batch_first=True, norm_first=norm_first).double()
        # the paper's table, in float64 (the DSL's constants keep their float64 values in a float64 run)
        inv = np.power(10000.0, -np.arange(0, D_MODEL, 2) / D_MODEL)
        angles = np.arange(64, dtype=np.float64)[:, None] * inv
        self.pe = torch.from_numpy(np.stack([np.sin(angles), np.cos(angles)], -1).reshape(64, D_MODEL))

    def loss(self, src, tgt_in, tgt_out):
        torch, scale = self.torch, D_MODEL ** 0.5
        src, tgt_in, tgt_out = (torch.from_numpy(a) for a in (src, tgt_in, tgt_out))
        x = self.src_embed(src) * scale + self.pe[:src.shape[1]]
        y = self.tgt_embed(tgt_in) * scale + self.pe[:tgt_in.shape[1]]
        causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1], dtype=torch.float64)
        h = self.transformer(x, y, tgt_mask=causal, src_key_padding_mask=src == PAD,
                             memory_key_padding_mask=src == PAD, tgt_key_padding_mask=tgt_in == PAD)
        logits = h @ self.tgt_embed.weight.T
        return torch.nn.functional.cross_entropy(logits.reshape(-1, V), tgt_out.reshape(-1), label_smoothing=0.1,
                                                 ignore_index=PAD)

    def named(self):
        """(name, parameter) in our names where they are ours, torch's inside the transformer."""
        named = [(f"transformer.{k}", v) for k, v in self.transformer.named_parameters()]
        return named + [("src_embed.weight", self.src_embed.weight), ("tgt_embed.weight", self.tgt_embed.weight)]

    def state(self, grads=False):
        return {k: (v.grad if grads else v.detach()).numpy().copy() for k, v in self.named()}


def as_ours(state, model, exact=False):
    """A torch state (weights or their gradients) in our names and layouts.  The import rounds to the
    parameters' float32; ``exact`` keeps float64 by importing the value's float32 rounding and the rest
    separately (the import only moves entries, so the two parts add up to the float64 values)."""
    def imported(part):
        inner = {k[len("transformer."):]: v for k, v in part.items() if k.startswith("transformer.")}
        out = ag.weights.from_torch_transformer(inner, model.transformer, at="transformer")
        out.update({k: v for k, v in part.items() if not k.startswith("transformer.")})
        return out
    if not exact:
        return imported(state)
    high = {k: v.astype(np.float32) for k, v in state.items()}
    low = imported({k: v - high[k] for k, v in state.items()})
    return {k: v.astype(np.float64) + low[k].astype(np.float64) for k, v in imported(high).items()}
