"""``attngraph embed``: sentence embeddings from the command line (registered by ``cli.py``)."""

from __future__ import annotations

import click
import numpy as np

from .cli_common import quantize_option, user_errors


@click.command()
@click.argument("sentences", nargs=-1)
@click.option("--model", default="minilm-l6", show_default=True,
              help="minilm-l6, or a Hugging Face BERT checkpoint directory (config.json, model.safetensors, "
                   "tokenizer.json).")
@click.option("--file", "file_", type=click.File("r"), help="Read sentences from this file, one per line ('-': stdin).")
@click.option("--target", type=click.Choice(["numpy", "llvm"]), default="llvm", show_default=True,
              help="numpy: the reference interpreter; llvm: compiled with TVM for this CPU.")
@click.option("-O", "--opt-level", "opt_level", type=click.IntRange(0, 3), default=3, show_default=True)
@click.option("--max-length", type=int, default=None,
              help="Truncate sentences to this many tokens (default: the model's, 256 for minilm-l6).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@quantize_option
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False),
              help="Write the embeddings, (sentences, dim) float32, to this .npy.")
@user_errors
def embed(sentences, model, file_, target, opt_level, max_length, batch_size, quantize, output_path):
    """Embed SENTENCES (mean-pooled, normalized sentence embeddings) and print, for two or more,
    their cosine similarities.

        attngraph embed "A man is eating food." "A man is eating a piece of bread."
    """
    from .embed import SentenceEncoder
    sentences = list(sentences)
    if file_ is not None:
        sentences += [line.rstrip("\n") for line in file_ if line.strip()]
    if not sentences:
        raise click.UsageError("give sentences to embed as arguments or with --file")
    encoder = SentenceEncoder.from_pretrained(model, target=target, opt_level=opt_level, max_length=max_length,
                                              quantize=quantize)
    tokens = encoder.tokenize(sentences)
    for i in tokens.truncated:
        click.echo(f"note: sentence {i} truncated to {encoder.max_length} tokens", err=True)
    emb = encoder.encode(sentences, batch_size=batch_size)
    for i, (s, e) in enumerate(zip(sentences, emb)):
        head = " ".join(f"{v:+.4f}" for v in e[:4])
        click.echo(f"[{i}] {tokens.lengths[i]:3d} tokens  [{head} ...]  {s if len(s) <= 60 else s[:57] + '...'}")
    if len(sentences) > 1:
        sim = emb @ emb.T
        click.echo("cosine similarity:")
        click.echo("      " + "".join(f"{j:>8d}" for j in range(len(sentences))))
        for i, row in enumerate(sim):
            click.echo(f"  [{i}] " + "".join(f"{v:8.4f}" for v in row))
    if output_path:
        np.save(output_path, emb)
        click.echo(f"wrote {output_path} ({emb.shape[0]} x {emb.shape[1]} float32)", err=True)
