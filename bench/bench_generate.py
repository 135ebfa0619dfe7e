"""Per-token decoding latency of transformer-base: attngraph vs PyTorch.

    python bench/bench_generate.py [--threads 2] [--batch 1 8] [--prefix 1 64] [--memory 128]
                                   [--compiled] [--repeat 5]

Each engine decodes one token per step for a batch of sources with a memory of ``--memory``
positions, at each prefix length of ``--prefix`` (the step's position):

- ``attngraph (interpreter)``: the decode-step entry on the NumPy interpreter (float32);
- ``attngraph (llvm)``: the entries compiled with TVM (``--compiled``; the build takes seconds);
- ``attngraph (llvm, float16 weights)``: the same with the projection weights stored in float16
  (``--float16-weights``): half the bytes a step reads, log-probs within about 1e-2 of float32;
- ``torch TransformerDecoder``: ``torch.nn.TransformerDecoder`` recomputing the whole prefix each step;
- ``torch KV cache``: a KV-cached decoder written here with the same weights as attngraph (its
  log-probs are checked against the interpreter's before timing).

All run on the same number of threads.  Printed: the median milliseconds per step, and each
engine's ratio to the KV-cached PyTorch decoder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prefix", type=int, nargs="+", default=[1, 64])
    p.add_argument("--memory", type=int, default=128, help="source (memory) length")
    p.add_argument("--repeat", type=int, default=5, help="timed steps per measurement (median taken)")
    p.add_argument("--compiled", action="store_true", help="also build and time the TVM-compiled entries")
    p.add_argument("--float16-weights", action="store_true",
                   help="with --compiled: also the entries with projection weights stored in float16")
    p.add_argument("--no-interpreter", action="store_true", help="skip the (slow) interpreter")
    p.add_argument("--model", default="transformer-base")
    return p.parse_args()


ARGS = parse_args()
# Thread counts must be set before NumPy, torch and TVM start their pools.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)
# TVM's workers spin a while after each call (as OpenMP's do): each engine is timed after a pause
# (timing.median_ms's settle), so no engine runs against another one's spinning threads.  Turning the
# spin off instead (TVM_THREAD_POOL_SPIN_COUNT=0) costs a thread wake-up per kernel: about 2 ms per step.

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from timing import median_ms  # noqa: E402
import attngraph as ag  # noqa: E402
from attngraph import generate as G  # noqa: E402

torch.set_num_threads(ARGS.threads)


# -- the KV-cached PyTorch decoder, on attngraph's weights -----------------------------------------

class TorchCachedDecoder:
    """The Transformer's decoder as a KV-cached step in plain torch ops, on attngraph's weights
    (``Linear`` weights are stored (in, out): ``x @ W + b``).  Post-LN, as the paper."""

    def __init__(self, model, params):
        self.m = model
        self.p = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}
        self.h, self.d = model.decoder.layers[0].self_attn.num_heads, model.d_model
        self.pe = torch.from_numpy(ag.nn.sinusoidal_table(model.max_len, model.d_model).astype(np.float32))

    def lin(self, x, name):
        return torch.addmm(self.p[name + ".bias"], x.reshape(-1, x.shape[-1]), self.p[name + ".weight"]).reshape(
            *x.shape[:-1], -1)

    def ln(self, x, name):
        return torch.nn.functional.layer_norm(x, (self.d,), self.p[name + ".weight"], self.p[name + ".bias"])

    def heads(self, x):  # (b, n, d) -> (b, h, n, hd)
        return x.reshape(x.shape[0], x.shape[1], self.h, -1).transpose(1, 2)

    def start(self, memory, src_pad, cache_len):
        """Cross K/V per layer, and empty self-attention caches (b, h, cache_len, hd)."""
        b = memory.shape[0]
        self.mask = src_pad[:, None, None, :]
        self.cross, self.cache = [], []
        for i in range(len(self.m.decoder.layers)):
            pre = f"decoder.layers.{i}.cross_attn"
            self.cross.append((self.heads(self.lin(memory, pre + ".k_proj")), self.heads(self.lin(memory, pre + ".v_proj"))))
            self.cache.append((torch.zeros(b, self.h, cache_len, self.d // self.h),
                               torch.zeros(b, self.h, cache_len, self.d // self.h)))

    def step(self, tokens, pos):
        """Log-probs (b, vocab) of the next token after ``tokens`` (b, 1) at position ``pos``."""
        sdpa = torch.nn.functional.scaled_dot_product_attention
        x = self.p["src_embed.weight"][tokens] * self.d ** 0.5 + self.pe[pos]
        for i, (k_cache, v_cache) in enumerate(self.cache):
            pre = f"decoder.layers.{i}"
            q = self.heads(self.lin(x, pre + ".self_attn.q_proj"))
            k_cache[:, :, pos:pos + 1] = self.heads(self.lin(x, pre + ".self_attn.k_proj"))
            v_cache[:, :, pos:pos + 1] = self.heads(self.lin(x, pre + ".self_attn.v_proj"))
            a = sdpa(q, k_cache[:, :, :pos + 1], v_cache[:, :, :pos + 1])
            x = self.ln(x + self.lin(a.transpose(1, 2).reshape(x.shape), pre + ".self_attn.out_proj"), pre + ".norm1")
            q = self.heads(self.lin(x, pre + ".cross_attn.q_proj"))
            ck, cv = self.cross[i]
            a = sdpa(q, ck, cv, attn_mask=~self.mask)
            x = self.ln(x + self.lin(a.transpose(1, 2).reshape(x.shape), pre + ".cross_attn.out_proj"), pre + ".norm2")
            f = self.lin(torch.relu(self.lin(x, pre + ".ffn.linear1")), pre + ".ffn.linear2")
            x = self.ln(x + f, pre + ".norm3")
        return torch.log_softmax(x[:, -1] @ self.p["src_embed.weight"].T, dim=-1)


def torch_full_decoder(model):
    """``torch.nn.TransformerDecoder`` of the same shape (its own random weights): recomputes the prefix."""
    layer = model.decoder.layers[0]
    dec = torch.nn.TransformerDecoder(
        torch.nn.TransformerDecoderLayer(model.d_model, layer.self_attn.num_heads, layer.ffn.linear1.out_features,
                                         dropout=0.0, batch_first=True),
        len(model.decoder.layers)).eval()
    embed = torch.randn(model.tgt_vocab, model.d_model) * model.d_model ** -0.5
    return dec, embed


def main():
    model = ag.models.get(ARGS.model)
    cache_len = max(max(ARGS.prefix) + 1, 4)  # room for the 3 checked steps
    print(f"{ARGS.model}: memory {ARGS.memory}, {ARGS.threads} threads, cache {cache_len}, "
          f"median of {ARGS.repeat} steps", flush=True)
    params = ag.init_params(model, seed=0)
    rows = []
    steppers = {}
    if not ARGS.no_interpreter:
        steppers["attngraph (interpreter)"] = G.InterpreterStepper(model, params, cache_len)
    if ARGS.compiled:
        out_dir = tempfile.mkdtemp(prefix="bench-generate-")
        start = time.perf_counter()
        G.CompiledStepper.build(model, params, out_dir, "llvm", cache_len=cache_len)
        print(f"built the entries in {time.perf_counter() - start:.0f} s", flush=True)
        steppers["attngraph (llvm)"] = G.CompiledStepper(out_dir)
        if ARGS.float16_weights:
            out16 = tempfile.mkdtemp(prefix="bench-generate-f16-")
            G.CompiledStepper.build(model, params, out16, "llvm", cache_len=cache_len, weight_dtype="float16")
            steppers["attngraph (llvm, float16 weights)"] = G.CompiledStepper(out16)
    encoder = ag.trace(model, method="encode_entry")
    cached = TorchCachedDecoder(model, params)
    full, embed = torch_full_decoder(model)
    rng = np.random.default_rng(0)
    for batch in ARGS.batch:
        src = rng.integers(1, model.src_vocab, (batch, ARGS.memory))
        for name, stepper in steppers.items():
            state = stepper.encode(src)
            # One step first: from then on a compiled stepper's caches are device tensors, as in a real
            # search (the encoder hands over host zeros, uploaded on the first step only).
            _, state = stepper.step(rng.integers(1, model.tgt_vocab, (batch, 1)), 0, state)
            for prefix in ARGS.prefix:
                tokens = rng.integers(1, model.tgt_vocab, (batch, 1))
                _, state = stepper.step(tokens, prefix, state)  # the caches grown to this position first
                ms = median_ms(lambda: stepper.step(tokens, prefix, state), ARGS.repeat)
                rows.append((batch, prefix, name, ms))
                print(f"  batch {batch} prefix {prefix:4d}  {name:26s} {ms:8.2f} ms/step", flush=True)
        out = ag.reference.run(encoder, {"src": src}, {k: params[k] for k in encoder.params})
        memory, src_pad = torch.from_numpy(out["memory"]), torch.from_numpy(out["src_pad"])
        with torch.inference_mode():
            cached.start(memory, src_pad, cache_len)
            check_against_interpreter(model, params, cached, src, cache_len)
            cached.start(memory, src_pad, cache_len)
            for prefix in ARGS.prefix:
                tokens = torch.from_numpy(rng.integers(1, model.tgt_vocab, (batch, 1)))
                ms = median_ms(lambda: cached.step(tokens, prefix), ARGS.repeat)
                rows.append((batch, prefix, "torch KV cache", ms))
                print(f"  batch {batch} prefix {prefix:4d}  {'torch KV cache':26s} {ms:8.2f} ms/step", flush=True)
                tgt = torch.from_numpy(rng.integers(1, model.tgt_vocab, (batch, prefix)))
                causal = torch.nn.Transformer.generate_square_subsequent_mask(prefix)

                def full_step():
                    y = full(embed[tgt], memory, tgt_mask=causal, memory_key_padding_mask=src_pad)
                    return torch.log_softmax(y[:, -1] @ embed.T, dim=-1)
                ms = median_ms(full_step, ARGS.repeat)
                rows.append((batch, prefix, "torch TransformerDecoder", ms))
                print(f"  batch {batch} prefix {prefix:4d}  {'torch TransformerDecoder':26s} {ms:8.2f} ms/step", flush=True)
    print("\nmedian ms per step (ratio to the KV-cached torch decoder):")
    for batch in ARGS.batch:
        for prefix in ARGS.prefix:
            here = {n: ms for b, p, n, ms in rows if b == batch and p == prefix}
            base = here["torch KV cache"]
            cells = "  ".join(f"{n} {ms:.2f} ({ms / base:.2f}x)" for n, ms in here.items())
            print(f"  batch {batch} prefix {prefix}: {cells}")


def check_against_interpreter(model, params, cached, src, cache_len, steps=3):
    """The torch KV-cached decoder's log-probs equal the interpreter's decode steps (float32)."""
    stepper = G.InterpreterStepper(model, params, cache_len)
    state = stepper.encode(src)
    rng = np.random.default_rng(1)
    for pos in range(steps):
        tokens = rng.integers(1, model.tgt_vocab, (len(src), 1))
        want, state = stepper.step(tokens, pos, state)
        got = cached.step(torch.from_numpy(tokens), pos).numpy()
        err = float(np.abs(got - want).max())
        if err > 1e-3:
            raise SystemExit(f"the torch KV-cached decoder differs from attngraph at step {pos}: max |diff| {err:.3g}")


if __name__ == "__main__":
    main()
