"""``attngraph generate``: greedy or beam-search decoding from the command line.

Registered in ``attngraph.cli`` with ``main.add_command(generate)``."""

from __future__ import annotations

import functools
import time

import click

from . import models
from . import cli_common
from .cli_common import artifact_options, check_target, quantize_option, reject_given
from .generate import (
    CompiledStepper,
    DecoderInfo,
    MANIFEST,
    GenerationError,
    beam_search,
    compile_entries,
    capacity,
    check_search,
    greedy_search,
    is_generation_dir,
    trace_entries,
)
from .weights import init_params, load_weights


#: Errors whose message is the whole story, as one-line click errors: also ``GenerationError``.
user_errors = functools.partial(cli_common.user_errors, extra=(GenerationError,))


def parse_tokens(text: str) -> list[int]:
    """``"3 14 15"`` (or ``"3,14,15"``) -> ``[3, 14, 15]``; anything else is a clear error."""
    parts = text.replace(",", " ").split()
    if not parts or not all(p.lstrip("-").isdigit() for p in parts):
        raise click.BadParameter(f"expected token ids separated by spaces, got {text!r}", param_hint="--input")
    return [int(p) for p in parts]


def trained_model(path: str, weights_path=None):
    """(model, parameters, tokenizer) of the newest checkpoint of a directory ``attngraph train`` wrote (or of
    one ``checkpoint-STEP`` directory): its parts checked, weights that are not finite refused."""
    from .train import trainer
    if weights_path:
        raise click.BadParameter(f"{path} holds its trained weights", param_hint="--weights")
    try:
        module, params, tokenizer, _ = trainer.trained_model(path)
    except (trainer.CheckpointError, trainer.D.DataError) as e:
        raise click.ClickException(str(e)) from None
    return module, params, tokenizer


def text_ids(tokenizer, text: str, where: str) -> list[int]:
    """The ids of ``text``'s words; a word outside the vocabulary is an error that names it."""
    from .train.data import encode, unknown_words
    if not text.split():
        raise click.BadParameter("an empty --input", param_hint="--input")
    unknown = unknown_words(tokenizer, text)
    if unknown:
        raise click.BadParameter(f"{', '.join(map(repr, unknown))} not in the vocabulary of {where} "
                                 f"({tokenizer.get_vocab_size()} tokens)", param_hint="--input")
    return encode(tokenizer, text)


def check_request(module, sources, beam: int, max_len: int, cache_len: int | None, dtype: str) -> None:
    """Before building or allocating anything: a beam wider than the vocabulary, or a search whose
    state does not fit in memory, is a ``GenerationError`` (``generate.check_search``, on the entries'
    traced types: cheap)."""
    graphs = trace_entries(module, cache_len)
    info = DecoderInfo.from_model(module, graphs["decode_step"], graphs.get("encode_entry"))
    width = max(len(s) for s in sources)
    prefix = width if info.decoder_only else 1
    check_search(info, len(sources), beam, prefix, None if info.decoder_only else width, dtype,
                 capacity(info, prefix + max_len - 1))


@click.command()
@click.argument("model")
@click.option("--input", "inputs", multiple=True, required=True, metavar='"ID ID ..."',
              help="A source sentence (encoder-decoder) or a prompt (decoder-only) as token ids (as text for a DIR "
                   "that attngraph train wrote); repeat for a batch.")
@click.option("--beam", default=1, show_default=True, type=click.IntRange(1), help="Beam size; 1 is greedy decoding.")
@click.option("--max-len", "max_len", default=32, show_default=True, type=click.IntRange(1),
              help="Most tokens to generate per source.")
@click.option("--eos", "eos_id", type=int, default=2, show_default=True, help="End-of-sequence token id; -1 for none.")
@click.option("--bos", "bos_id", type=int, default=1, show_default=True,
              help="Token the decoder starts from (encoder-decoder models).")
@click.option("--alpha", default=0.6, show_default=True, help="Length penalty exponent: ((5+len)/6)^alpha.")
@click.option("--early-stop/--no-early-stop", "early_stop", default=False, show_default=True,
              help="Stop a source's search once it has BEAM finished hypotheses (faster; by default it goes on "
                   "while a live beam can still beat the finished ones: exact).")
@click.option("--nbest", is_flag=True, help="Print every beam, not only the best.")
@click.option("--target", default="numpy", show_default=True, callback=check_target, metavar="TARGET",
              help="numpy: the reference interpreter; llvm, cuda, vulkan: the entries compiled with TVM for that target.")
@click.option("--cache-len", "cache_len", type=click.IntRange(1),
              help="The most positions a decoder cache may grow to (default: the positions the model encodes); "
                   "the caches hold what the search has written, growing as it goes.")
@click.option("--save", "save_dir", type=click.Path(file_okay=False),
              help="With a compile target: keep the compiled entries in this directory (reuse it as MODEL).")
@click.option("--weights", "weights_path", type=click.Path(dir_okay=False),
              help=".safetensors or .npz weights; seeded random weights if omitted.")
@click.option("--seed", default=0, show_default=True, help="Seed for random weights.")
@click.option("--weight-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="With --target llvm: store the projection weights in this dtype (float16: half the bytes "
                   "per token, float16's rounding of every weight).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
              help="The model's weights, activations and caches in this type, its arithmetic in float32 (as "
                   "attngraph build --dtype); with --target numpy the interpreter rounds each value the same way.")
@quantize_option
@user_errors
def generate(model, inputs, beam, max_len, eos_id, bos_id, alpha, early_stop, nbest, target, cache_len,
             save_dir, weights_path, seed, weight_dtype, dtype, quantize):
    """Generate from MODEL (a model, a DIR of compiled entries from --save, or a DIR that attngraph train wrote:
    then --input is text and so is the output) for each --input."""
    from .train.data import decode as words
    from .train.trainer import is_training_dir
    tokenizer = None
    if is_training_dir(model):
        module, params, tokenizer = trained_model(model, weights_path)
        sources = [text_ids(tokenizer, text, model) for text in inputs]
    else:
        sources = [parse_tokens(text) for text in inputs]
    eos = None if eos_id < 0 else eos_id
    start = time.perf_counter()
    if is_generation_dir(model):
        if weights_path:
            raise click.BadParameter("compiled entries carry their weights; rebuild them to change them",
                                     param_hint="--weights")
        artifact_options(model, ["target", "cache_len", "weight_dtype", "dtype", "quantize", "seed", "save_dir"],
                         MANIFEST)
        stepper = CompiledStepper(model)
    else:
        if tokenizer is None:
            module = models.get(model)
        check_request(module, sources, beam, max_len, cache_len, dtype)
        if tokenizer is None:
            params = load_weights(weights_path) if weights_path else init_params(module, seed)
        if target == "numpy":
            reject_given(["save_dir"], "--save keeps the compiled entries: it needs a compile target "
                                       "(--target llvm, cuda or vulkan)")
            reject_given(["weight_dtype", "quantize"], "this option applies to a compile target (--target llvm), "
                                                       "not numpy", same_as={"weight_dtype": "float32", "quantize": None})
        if save_dir:
            CompiledStepper.build(module, params, save_dir, target, cache_len=cache_len, weight_dtype=weight_dtype,
                                  dtype=dtype, quantize=quantize)
            stepper = CompiledStepper(save_dir)
        else:
            stepper = compile_entries(module, params, target, cache_len=cache_len, weight_dtype=weight_dtype,
                                      dtype=dtype, quantize=quantize)
    ready = time.perf_counter()
    if beam == 1:
        results = [[h] for h in greedy_search(stepper, sources, max_len, eos_id=eos, bos_id=bos_id, alpha=alpha)]
    else:
        results = beam_search(stepper, sources, beam, max_len, eos_id=eos, bos_id=bos_id, alpha=alpha,
                              early_stopping=early_stop)
    done = time.perf_counter()
    for i, hyps in enumerate(results):
        for rank, h in enumerate(hyps if nbest else hyps[:1]):
            label = f"{i}" if not nbest else f"{i}.{rank}"
            end = "" if h.finished else "  (no EOS)"
            out = ' '.join(map(str, h.tokens)) if tokenizer is None else words(tokenizer, h.tokens)
            click.echo(f"{label}: {out}  [log-prob {h.log_prob:.4f}, score {h.score:.4f}]{end}")
    tokens = sum(len(h[0].tokens) for h in results)
    click.echo(f"{stepper.info.name}: {len(sources)} source(s), beam {beam}, cache {stepper.info.cache_len}: "
               f"setup {ready - start:.2f} s, search {done - ready:.2f} s ({tokens} tokens)", err=True)
