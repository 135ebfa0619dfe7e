"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017)."""

from __future__ import annotations

import math

from .. import nn
from ..nn import functional as F


class Transformer(nn.Module):
    """Embeddings scaled by sqrt(d_model) plus sinusoidal positions, N encoder and N decoder layers,
    and the output projection with log-softmax.  With ``share_embeddings`` (the paper's shared BPE
    vocabulary) the source and target embeddings and the pre-softmax projection are one matrix.
    Source padding (token ``pad_id``) is masked out of encoder self-attention and cross-attention."""

    def __init__(self, vocab_size=37000, d_model=512, num_heads=8, d_ff=2048, num_layers=6,
                 max_len=1024, pad_id=0, share_embeddings=True, norm_first=False, activation="relu",
                 tgt_vocab_size=None, name="transformer"):
        super().__init__()
        self.name = name
        self.d_model, self.pad_id, self.max_len = d_model, pad_id, max_len
        self.src_vocab = vocab_size
        self.tgt_vocab = tgt_vocab_size or vocab_size
        if share_embeddings and self.tgt_vocab != self.src_vocab:
            raise ValueError("shared embeddings need one vocabulary for source and target")
        self.src_embed = nn.Embedding(self.src_vocab, d_model)
        self.tgt_embed = self.src_embed if share_embeddings else nn.Embedding(self.tgt_vocab, d_model)
        self.positions = nn.SinusoidalPositionalEncoding(d_model, max_len)
        self.encoder = nn.Encoder(num_layers, d_model, num_heads, d_ff, activation, norm_first)
        self.decoder = nn.Decoder(num_layers, d_model, num_heads, d_ff, activation, norm_first)
        self.generator = None if share_embeddings else nn.Linear(d_model, self.tgt_vocab, bias=False)

    def input_specs(self):
        tokens = dict(dtype="int64", low=1 if self.pad_id == 0 else 0, kind="tokens")
        return {"src": nn.InputSpec(("batch", "src_len"), high=self.src_vocab, **tokens),
                "tgt": nn.InputSpec(("batch", "tgt_len"), high=self.tgt_vocab, **tokens)}

    def default_dims(self):
        return {"batch": 2, "src_len": 16, "tgt_len": 12}

    def embed(self, table, tokens):
        scale = math.sqrt(self.d_model)
        return table(tokens) * scale + self.positions(tokens.shape[1])

    def encode(self, src):
        src_pad = src.eq(self.pad_id)
        return self.encoder(self.embed(self.src_embed, src), src_pad), src_pad

    def project(self, y):
        if self.generator is not None:
            return self.generator(y)
        return y @ self.tgt_embed.weight.transpose(0, 1)

    def forward(self, src, tgt):
        memory, src_pad = self.encode(src)
        y = self.decoder(self.embed(self.tgt_embed, tgt), memory, src_pad)
        return {"log_probs": F.log_softmax(self.project(y), axis=-1)}


class TransformerEncoderModel(nn.Module):
    """An encoder stack alone on float inputs (batch, seq, d_model): the unit benchmarks compare."""

    def __init__(self, d_model=512, num_heads=8, d_ff=2048, num_layers=6, activation="relu",
                 norm_first=False, name="encoder"):
        super().__init__()
        self.name, self.d_model = name, d_model
        self.encoder = nn.Encoder(num_layers, d_model, num_heads, d_ff, activation, norm_first)

    def input_specs(self):
        return {"x": nn.InputSpec(("batch", "seq", self.d_model), "float32")}

    def default_dims(self):
        return {"batch": 2, "seq": 16}

    def forward(self, x):
        return {"y": self.encoder(x)}
