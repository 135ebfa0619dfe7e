"""attngraph's Transformer weights written into a CTranslate2 model (its public spec API), so both engines run
one model.  Needs ``pip install ctranslate2``.

The vocabulary is ``<blank> <s> </s> <unk> t4 t5 ...``: ids equal attngraph's (pad 0, BOS 1, EOS 2), tokens
are the ids' strings.  Post-LN with shared embeddings, as the paper and ``transformer-base``.
"""

from __future__ import annotations

import numpy as np

SPECIALS = ("<blank>", "<s>", "</s>", "<unk>")


def vocabulary(size: int) -> list[str]:
    return list(SPECIALS) + [f"t{i}" for i in range(len(SPECIALS), size)]


def to_tokens(ids) -> list[str]:
    return [SPECIALS[i] if i < len(SPECIALS) else f"t{i}" for i in ids]


def to_ids(tokens) -> list[int]:
    return [SPECIALS.index(t) if t in SPECIALS else int(t[1:]) for t in tokens]


def write_model(model, params, out_dir: str) -> str:
    """Write ``model`` (an attngraph ``Transformer``: post-LN, shared embeddings, ReLU) with ``params`` as a
    CTranslate2 model in ``out_dir`` (created)."""
    import os

    import ctranslate2
    from ctranslate2.specs import common_spec, transformer_spec

    import attngraph as ag
    if model.decoder.layers[0].norm_first or model.generator is not None:
        raise SystemExit("write_model covers post-LN Transformers with shared embeddings (the paper's)")
    layers = len(model.decoder.layers)
    heads = model.decoder.layers[0].self_attn.num_heads
    spec = transformer_spec.TransformerSpec.from_config((layers, layers), heads, pre_norm=False,
                                                        activation=common_spec.Activation.RELU)
    p = {k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}

    def linear(dst, *names):  # attngraph stores (in, out); CTranslate2 (out, in); several fused along out
        dst.weight = np.ascontiguousarray(np.concatenate([p[n + ".weight"].T for n in names]))
        dst.bias = np.concatenate([p[n + ".bias"] for n in names])

    def norm(dst, name):
        dst.gamma, dst.beta = p[name + ".weight"], p[name + ".bias"]

    table = ag.nn.sinusoidal_table(model.max_len, model.d_model).astype(np.float32)
    embed = p["src_embed.weight"]
    spec.encoder.embeddings[0].weight = embed
    spec.decoder.embeddings.weight = embed
    spec.decoder.projection.weight = embed
    spec.decoder.projection.bias = np.zeros(len(embed), np.float32)
    for side in (spec.encoder, spec.decoder):
        side.position_encodings.encodings = table
    for i, (layer, ours) in enumerate(zip(spec.encoder.layer, model.encoder.layers)):
        pre = f"encoder.layers.{i}"
        a = f"{pre}.self_attn"
        linear(layer.self_attention.linear[0], f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj")
        linear(layer.self_attention.linear[1], f"{a}.out_proj")
        norm(layer.self_attention.layer_norm, f"{pre}.norm1")
        linear(layer.ffn.linear_0, f"{pre}.ffn.linear1")
        linear(layer.ffn.linear_1, f"{pre}.ffn.linear2")
        norm(layer.ffn.layer_norm, f"{pre}.norm2")
    for i, layer in enumerate(spec.decoder.layer):
        pre = f"decoder.layers.{i}"
        a, c = f"{pre}.self_attn", f"{pre}.cross_attn"
        linear(layer.self_attention.linear[0], f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj")
        linear(layer.self_attention.linear[1], f"{a}.out_proj")
        norm(layer.self_attention.layer_norm, f"{pre}.norm1")
        linear(layer.attention.linear[0], f"{c}.q_proj")
        linear(layer.attention.linear[1], f"{c}.k_proj", f"{c}.v_proj")
        linear(layer.attention.linear[2], f"{c}.out_proj")
        norm(layer.attention.layer_norm, f"{pre}.norm2")
        linear(layer.ffn.linear_0, f"{pre}.ffn.linear1")
        linear(layer.ffn.linear_1, f"{pre}.ffn.linear2")
        norm(layer.ffn.layer_norm, f"{pre}.norm3")
    spec.config.layer_norm_epsilon = model.decoder.layers[0].norm1.eps
    words = vocabulary(model.tgt_vocab)
    spec.register_source_vocabulary(words)
    spec.register_target_vocabulary(words)
    spec.validate()
    spec.optimize(quantization=None)
    os.makedirs(out_dir, exist_ok=True)
    spec.save(out_dir)
    assert ctranslate2.contains_model(out_dir)
    return out_dir
