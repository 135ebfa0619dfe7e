"""A decoder-only causal language model in the GPT-2 style: learned positions, pre-LN blocks of
causal self-attention and a GELU feed-forward, a final norm, and the output projection tied to the
token embedding."""

from __future__ import annotations

from .. import nn
from ..nn import cache as C
from ..nn import functional as F


class GPTBlock(nn.Module):
    """``x + attn(ln1(x))`` then ``x + ffn(ln2(x))``, the attention causal."""

    def __init__(self, d_model, num_heads, d_ff, activation="gelu_tanh", eps=1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps)
        self.self_attn = nn.MultiHeadAttention(d_model, num_heads)
        self.norm2 = nn.LayerNorm(d_model, eps)
        self.ffn = nn.FeedForward(d_model, d_ff, activation)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.self_attn(h, h, h, causal=True)
        return x + self.ffn(self.norm2(x))

    def step(self, x, pos, k_cache, v_cache):
        """The block on new positions ``pos ..`` with the self-attention cache: (x, K cache, V cache)."""
        a, k_cache, v_cache = C.self_attention_step(self.self_attn, self.norm1(x), pos, k_cache, v_cache)
        x = x + a
        return x + self.ffn(self.norm2(x)), k_cache, v_cache


class GPT(nn.Module):
    """Tokens (batch, seq) -> next-token log-probs (batch, seq, vocab) at every position.

    ``decode_step`` runs the same weights on the new tokens with a key/value cache of
    ``cache_len`` positions; ``reorder_cache`` reorders the caches' rows (beam search)."""

    def __init__(self, vocab_size=50257, d_model=768, num_heads=12, d_ff=3072, num_layers=12, max_len=1024,
                 activation="gelu_tanh", eps=1e-5, name="gpt"):
        super().__init__()
        self.name = name
        self.vocab, self.d_model, self.max_len = vocab_size, d_model, max_len
        self.tok_embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.LearnedPositionalEmbedding(max_len, d_model)
        self.layers = nn.ModuleList(GPTBlock(d_model, num_heads, d_ff, activation, eps) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model, eps)
        #: the most positions the decode-step caches may hold (they are allocated and grown as decoding needs).
        self.cache_len = max_len

    def input_specs(self, method="forward"):
        tokens = dict(dtype="int64", low=0, high=self.vocab, kind="tokens")
        if method == "forward":
            return {"tokens": nn.InputSpec(("batch", "seq"), **tokens)}
        if method == "decode_step":
            specs = {"tokens": nn.InputSpec(("batch", "step"), **tokens),
                     "pos": nn.InputSpec((), "int64", low=0, high=f"{C.CACHE} - step + 1", kind="position")}
            specs.update({n: nn.InputSpec(t.shape, t.dtype) for n, t in self.cache_types().items()})
            return specs
        if method == "reorder_cache":
            return C.Reorder(self.cache_types()).input_specs()
        raise ValueError(f"{self.name} has no entry {method!r}")

    def default_dims(self, method="forward"):
        return {"batch": 2, "seq": 12, "step": 1, "rows": 2, C.CACHE: 8}

    def logits(self, x):
        """The final norm and the projection tied to the token embedding."""
        return self.norm(x) @ self.tok_embed.weight.transpose(0, 1)

    def forward(self, tokens):
        x = self.tok_embed(tokens) + self.pos_embed(tokens.shape[1])
        for layer in self.layers:
            x = layer(x)
        return {"log_probs": F.log_softmax(self.logits(x), axis=-1)}

    def cache_types(self) -> dict:
        """The self-attention caches the decode step reads and returns, by name (``cache.0.k``, ...)."""
        if self.cache_len > self.max_len:
            raise ValueError(f"cache_len {self.cache_len} is past the {self.max_len} positions {self.name} encodes")
        return {name: C.cache_type(layer.self_attn)
                for layer, kv in zip(self.layers, C.cache_names(len(self.layers))) for name in kv}

    def decode_step(self, tokens, pos, **caches):
        """The model on the new tokens (batch, step) at positions ``pos ..`` (an int64 scalar), reading
        and updating the caches: the next-token log-probs of the new positions (batch, step, vocab)
        and the updated caches under their input names."""
        step = tokens.shape[1]
        x = self.tok_embed(tokens) + self.pos_embed(step, pos)
        out = {}
        for layer, (k, v) in zip(self.layers, C.cache_names(len(self.layers))):
            x, out[k], out[v] = layer.step(x, pos, caches[k], caches[v])
        return {"log_probs": F.log_softmax(self.logits(x), axis=-1), **out}

    def reorder_cache(self, indices, **caches):
        """The caches' rows in the order ``indices`` (beam search follows its surviving beams)."""
        return {n: F.gather(caches[n], indices) for n in self.cache_types()}


__all__ = ["GPT", "GPTBlock", "ZOO"]

#: Zoo entries (``attngraph.models.ZOO`` takes them in): a tiny one for tests, GPT-2 small's shape.
ZOO = {
    "gpt-tiny": lambda: GPT(vocab_size=64, d_model=32, num_heads=4, d_ff=64, num_layers=2, max_len=64, name="gpt-tiny"),
    "gpt-small": lambda: GPT(50257, 768, 12, 3072, 12, 1024, name="gpt-small"),
}
