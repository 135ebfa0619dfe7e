"""Generation through an imported decoder: a Hugging Face causal LM (GPT2LMHeadModel, LlamaForCausalLM, ...) as the
entries attngraph's steppers drive, its KV caches given to each step and returned written.

transformers keeps a cache as an object the model updates in place; ``KVStep`` makes it explicit: a step takes
the tokens, their first position ``pos`` and every layer's keys and values, (batch, kv_heads, cache, head_dim) as
transformers lays them out, loads them into a ``StaticCache`` of that length (copies, so the writes are values the
step returns, not mutations of its inputs), runs the model and returns the log-probs and the caches.  Exported with
``batch``, the step's length and ``cache`` symbolic, imported through ``torch_export`` (the cache write,
``index_copy`` at ``arange(t) + pos``, becomes an ``update_slice``, done in place when compiled), it is the
``decode_step`` entry; the beam's reorder and expand entries are gathers over the caches' batch axis.
``EntryStepper`` grows the caches by ``GROW`` positions as decoding goes, as it does the zoo's.

Written against transformers 5.25 (the pinned test version): the cache's layer fields it sets are that version's.
"""

from __future__ import annotations

from ..generate import DecoderInfo, EntryStepper
from ..nn import trace
from ..nn.cache import CACHE, Reorder
from ..passes.precision import STATE
from .torch_export import from_exported


def _kv_step_class():
    import torch
    from transformers import StaticCache

    class KVStep(torch.nn.Module):
        """(tokens (batch, t), pos (), kv [keys and values of each layer]) -> {"log_probs": (batch, t, vocab),
        "kv_<i>": the caches with positions pos .. pos + t - 1 written}."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, tokens, pos, kv: list):
            cache = StaticCache(config=self.model.config, max_cache_len=1)
            for i, layer in enumerate(cache.layers):
                keys, values = kv[2 * i].clone(), kv[2 * i + 1].clone()
                layer.keys, layer.values, layer.max_cache_len = keys, values, keys.shape[2]
                layer.cumulative_length = pos.clone()
                layer.device, layer.batch_size, layer.num_heads = keys.device, keys.shape[0], keys.shape[1]
                layer.k_head_dim, layer.v_head_dim = keys.shape[-1], values.shape[-1]
                layer.is_initialized = True
            logits = self.model(input_ids=tokens, cache=cache, use_cache=True).logits
            out = {"log_probs": torch.log_softmax(logits.float(), dim=-1)}
            out.update({f"kv_{2 * i + j}": t for i, layer in enumerate(cache.layers)
                        for j, t in enumerate((layer.keys, layer.values))})
            return out

    return KVStep


def decoder_entries(model, name: str | None = None):
    """(graphs {entry: Graph}, params, DecoderInfo) of a Hugging Face causal LM: ``decode_step`` exported from
    ``KVStep`` and imported, ``reorder_cache`` and ``expand_state`` over its caches."""
    import torch
    from torch.export import Dim
    config = model.config
    layers = config.num_hidden_layers
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    name = name or type(model).__name__
    step = _kv_step_class()(model.eval()).eval()
    batch, length, cache = Dim("batch"), Dim("step", max=4096), Dim(CACHE, min=2, max=1 << 16)
    dynamic = {"tokens": {0: batch, 1: length}, "pos": None, "kv": [{0: batch, 2: cache}] * (2 * layers)}
    # an example of 2 rows and 3 tokens: a size of 1 would be fixed by export
    example = (torch.randint(0, config.vocab_size, (2, 3)), torch.tensor(0),
               [torch.zeros(2, heads, 16, head_dim) for _ in range(2 * layers)])
    with torch.no_grad():
        program = torch.export.export(step, example, dynamic_shapes=dynamic, strict=False)
    graph, params = from_exported(program, dynamic, name=f"{name}.decode_step")
    state = {n: t for n, t in graph.input_types().items() if n not in ("tokens", "pos")}
    graphs = {"decode_step": graph,
              "reorder_cache": trace(Reorder(state), name=f"{name}.reorder_cache"),
              "expand_state": trace(Reorder(state), name=f"{name}.expand_state")}
    for g in graphs.values():  # in half precision, stored in the type (``passes.precision.STATE``)
        g.meta[STATE] = sorted(state)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions")
    info = DecoderInfo(name, True, int(graph.output_types()["log_probs"].shape[-1]), None, None, None,
                       int(positions), state, tuple(n for n in graph.output_types() if n != "log_probs"))
    return graphs, params, info


def compile_decoder(model, target: str = "numpy", *, opt_level: int = 3, name: str | None = None) -> EntryStepper:
    """A stepper (``attngraph.generate``'s greedy and beam search take it) over a Hugging Face causal LM's entries,
    each compiled for ``target`` (numpy: the reference interpreter)."""
    from ..api import compile
    graphs, params, info = decoder_entries(model, name)
    return EntryStepper(info, {m: compile(g, {k: params[k] for k in g.params}, target=target, opt_level=opt_level)
                               for m, g in graphs.items()})
