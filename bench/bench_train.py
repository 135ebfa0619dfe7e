"""One training step of an encoder-decoder Transformer: attngraph (compiled for llvm) vs PyTorch eager and
torch.compile (the model compiled, as ``model = torch.compile(model)``; its backward through AOTAutograd, Adam
eager).

    python bench/bench_train.py [--threads 2] [--d-model 256] [--heads 4] [--layers 2] [--ff 1024]
                                [--vocab 4000] [--batch 16] [--src-len 32] [--tgt-len 32] [--repeat 5]
                                [--checkpoint] [--no-compile] [--dtype bfloat16]

The model is the paper's (embeddings scaled by sqrt(d_model) plus sinusoidal positions, torch.nn.Transformer
layers, the output projection tied to the target embedding, label-smoothed cross-entropy ignoring padding)
at the sizes given; a step is the forward, the loss, the backward and Adam's update under the paper's
schedule.  Both start from the same weights and take the same batches; their losses are compared over the
first steps before anything is timed.  Printed: the median milliseconds per step in interleaved rounds (see
``timing.interleaved_ms``), GFLOP/s and the share of this machine's peak (``peak.py``; a step's FLOPs counted as
6 x the parameters the tokens pass through x the tokens, the rule of thumb: forward 2, backward 4, per
weight and token; the attention's own products are left out), the ratio to torch eager, attngraph's planned
memory, and attngraph's slowest kernels.  ``--checkpoint`` adds attngraph with each layer recomputed in the
backward (``TrainStep(checkpoint=True)``).

``--dtype bfloat16``: mixed precision in every engine: attngraph's ``TrainStep(dtype="bfloat16")`` (float32 weights and
Adam state, the forward and backward in bfloat16) beside PyTorch under ``torch.autocast("cpu", torch.bfloat16)``
(eager and compiled), with attngraph's float32 step too; each engine's loss over the first steps is printed as its
relative difference from the float32 step's.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ff", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--src-len", type=int, default=32)
    p.add_argument("--tgt-len", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--top", type=int, default=12, help="attngraph kernels to list by time")
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out (its first step compiles for a minute)")
    p.add_argument("--checkpoint", action="store_true", help="also attngraph with its layers recomputed in the backward")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: mixed precision in every engine (torch.autocast for PyTorch)")
    return p.parse_args()


ARGS = parse_args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import copy  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from peak import peak_gflops  # noqa: E402
from timing import interleaved_ms  # noqa: E402
import attngraph as ag  # noqa: E402
from attngraph import nn, train  # noqa: E402
from attngraph.nn import functional as F  # noqa: E402
from attngraph.passes.memory import activation_bytes  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning, module="torch")
torch.set_num_threads(ARGS.threads)
D, H, L, FF, V, PAD = ARGS.d_model, ARGS.heads, ARGS.layers, ARGS.ff, ARGS.vocab, 0
SMOOTHING, MAX_LEN = 0.1, 512


class Translator(nn.Module):
    def __init__(self):
        super().__init__()
        self.src_embed, self.tgt_embed = nn.Embedding(V, D), nn.Embedding(V, D)
        self.pos = nn.SinusoidalPositionalEncoding(D, MAX_LEN)
        self.transformer = nn.Transformer(D, H, L, L, FF, batch_first=True)

    def input_specs(self):
        ids = dict(dtype="int64", low=0, high=V)
        return {"src": nn.InputSpec(("b", "s"), **ids), "tgt_in": nn.InputSpec(("b", "t"), **ids),
                "tgt_out": nn.InputSpec(("b", "t"), **ids)}

    def forward(self, src, tgt_in, tgt_out):
        pad = src == PAD
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1])
        x = self.src_embed(src) * D ** 0.5 + self.pos(src.shape[1])
        y = self.tgt_embed(tgt_in) * D ** 0.5 + self.pos(tgt_in.shape[1])
        h = self.transformer(x, y, tgt_mask=causal, src_key_padding_mask=pad, memory_key_padding_mask=pad,
                             tgt_key_padding_mask=tgt_in == PAD)
        logits = h @ self.tgt_embed.weight.T
        return {"loss": F.cross_entropy(logits.reshape(-1, V), tgt_out.reshape(-1), label_smoothing=SMOOTHING,
                                        ignore_index=PAD)}


class TorchTranslator(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.src_embed, self.tgt_embed = torch.nn.Embedding(V, D), torch.nn.Embedding(V, D)
        for e in (self.src_embed, self.tgt_embed):  # as the DSL's nn.Embedding (the output projection is tied)
            torch.nn.init.normal_(e.weight, std=D ** -0.5)
        self.transformer = torch.nn.Transformer(D, H, L, L, FF, dropout=0.0, batch_first=True)
        self.register_buffer("pe", torch.from_numpy(nn.sinusoidal_table(MAX_LEN, D).astype(np.float32)))

    def forward(self, src, tgt_in, tgt_out):
        x = self.src_embed(src) * D ** 0.5 + self.pe[:src.shape[1]]
        y = self.tgt_embed(tgt_in) * D ** 0.5 + self.pe[:tgt_in.shape[1]]
        causal = torch.nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1])
        h = self.transformer(x, y, tgt_mask=causal, src_key_padding_mask=src == PAD,
                             memory_key_padding_mask=src == PAD, tgt_key_padding_mask=tgt_in == PAD)
        logits = h @ self.tgt_embed.weight.T
        return torch.nn.functional.cross_entropy(logits.reshape(-1, V), tgt_out.reshape(-1),
                                                 label_smoothing=SMOOTHING, ignore_index=PAD)


def batches(n, rng):
    out = []
    for _ in range(n):
        src = rng.integers(1, V, (ARGS.batch, ARGS.src_len))
        tgt = rng.integers(1, V, (ARGS.batch, ARGS.tgt_len + 1))
        src[::2, ARGS.src_len * 3 // 4:] = PAD  # every other sequence is padded
        tgt[::2, ARGS.tgt_len * 3 // 4:] = PAD
        out.append({"src": src, "tgt_in": tgt[:, :-1], "tgt_out": tgt[:, 1:]})
    return out


def main():
    schedule = train.Noam(D, warmup=4000)
    theirs = TorchTranslator()
    model = Translator()
    state = {k[len("transformer."):]: v for k, v in theirs.state_dict().items() if k.startswith("transformer.")}
    params = ag.weights.from_torch_transformer(state, model.transformer, at="transformer")
    params.update({f"{n}.weight": getattr(theirs, n).weight.detach().numpy().copy() for n in ("src_embed", "tgt_embed")})
    compiled = None if ARGS.no_compile else torch.compile(copy.deepcopy(theirs))

    half = ARGS.dtype != "float32"

    def torch_engine(model):
        opt = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: schedule(epoch + 1))

        def run(b):
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=getattr(torch, ARGS.dtype), enabled=half):
                loss = model(*(torch.from_numpy(b[k]) for k in ("src", "tgt_in", "tgt_out")))
            loss.backward()
            opt.step()
            sched.step()
            return loss.item()
        return run

    start = time.perf_counter()
    step = train.TrainStep(ag.trace(model), params, train.Adam(lr=schedule), target="llvm",
                           dtype=ARGS.dtype if half else None)
    print(f"model: d_model {D}, {H} heads, {L}+{L} layers, ff {FF}, vocab {V}; batch {ARGS.batch} x "
          f"{ARGS.src_len} -> {ARGS.tgt_len}; {ARGS.threads} threads; {ARGS.dtype}")
    print(f"attngraph build: {time.perf_counter() - start:.1f} s, {step.model.kernel_count} kernel calls a step")

    engines = {"attngraph (llvm)": step}
    if half:  # the float32 step: what the mixed-precision ones must beat, and their losses' reference
        engines["attngraph float32"] = train.TrainStep(ag.trace(model), params, train.Adam(lr=schedule), target="llvm")
    if ARGS.checkpoint:
        engines["attngraph (llvm, checkpoint)"] = train.TrainStep(ag.trace(model), params, train.Adam(lr=schedule),
                                                                  target="llvm", checkpoint=True)
    engines["torch eager"] = torch_engine(theirs)
    if compiled is not None:
        engines["torch.compile"] = torch_engine(compiled)
    rng = np.random.default_rng(0)
    for i, b in enumerate(batches(3, rng)):
        start = time.perf_counter()
        losses = {name: run(b) for name, run in engines.items()}
        ref = losses["attngraph float32" if half else "torch eager"]
        print(f"step {i + 1}: loss " + ", ".join(f"{name} {v:.6f}" for name, v in losses.items())
              + (" (relative to float32: " + ", ".join(f"{name} {v / ref - 1:+.1e}" for name, v in losses.items())
                 + ")" if half else "") + f" ({time.perf_counter() - start:.1f} s)")
        # bfloat16: 8 bits, the loss itself stored in it by attngraph
        assert all(abs(v - ref) <= (3e-2 if half else 1e-4) * ref for v in losses.values()), \
            "the runs disagree: nothing to compare"
    data = batches(4, rng)
    counter = {name: 0 for name in engines}

    def timed(name):
        def call():
            counter[name] += 1
            return engines[name](data[counter[name] % len(data)])
        return call
    ms = interleaved_ms({name: timed(name) for name in engines}, repeat=ARGS.repeat, block=2)
    tokens = ARGS.batch * ARGS.tgt_len
    # 6 FLOPs per weight and token: the encoder's weights and the cross-attention's K and V projections see the
    # source tokens, the rest of the decoder and the output projection (tied to the target embedding) the
    # target's; the embeddings' lookups are not products
    per_src = L * (4 * D * D + 2 * D * FF) + L * 2 * D * D
    per_tgt = L * (6 * D * D + 2 * D * FF) + D * V
    flops = 6 * (per_src * ARGS.batch * ARGS.src_len + per_tgt * ARGS.batch * ARGS.tgt_len)
    peak = peak_gflops(ARGS.threads)
    print(f"\n{flops / 1e9:.1f} GFLOP a step; this machine's peak {peak:.0f} GFLOP/s on {ARGS.threads} threads")
    print("\n| engine | ms / step | target positions / s | GFLOP/s | share of peak | ratio to torch eager |\n"
          "|---|---|---|---|---|---|")
    for name, t in ms.items():
        gf = flops / t / 1e6
        print(f"| {name} | {t:.1f} | {tokens / t * 1e3:.0f} | {gf:.0f} | {100 * gf / peak:.0f}% | "
              f"{t / ms['torch eager']:.2f} |")
    dims = {"b": ARGS.batch, "s": ARGS.src_len, "t": ARGS.tgt_len}
    for name, engine in engines.items():
        if isinstance(engine, train.TrainStep):
            plan = engine.model.memory(**dims)
            print(f"{name}: planned intermediate memory {plan.peak_bytes / 2**20:.0f} MiB in {len(plan.buffer_bytes)} "
                  f"buffers; activations the backward reads {activation_bytes(engine.model.graph, dims) / 2**20:.0f} MiB")

    b = data[0]
    scalars = {step.optimizer.scalar_name(k): np.asarray(v, np.float32) for k, v in step.optimizer.scalars(step.step + 1).items()}
    times = step.model.profile({**b, **step.state, **scalars}, repeat=3)  # the scalars in the master weights' float32
    total = sum(t.seconds for t in times)
    by_op: dict[str, float] = {}
    for t in times:
        by_op[t.op] = by_op.get(t.op, 0.0) + t.seconds
    print(f"\nattngraph kernels by op (sum of per-kernel medians {1e3 * total:.1f} ms):")
    for op, s in sorted(by_op.items(), key=lambda kv: -kv[1])[:ARGS.top]:
        print(f"  {op:24s} {1e3 * s:8.2f} ms  {100 * s / total:5.1f}%")


if __name__ == "__main__":
    main()
