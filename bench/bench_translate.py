"""Translation decoding, end to end: attngraph against CTranslate2 on the same transformer-base weights.

    python bench/bench_translate.py [--threads 2] [--batch 1 8 32] [--beam 1 4] [--src-len 32]
                                    [--tgt-len 32] [--repeat 3] [--no-variable] [--quantize int8]

Needs ``pip install ctranslate2``.  One model, random weights (seed 0), written into a CTranslate2 model through
its spec API (``ct2_model.py``); its log-probs are checked against attngraph's interpreter first.

- Fixed lengths: ``--src-len`` source tokens, exactly ``--tgt-len`` target tokens (attngraph without an EOS,
  CTranslate2 with ``min_decoding_length = max_decoding_length``), greedy and beam search at each batch.
- Variable (``--no-variable`` skips it): sources of 8 to 2 x ``--src-len`` tokens in one batch, EOS allowed, up to
  ``2 x --tgt-len`` tokens.  Random weights never pick EOS (each source repeats one token: tried scaling EOS's
  row, shifting the last norm's bias towards it, aligning it with a position's encoding), so this run measures
  the padding and the longer caches; finished hypotheses leaving the batch are tested, not timed here.
  Length penalty 0 (both rank by the sum of log-probs).

``--quantize int8``: both engines in int8 (attngraph's entries built with ``quantize="int8"``, CTranslate2 with
``compute_type="int8"``: both quantize the weights per output channel and the activations per row), each engine's
error printed first: the max abs difference of its log-probs from the float32 interpreter's over the same pairs
(CTranslate2's ``score_batch``; attngraph's decode steps fed the target tokens).  The tokens may then differ.

Both engines get the same sources and threads; each case runs both, interleaved in rounds, and prints the
medians, ms per generated position, the ratio attngraph / CTranslate2 (below 1: attngraph faster) and whether
the tokens are equal.  The memory floor of a step: the bytes it must read (the decoder's weights, the
cross-attention keys and values, the self-attention caches up to the position reached) over this machine's
copy bandwidth (torch's ``copy_`` of 512 MiB on the same threads, counting read and write bytes as STREAM does),
measured in rounds alternating with the step.
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
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--beam", type=int, nargs="+", default=[1, 4])
    p.add_argument("--src-len", type=int, default=32)
    p.add_argument("--tgt-len", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3, help="rounds per case (median taken)")
    p.add_argument("--no-variable", action="store_true", help="skip the run with variable lengths and EOS")
    p.add_argument("--model", default="transformer-base")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: both engines' projections in int8")
    return p.parse_args()


ARGS = parse_args()
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TVM_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ctranslate2  # noqa: E402
from ct2_model import to_ids, to_tokens, write_model  # noqa: E402
from timing import median_ms  # noqa: E402

import attngraph as ag  # noqa: E402
from attngraph import generate as G  # noqa: E402
from attngraph.backends.tvm.targets.cpu.isa import cpu_name  # noqa: E402

BOS, EOS = 1, 2


class Copy:
    """A large copy (read + write) on ``threads`` threads: ``seconds()`` times one, ``bandwidth(t)`` is the bytes
    per second of a copy that took ``t`` (read and write counted, as STREAM does)."""

    def __init__(self, threads: int):
        import torch
        torch.set_num_threads(threads)
        self.src = torch.ones(128 << 20)  # 512 MiB
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)

    def seconds(self) -> float:
        start = time.perf_counter()
        self.dst.copy_(self.src)
        return time.perf_counter() - start

    def bandwidth(self, seconds: float) -> float:
        return 2 * self.src.numel() * 4 / seconds


def step_bytes(model, params, rows: int, src_len: int, position: int, matrix_bytes: int = 4) -> int:
    """Bytes a decode step at ``position`` must read: the decoder's weights (the output projection included,
    the cross-attention K/V projections excluded: they run once per source; ``matrix_bytes`` per value of a 2-D
    weight: 1 in int8), every layer's cross K/V of ``src_len`` positions and self-attention K/V of ``position + 1``,
    for ``rows`` rows."""
    def nbytes(v):
        return v.size * (matrix_bytes if v.ndim == 2 else v.itemsize)
    weights = sum(nbytes(v) for k, v in params.items()
                  if k.startswith("decoder.") and ".cross_attn.k_proj" not in k and ".cross_attn.v_proj" not in k)
    weights += nbytes(params["src_embed.weight"])  # the (shared) output projection
    layers, d = len(model.decoder.layers), model.d_model
    return weights + 4 * rows * layers * 2 * d * (src_len + position + 1)


class Attngraph:
    def __init__(self, stepper):
        self.stepper = stepper

    def translate(self, sources, beam, max_len, eos):
        hyps = G.generate(self.stepper, sources, beam=beam, max_len=max_len, eos_id=EOS if eos else None,
                          bos_id=BOS, alpha=0.0)
        return [[t for t in h.tokens if t != EOS] for h in hyps]


class CTranslate2:
    def __init__(self, path, threads, compute_type="float32"):
        self.translator = ctranslate2.Translator(path, device="cpu", compute_type=compute_type, intra_threads=threads)

    def translate(self, sources, beam, max_len, eos):
        out = self.translator.translate_batch([to_tokens(s) for s in sources], beam_size=beam,
                                              max_decoding_length=max_len, min_decoding_length=0 if eos else max_len,
                                              length_penalty=0.0, max_batch_size=0)
        return [to_ids(r.hypotheses[0]) for r in out]


def scored_pairs(model, params):
    """(sources, targets, the float32 interpreter's log-prob of each target token and EOS) of a few pairs."""
    rng = np.random.default_rng(3)
    src, tgt = rng.integers(4, model.src_vocab, (2, 9)), rng.integers(4, model.tgt_vocab, (2, 5))
    g = ag.trace(model)
    out = ag.reference.run(g, {"src": src, "tgt": np.concatenate([np.full((2, 1), BOS), tgt], 1)},
                           {k: params[k] for k in g.params})["log_probs"]
    return src, tgt, np.take_along_axis(out, np.concatenate([tgt, np.full((2, 1), EOS)], 1)[..., None], -1)[..., 0]


def ct2_error(pairs, path, threads, compute_type="float32"):
    """The max abs difference of CTranslate2's per-token log-probs of ``pairs`` from the interpreter's."""
    src, tgt, want = pairs
    scores = ctranslate2.Translator(path, intra_threads=threads, compute_type=compute_type).score_batch(
        [to_tokens(s) for s in src], [to_tokens(t) for t in tgt])
    return max(float(np.abs(np.asarray(s.log_probs) - w).max()) for s, w in zip(scores, want))


def stepper_error(pairs, stepper):
    """The same for attngraph's decode steps fed BOS and the target tokens."""
    src, tgt, want = pairs
    state, got = stepper.encode(src), []
    for pos, tokens in enumerate(np.concatenate([np.full((len(tgt), 1), BOS), tgt], 1).T):
        log_probs, state = stepper.step(tokens[:, None], pos, state)
        got.append(log_probs)
    ids = np.concatenate([tgt, np.full((len(tgt), 1), EOS)], 1)
    return float(np.abs(np.take_along_axis(np.stack(got, 1), ids[..., None], -1)[..., 0] - want).max())


def run_case(engines, sources, beam, max_len, eos, repeat):
    """({engine: median ms}, {engine: tokens}) for one translation call of ``sources``, interleaved rounds."""
    tokens = {name: e.translate(sources, beam, max_len, eos) for name, e in engines.items()}  # warm-up
    times = {name: [] for name in engines}
    for _ in range(repeat):
        for name, e in engines.items():
            time.sleep(0.2)  # the other engine's worker threads stop spinning
            start = time.perf_counter()
            e.translate(sources, beam, max_len, eos)
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: float(np.median(t)) for name, t in times.items()}, tokens


def main():
    model = ag.models.get(ARGS.model)
    params = ag.init_params(model, seed=0)
    quantize = None if ARGS.quantize == "none" else ARGS.quantize
    compute_type = quantize or "float32"
    print(f"{ARGS.model}, {compute_type}, {ARGS.threads} threads, {cpu_name()}; ctranslate2 {ctranslate2.__version__}",
          flush=True)
    work = tempfile.mkdtemp(prefix="bench-translate-")
    variable = not ARGS.no_variable
    ct2_dir = write_model(model, params, os.path.join(work, "ct2"))
    pairs = scored_pairs(model, params)
    err = ct2_error(pairs, ct2_dir, ARGS.threads)
    if err > 1e-4:
        raise SystemExit(f"CTranslate2's float32 log-probs differ from attngraph's interpreter by {err:.3g}")
    start = time.perf_counter()
    ours = os.path.join(work, "attngraph")
    G.CompiledStepper.build(model, params, ours, "llvm", quantize=quantize)
    print(f"CTranslate2 float32 log-probs within {err:.2g} of the interpreter; attngraph entries built in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    engines = {"attngraph": Attngraph(G.CompiledStepper(ours)),
               "ctranslate2": CTranslate2(ct2_dir, ARGS.threads, compute_type)}
    if quantize:
        print(f"{compute_type} log-probs against the float32 interpreter's (max abs): attngraph "
              f"{stepper_error(pairs, engines['attngraph'].stepper):.2g}, CTranslate2 "
              f"{ct2_error(pairs, ct2_dir, ARGS.threads, compute_type):.2g}", flush=True)
    copy = Copy(ARGS.threads)
    print(f"copy bandwidth {copy.bandwidth(min(copy.seconds() for _ in range(7))) / 1e9:.1f} GB/s (best of 7)\n",
          flush=True)
    rng = np.random.default_rng(0)
    rows = []
    header = f"{'case':32s} {'attngraph ms':>13s} {'CTranslate2 ms':>15s} {'ratio':>6s}  {'ms/position':>18s}  tokens"
    print(header)
    cases = [("fixed", b, k) for b in ARGS.batch for k in ARGS.beam]
    if variable:
        cases += [("variable", max(ARGS.batch), k) for k in ARGS.beam]
    for kind, batch, beam in cases:
        if kind == "fixed":
            sources = rng.integers(4, model.src_vocab, (batch, ARGS.src_len)).tolist()
            max_len, eos = ARGS.tgt_len, False
        else:
            lengths = rng.integers(8, 2 * ARGS.src_len + 1, batch)
            sources = [rng.integers(4, model.src_vocab, n).tolist() for n in lengths]
            max_len, eos = 2 * ARGS.tgt_len, True
        ms, tokens = run_case(engines, sources, beam, max_len, eos, ARGS.repeat)
        same = sum(a == b for a, b in zip(tokens["attngraph"], tokens["ctranslate2"]))
        steps = max(len(t) for t in tokens["attngraph"])
        label = f"{kind} batch {batch} {'greedy' if beam == 1 else f'beam {beam}'}"
        ratio = ms["attngraph"] / ms["ctranslate2"]
        per = f"{ms['attngraph'] / steps:.2f} / {ms['ctranslate2'] / steps:.2f}"
        note = f"{same}/{batch} equal" + ("" if kind == "fixed" else
                                           f", lengths {min(map(len, tokens['attngraph']))}-{steps}")
        print(f"{label:32s} {ms['attngraph']:13.1f} {ms['ctranslate2']:15.1f} {ratio:6.2f}  {per:>18s}  {note}",
              flush=True)
        rows.append((label, ms, ratio))
    # This machine's bandwidth drifts (a shared host): the step and the copy alternate, 20 rounds of a copy and
    # five steps, and each round's ratio is taken; the median round is printed.
    position = ARGS.tgt_len // 2
    nbytes = step_bytes(model, params, 1, ARGS.src_len, position, 1 if quantize else 4)
    stepper = engines["attngraph"].stepper
    state = stepper.encode(rng.integers(4, model.src_vocab, (1, ARGS.src_len)))
    token = np.array([[5]])
    for pos in range(position + 1):
        _, state = stepper.step(token, pos, state)
    rounds = []
    for _ in range(20):
        bandwidth = copy.bandwidth(copy.seconds())
        step = median_ms(lambda: stepper.step(token, position, state), 5)
        rounds.append((1e3 * nbytes / bandwidth / step, step, bandwidth))
    rounds.sort()
    share, got, bandwidth = rounds[len(rounds) // 2]
    print(f"\nbatch-1 decode step at position {position}: {got:.2f} ms; its memory floor {1e3 * nbytes / bandwidth:.2f} "
          f"ms ({nbytes / 1e6:.0f} MB at {bandwidth / 1e9:.1f} GB/s, the copy beside it): {100 * share:.0f}% of the "
          f"floor's speed (the median of 20 rounds; {100 * rounds[0][0]:.0f}-{100 * rounds[-1][0]:.0f}%)")


if __name__ == "__main__":
    main()
