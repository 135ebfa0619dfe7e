"""A plain-PyTorch BERT forward over a Hugging Face checkpoint's tensors, by their Hugging Face names:
the oracle for ``attngraph.models.bert`` (tests/test_bert.py) and the PyTorch side of
bench/bench_minilm.py.  Written from BERT's definition (``transformers``' BertModel, eval mode)
without going through attngraph's name mapping, so it checks that mapping too."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as TF


class TorchBert:
    def __init__(self, checkpoint_dir: str, dtype=torch.float32):
        from safetensors.torch import load_file
        with open(os.path.join(checkpoint_dir, "config.json")) as f:
            self.config = json.load(f)
        self.w = {k: v.to(dtype) if v.is_floating_point() else v
                  for k, v in load_file(os.path.join(checkpoint_dir, "model.safetensors")).items()}
        self.dtype = dtype

    @torch.inference_mode()
    def forward(self, input_ids, attention_mask, token_type_ids=None):
        """(last_hidden_state, mean-pooled and normalized sentence embedding) as torch tensors."""
        c, w = self.config, self.w
        eps, heads = c["layer_norm_eps"], c["num_attention_heads"]
        ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
        mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
        types = torch.zeros_like(ids) if token_type_ids is None else torch.as_tensor(np.asarray(token_type_ids))
        b, s = ids.shape
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:s]
             + w["embeddings.token_type_embeddings.weight"][types])
        x = TF.layer_norm(x, (x.shape[-1],), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        # the extended attention mask of transformers: 0 where attended, the dtype's minimum at padding
        bias = (1.0 - mask[:, None, None, :].to(self.dtype)) * torch.finfo(self.dtype).min
        d = x.shape[-1] // heads
        for i in range(c["num_hidden_layers"]):
            p = f"encoder.layer.{i}."

            def lin(t, name):
                return TF.linear(t, w[p + name + ".weight"], w[p + name + ".bias"])

            def split(t):
                return t.view(b, s, heads, d).transpose(1, 2)

            q, k, v = (split(lin(x, f"attention.self.{n}")) for n in ("query", "key", "value"))
            scores = q @ k.transpose(-1, -2) / math.sqrt(d) + bias
            ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, heads * d)
            x = TF.layer_norm(lin(ctx, "attention.output.dense") + x, (x.shape[-1],),
                              w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps)
            h = TF.gelu(lin(x, "intermediate.dense"))  # exact erf GELU, BERT's "gelu"
            x = TF.layer_norm(lin(h, "output.dense") + x, (x.shape[-1],),
                              w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
        # sentence-transformers: mean over the attention mask, then L2 normalization
        m = mask[:, :, None].to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return x, TF.normalize(pooled, p=2, dim=1)
