"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017)."""

from __future__ import annotations

import math

from .. import nn
from ..nn import cache as C
from ..nn import functional as F


class Transformer(nn.Module):
    """Embeddings scaled by sqrt(d_model) plus sinusoidal positions, N encoder and N decoder layers,
    and the output projection with log-softmax.  With ``share_embeddings`` (the paper's shared BPE
    vocabulary) the source and target embeddings and the pre-softmax projection are one matrix.
    Source padding (token ``pad_id``) is masked out of encoder self-attention and cross-attention.
    ``dropout`` (P_drop 0.1 as the paper) applies in training graphs alone (traced after ``train()``): on the
    embedding + position sums and on each sub-layer's output."""

    def __init__(self, vocab_size=37000, d_model=512, num_heads=8, d_ff=2048, num_layers=6,
                 max_len=1024, pad_id=0, share_embeddings=True, norm_first=False, activation="relu",
                 tgt_vocab_size=None, dropout=0.1, name="transformer"):
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
        self.dropout = nn.Dropout(dropout)
        self.encoder = nn.Encoder(num_layers, d_model, num_heads, d_ff, activation, norm_first, dropout=dropout)
        self.decoder = nn.Decoder(num_layers, d_model, num_heads, d_ff, activation, norm_first, dropout=dropout)
        self.generator = None if share_embeddings else nn.Linear(d_model, self.tgt_vocab, bias=False)
        #: the most positions the decode-step caches may hold (they are allocated and grown as decoding needs).
        self.cache_len = max_len

    def input_specs(self, method="forward"):
        tokens = dict(dtype="int64", low=1 if self.pad_id == 0 else 0, kind="tokens")
        src = nn.InputSpec(("batch", "src_len"), high=self.src_vocab, **tokens)
        if method == "forward":
            return {"src": src, "tgt": nn.InputSpec(("batch", "tgt_len"), high=self.tgt_vocab, **tokens)}
        if method == "encode_entry":
            return {"src": src}
        if method == "decode_step":
            specs = {"tokens": nn.InputSpec(("batch", "step"), high=self.tgt_vocab, **tokens),
                     "pos": nn.InputSpec((), "int64", low=0, high=f"{C.CACHE} - step + 1", kind="position"),
                     "src_pad": nn.InputSpec(("batch", "src_len"), "bool", kind="padding_mask")}
            specs.update({n: nn.InputSpec(t.shape, t.dtype) for n, t in self.cache_types().items()})
            specs.update({n: nn.InputSpec(t.shape, t.dtype) for n, t in self.cross_types().items()})
            return specs
        if method == "reorder_cache":
            return C.Reorder(self.cache_types()).input_specs()
        raise ValueError(f"{self.name} has no entry {method!r}")

    def default_dims(self, method="forward"):
        return {"batch": 2, "src_len": 16, "tgt_len": 12, "step": 1, "rows": 2, C.CACHE: 8}

    def embed(self, table, tokens):
        scale = math.sqrt(self.d_model)
        return self.dropout(table(tokens) * scale + self.positions(tokens.shape[1]))

    def encode(self, src):
        src_pad = src.eq(self.pad_id)
        return self.encoder(self.embed(self.src_embed, src), src_key_padding_mask=src_pad), src_pad

    def project(self, y):
        if self.generator is not None:
            return self.generator(y)
        return y @ self.tgt_embed.weight.transpose(0, 1)

    def forward(self, src, tgt):
        memory, src_pad = self.encode(src)
        y = self.decoder(self.embed(self.tgt_embed, tgt), memory, memory_key_padding_mask=src_pad, tgt_is_causal=True)
        return {"log_probs": F.log_softmax(self.project(y), axis=-1)}

    # -- incremental decoding: the entries ``attngraph.generate`` runs ----------------------------

    def cache_types(self) -> dict:
        """The self-attention caches the decode step reads and returns, by name (``cache.0.k``, ...)."""
        if self.cache_len > self.max_len:
            raise ValueError(f"cache_len {self.cache_len} is past the {self.max_len} positions {self.name} encodes")
        attn = [layer.self_attn for layer in self.decoder.layers]
        return {name: C.cache_type(a) for a, kv in zip(attn, C.cache_names(len(attn))) for name in kv}

    def cross_types(self) -> dict:
        """Each decoder layer's cross-attention keys and values of the memory (``cross.0.k``, ...)."""
        return {f"cross.{i}.{kv}": C.cache_type(layer.cross_attn, "src_len")
                for i, layer in enumerate(self.decoder.layers) for kv in "kv"}

    def encode_entry(self, src):
        """Once per source: the memory, its padding mask and every decoder layer's cross-attention
        keys and values (batch, src_len, heads, head_dim), which each decode step then reads."""
        memory, src_pad = self.encode(src)
        out = {"memory": memory, "src_pad": src_pad}
        for i, layer in enumerate(self.decoder.layers):
            out[f"cross.{i}.k"], out[f"cross.{i}.v"] = C.project_kv(layer.cross_attn, memory)
        return out

    def decode_step(self, tokens, pos, src_pad, **state):
        """The decoder on the new target tokens (batch, step) at positions ``pos ..`` (``pos`` an
        int64 scalar), reading and updating the self-attention caches: the next-token log-probs
        of the new positions (batch, step, vocab) and the updated caches under their input names."""
        step = tokens.shape[1]
        x = self.tgt_embed(tokens) * math.sqrt(self.d_model) + self.positions(step, pos)
        out = {}
        for i, (layer, (k, v)) in enumerate(zip(self.decoder.layers, C.cache_names(len(self.decoder.layers)))):
            x, out[k], out[v] = C.decoder_layer_step(layer, x, pos, state[k], state[v],
                                                     state[f"cross.{i}.k"], state[f"cross.{i}.v"], src_pad)
        if self.decoder.norm is not None:
            x = self.decoder.norm(x)
        return {"log_probs": F.log_softmax(self.project(x), axis=-1), **out}

    def reorder_cache(self, indices, **caches):
        """The caches' rows in the order ``indices`` (beam search follows its surviving beams)."""
        return {n: F.gather(caches[n], indices) for n in self.cache_types()}


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
