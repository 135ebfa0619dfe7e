"""A torch.nn.Transformer ported to attngraph: the same module in the DSL, its state dict loaded with one
call, compiled for this CPU and checked against PyTorch and the float64 interpreter.

    python examples/port_torch_transformer.py
"""

import warnings

import numpy as np
import torch

import attngraph as ag
from attngraph import nn

D_MODEL, HEADS, LAYERS, FF = 64, 4, 2, 128

warnings.filterwarnings("ignore", category=UserWarning, module="torch")  # its nested-tensor fast-path notes

# The model as it exists in PyTorch (trained weights would be loaded here; eval(): no dropout).
torch.manual_seed(0)
reference = torch.nn.Transformer(D_MODEL, HEADS, LAYERS, LAYERS, FF, batch_first=True).eval()


class Translator(nn.Module):
    """What the PyTorch code runs: the transformer with a causal target mask and source padding."""

    def __init__(self):
        super().__init__()
        # Same arguments, same meaning: both stacks end in a layer norm, as torch.nn.Transformer's do.
        self.transformer = nn.Transformer(D_MODEL, HEADS, LAYERS, LAYERS, FF, batch_first=True)

    def input_specs(self):  # symbolic dims: one build serves every batch and length
        return {"src": nn.InputSpec(("batch", "src_len", D_MODEL)), "tgt": nn.InputSpec(("batch", "tgt_len", D_MODEL)),
                "src_pad": nn.InputSpec(("batch", "src_len"), "bool")}

    def forward(self, src, tgt, src_pad):
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])  # 0 / -inf, as PyTorch's
        return self.transformer(src, tgt, tgt_mask=causal, src_key_padding_mask=src_pad,
                                memory_key_padding_mask=src_pad)


model = Translator()
# in_proj_weight split into Q, K and V, linear weights transposed; a tensor that fits nothing is an error.
params = ag.weights.from_torch_transformer(reference.state_dict(), model.transformer, at="transformer")
graph = ag.trace(model)

rng = np.random.default_rng(0)
src = rng.standard_normal((2, 9, D_MODEL)).astype(np.float32)
tgt = rng.standard_normal((2, 6, D_MODEL)).astype(np.float32)
src_pad = np.zeros((2, 9), bool)
src_pad[1, 6:] = True  # the second source is 6 tokens long
inputs = {"src": src, "tgt": tgt, "src_pad": src_pad}

compiled = ag.compile(graph, params, target="llvm")  # -O3: 6 fused attentions
ours = compiled(inputs)["output"]
with torch.no_grad():
    theirs = reference(torch.from_numpy(src), torch.from_numpy(tgt),
                       tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(6),
                       src_key_padding_mask=torch.from_numpy(src_pad),
                       memory_key_padding_mask=torch.from_numpy(src_pad)).numpy()
print(f"compiled vs torch.nn.Transformer: max abs difference {np.abs(ours - theirs).max():.2g}")
print(ag.verify(graph, params=params, inputs=inputs).format())
assert np.abs(ours - theirs).max() < 1e-4
