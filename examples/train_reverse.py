"""Train the paper's encoder-decoder, in miniature, to reverse sequences: the DSL model with its loss and dropout,
Adam under the paper's warm-up schedule, compiled for this CPU; then its loss and accuracy on sequences it has not
seen.

    python examples/train_reverse.py [--steps 1000] [--target llvm]
"""

import argparse
import time

import numpy as np

import attngraph as ag
from attngraph import nn, train
from attngraph.nn import functional as F

V, D_MODEL, HEADS, LAYERS, FF = 12, 64, 4, 2, 128
PAD, BOS = 0, 1  # tokens 2..V-1 are the data


class Translator(nn.Module):
    """Embeddings scaled by sqrt(d_model) plus sinusoidal positions, nn.Transformer (the paper's post-LN layers),
    the output projection tied to the target embedding, label-smoothed cross-entropy that ignores padding."""

    def __init__(self):
        super().__init__()
        self.src_embed, self.tgt_embed = nn.Embedding(V, D_MODEL), nn.Embedding(V, D_MODEL)
        self.pos = nn.SinusoidalPositionalEncoding(D_MODEL, 64)
        self.transformer = nn.Transformer(D_MODEL, HEADS, LAYERS, LAYERS, FF, batch_first=True)

    def input_specs(self):
        ids = dict(dtype="int64", low=0, high=V)
        return {"src": nn.InputSpec(("b", "s"), **ids), "tgt_in": nn.InputSpec(("b", "t"), **ids),
                "tgt_out": nn.InputSpec(("b", "t"), **ids)}

    def input_specs_predict(self):
        specs = self.input_specs()
        del specs["tgt_out"]
        return specs

    def predict(self, src, tgt_in):
        """The scores of the next target token at every position (teacher forcing)."""
        pad = src == PAD
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1])
        x = self.src_embed(src) * D_MODEL ** 0.5 + self.pos(src.shape[1])
        y = self.tgt_embed(tgt_in) * D_MODEL ** 0.5 + self.pos(tgt_in.shape[1])
        h = self.transformer(x, y, tgt_mask=causal, src_key_padding_mask=pad, memory_key_padding_mask=pad,
                             tgt_key_padding_mask=tgt_in == PAD)
        return h @ self.tgt_embed.weight.T                            # the output projection tied to the embedding

    def forward(self, src, tgt_in, tgt_out):
        logits = self.predict(src, tgt_in)
        return {"loss": F.cross_entropy(logits.reshape(-1, V), tgt_out.reshape(-1), label_smoothing=0.1,
                                        ignore_index=PAD)}


def batch(rng, size=32, length=8):
    """Sources of 4..length data tokens (padded); the target is the source reversed, after BOS (teacher forcing)."""
    src = np.full((size, length), PAD)
    tgt = np.full((size, length + 1), PAD)
    for row, n in enumerate(rng.integers(4, length + 1, size)):
        seq = rng.integers(2, V, n)
        src[row, :n] = seq
        tgt[row, 0], tgt[row, 1:n + 1] = BOS, seq[::-1]
    return {"src": src, "tgt_in": tgt[:, :-1], "tgt_out": tgt[:, 1:]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--target", default="llvm", help="llvm, vulkan, or interpreter")
    args = p.parse_args()

    model = Translator()
    graph = ag.trace(model.train())                               # train(): with dropout (0.1, as the paper)
    start = time.perf_counter()
    step = train.TrainStep(graph, ag.init_params(graph, seed=0), train.Adam(lr=train.Noam(D_MODEL, warmup=100)),
                           target=args.target)
    print(f"compiled the training step for {args.target} in {time.perf_counter() - start:.1f} s")
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for i in range(1, args.steps + 1):
        loss = step(batch(rng))
        if i % 50 == 0 or i == 1:
            print(f"step {i:4d}  loss {loss:.3f}")
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s")
    # Held out: the trained parameters on a fresh batch, by the float64 interpreter: the loss, and how many
    # target tokens the model predicts right from the reference prefix.
    model.eval()                                                  # no dropout from here on
    params, data = step.params(), batch(np.random.default_rng(1), size=256)
    held_out = ag.reference.run(ag.trace(model), data, params, dtype="float64")["loss"]
    predict = ag.trace(model, model.input_specs_predict(), method="predict")
    logits = ag.reference.run(predict, {k: data[k] for k in ("src", "tgt_in")}, params, dtype="float64")["output"]
    real = data["tgt_out"] != PAD
    accuracy = (logits.argmax(-1) == data["tgt_out"])[real].mean()
    print(f"held out: loss {float(held_out):.3f} (the floor with label smoothing 0.1 over {V} classes: 0.53), "
          f"{100 * accuracy:.1f}% of the reversed tokens predicted")
    return accuracy


if __name__ == "__main__":
    main()
