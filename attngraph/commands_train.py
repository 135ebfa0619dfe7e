"""``attngraph train``: teach a zoo encoder-decoder to translate (``attngraph.train.trainer``)."""

from __future__ import annotations

import functools
import os
import sys

import click

from .cli_common import check_target, reject_given, user_errors
from .files import DirectoryBusy
from .generate import GenerationError
from .train.checkpoint import CheckpointError
from .train.data import TASKS, TOKENIZERS, DataError
from .train.objective import NotATokenModel
from .train.schedules import SCHEDULES
from .train.trainer import MAX_SKIPPED, NONFINITE


#: the options that make a run what it is: saved in its config, not changed by --resume
RUN_OPTIONS = ["valid", "batch_tokens", "warmup", "schedule", "lr", "clip_norm", "tokenizer", "vocab_size", "checkpoint",
               "label_smoothing", "dropout", "seed", "target", "valid_every", "max_len", "dtype"]


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def progress_line(line: dict, steps: int) -> str:
    valid = f"  valid {line['valid_loss']:.4f}" if line.get("valid_loss") is not None else ""
    skipped = f"  ({line['skipped']} step(s) left out)" if line.get("skipped") else ""
    return (f"step {line['step']}/{steps}  loss {line['loss']:.4f}{valid}  lr {line['lr']:.2e}  "
            f"grad norm {line['grad_norm']:.3g}{skipped}  "
            f"{line['tokens_per_s']:.0f} tokens/s  {_clock(line['seconds'])} elapsed, {_clock(line['seconds_left'])} left")


@click.command()
@click.argument("model", required=False)
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False),
              help="The directory to train into (new or empty; with --resume: the resumed run's by default).")
@click.option("--task", type=click.Choice(sorted(TASKS)), help="Built-in data made on the fly (numbers: digits to "
                                                                "English words), with a fixed validation set.")
@click.option("--data", type=click.Path(dir_okay=False), help="Parallel text: one 'source<TAB>target' pair a line.")
@click.option("--valid", type=click.Path(dir_okay=False), help="Validation pairs, as --data.")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True, help="Steps to train to.")
@click.option("--batch-tokens", type=click.IntRange(min=16), default=2048, show_default=True,
              help="Tokens a batch (sentences of similar length together).")
@click.option("--lr-warmup", "warmup", type=click.IntRange(min=1), default=4000, show_default=True,
              help="Warm-up steps of the learning-rate schedule.")
@click.option("--lr-schedule", "schedule", type=click.Choice(SCHEDULES), default="noam", show_default=True,
              help="noam: the paper's (warm-up, then 1/sqrt(step)); cosine: warm-up, then a cosine decay to 0 at "
                   "--steps.")
@click.option("--lr", type=click.FloatRange(0, min_open=True),
              help="The peak learning rate (at the end of the warm-up). Default: the paper's, "
                   "d_model^-0.5 warmup^-0.5.")
@click.option("--clip-norm", type=click.FloatRange(0, min_open=True),
              help="Clip the gradients to this global norm (as torch.nn.utils.clip_grad_norm_).")
@click.option("--tokenizer", type=click.Choice(TOKENIZERS), default="word", show_default=True,
              help="The vocabulary, one for both sides: a token per word, or byte-pair merges learned from the data.")
@click.option("--vocab-size", type=click.IntRange(min=8), default=8000, show_default=True,
              help="Tokens of a --tokenizer bpe vocabulary (the specials included).")
@click.option("--checkpoint", is_flag=True,
              help="Recompute each layer's values in the backward instead of keeping them from the forward: "
                   "less memory, about a fifth more time a step.")
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the weights, the batches and dropout.")
@click.option("--target", default="llvm", show_default=True, callback=check_target,
              help="Where the steps run: llvm, vulkan, cuda (with a GPU), or numpy (the interpreter, slow).")
@click.option("--valid-every", type=click.IntRange(min=1), default=100, show_default=True,
              help="Steps between reports (validation loss; the directory is saved then).")
@click.option("--max-len", type=click.IntRange(min=2), default=128, show_default=True,
              help="Tokens a side at most: longer pairs are left out (and counted).")
@click.option("--nonfinite", type=click.Choice(NONFINITE), default="stop", show_default=True,
              help="A step whose loss or gradients are not finite is never applied; stop: the run saves the state "
                   f"before it and stops (exit 1); skip: the step is left out (at most {MAX_SKIPPED} in a row).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="bfloat16: mixed precision, the forward and the backward in bfloat16, the weights, their "
                   "gradients and Adam's state in float32 (llvm).")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, exists=True),
              help="Go on with the run saved in this directory (to --steps), as if never interrupted.")
@user_errors
def train(model, out_dir, task, data, valid, steps, batch_tokens, warmup, schedule, lr, clip_norm, tokenizer,
          vocab_size, checkpoint, label_smoothing, dropout, seed, target, valid_every, max_len, dtype, nonfinite,
          resume_dir):
    """Train MODEL (a zoo encoder-decoder: transformer-small, transformer-base, ...) on --task or --data into DIR.

    DIR holds the run's newest checkpoint (DIR/checkpoint-STEP: config, vocabulary, parameters, optimizer state
    and log, saved whole at each report); DIR belongs to one run at a time.  Ctrl-C or SIGTERM saves after the
    step in progress and stops (exit 130 or 143); --resume DIR goes on from the newest checkpoint."""
    from .train.checkpoint import RunDirectory
    from .train.trainer import RunConfig, Trainer, TrainingStopped, load_run
    run_dir = None
    try:
        if resume_dir:
            given = [name for name, value in (("MODEL", model), ("--task", task), ("--data", data)) if value]
            if given:
                raise click.UsageError(f"--resume goes on with the saved run's model and data; drop {', '.join(given)}")
            out_dir = out_dir or resume_dir
            if os.path.abspath(out_dir) != os.path.abspath(resume_dir):
                raise click.BadParameter("a resumed run trains on in its own directory", param_hint="-o")
            reject_given(RUN_OPTIONS, "--resume goes on with the saved run's settings (a run is a function of them); "
                                      "start a new run with -o to change one")
            run_dir = RunDirectory(resume_dir, new=False)  # held from here to the end
            try:
                config = load_run(run_dir.checkpoint.path)
            except BaseException:
                run_dir.close()
                raise
            if config.schedule == "cosine" and steps != config.steps:
                click.echo(f"note: the cosine schedule now decays to 0 at step {steps}, not {config.steps}: from here on "
                           f"the rate is the longer schedule's", err=True)
            config.steps = steps
        else:
            if not model or not out_dir:
                raise click.UsageError("give MODEL and -o DIR (or --resume DIR)")
            config = RunConfig(model=model, task=task, data=data, valid=valid, steps=steps, batch_tokens=batch_tokens,
                               warmup=warmup, schedule=schedule, lr=lr, clip_norm=clip_norm, checkpoint=checkpoint,
                               tokenizer=tokenizer, vocab_size=vocab_size,
                               label_smoothing=label_smoothing, dropout=dropout, seed=seed,
                               target=target, valid_every=valid_every,
                               max_len=max_len, dtype=dtype)
            run_dir = RunDirectory(out_dir, new=True)  # held from here: a second run into it fails at once
        with run_dir:
            trainer = Trainer(config, run_dir, nonfinite=nonfinite,
                              report=lambda line: click.echo(progress_line(line, config.steps)),
                              note=lambda text: click.echo(f"note: {text}", err=True))
            if trainer.dropped:
                click.echo(f"left out {trainer.dropped} pair(s) longer than {config.max_len} tokens a side", err=True)
            if trainer.step.step >= config.steps:
                raise click.BadParameter(f"the run is at step {trainer.step.step} already; ask for more --steps",
                                         param_hint="--steps")
            try:
                trainer.run()
            except TrainingStopped as e:
                click.echo(f"Error: {e}" if e.code == 1 else str(e), err=True)
                sys.exit(e.code)
    except KeyboardInterrupt:  # before the first step, or a second Ctrl-C: what was saved stays whole
        saved = run_dir.checkpoint.path if run_dir is not None and run_dir.checkpoint is not None else None
        click.echo(f"\ninterrupted: {f'the last checkpoint, {saved}, is whole' if saved else 'nothing was saved'}",
                   err=True)
        sys.exit(130)
    except (DataError, NotATokenModel, CheckpointError, DirectoryBusy) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {run_dir.checkpoint.path}")


@click.command()
@click.argument("directory", type=click.Path(file_okay=False, exists=True))
@click.option("--task", type=click.Choice(sorted(TASKS)), help="Evaluate on this task's validation set.")
@click.option("--data", type=click.Path(dir_okay=False), help="Evaluate on these 'source<TAB>target' pairs.")
@click.option("--beam", default=1, show_default=True, type=click.IntRange(1), help="Beam size; 1 is greedy.")
@click.option("--max-len", default=64, show_default=True, type=click.IntRange(1), help="Most tokens a translation.")
@click.option("--limit", type=click.IntRange(1), help="Evaluate the first N pairs only.")
@click.option("--target", default="llvm", show_default=True, callback=check_target,
              help="Where the decoder runs: llvm, vulkan, cuda, or numpy (the interpreter).")
@click.option("--show", "show_errors", default=5, show_default=True, help="Print this many wrong translations.")
@functools.partial(user_errors, extra=(GenerationError,))
def evaluate(directory, task, data, beam, max_len, limit, target, show_errors):
    """Translate a set with the model attngraph train wrote to DIRECTORY; print exact match and BLEU."""
    from .commands_generate import trained_model
    from .generate import beam_search, compile_entries, greedy_search
    from .train import data as D
    from .train.metrics import corpus_bleu, exact_match
    from .train.trainer import is_training_dir, load_run
    if not is_training_dir(directory):
        raise click.BadParameter(f"{directory} holds no trained model (attngraph train writes one)")
    try:
        if (task is None) == (data is None):
            config = load_run(directory)
            if task is None and data is None and config.task:
                task = config.task
            elif task is None and data is None and config.valid:
                data = config.valid
            else:
                raise click.UsageError("give --task or --data (the set to translate)")
        pairs = D.get_task(task).valid() if task else D.read_pairs(data)
    except (DataError, CheckpointError) as e:
        raise click.ClickException(str(e)) from None
    pairs = pairs[:limit] if limit else pairs
    what = f"the {task} task's validation set" if task else data
    module, params, tok = trained_model(directory)
    if max_len + 1 > module.max_len:
        raise click.BadParameter(f"{max_len} tokens and the start token are past the {module.max_len} positions the "
                                 f"model encodes: give at most {module.max_len - 1}", param_hint="--max-len")
    sources = [D.encode(tok, s) for s, _ in pairs]
    too_long = [i for i, s in enumerate(sources) if len(s) > module.max_len]
    if too_long:
        shown = ", ".join(str(i + 1) for i in too_long[:8]) + (" ..." if len(too_long) > 8 else "")
        click.echo(f"note: {what}: left out {len(too_long)} pair(s) whose source is longer than the model's "
                   f"{module.max_len} positions (pair {shown})", err=True)
        left_out = set(too_long)
        keep = [i for i in range(len(pairs)) if i not in left_out]
        pairs, sources = [pairs[i] for i in keep], [sources[i] for i in keep]
    note = D.unknown_words_note(tok, pairs, what, "the model's vocabulary")
    if note:
        click.echo(f"note: {note}", err=True)
    if not pairs:
        raise click.ClickException(f"{what}: no pair left to evaluate")
    cache_len = min(max_len + 1, module.max_len)
    stepper = compile_entries(module, params, target, cache_len=cache_len)
    hyps = []
    for start in range(0, len(sources), 64):
        chunk = sources[start:start + 64]
        if beam == 1:
            found = greedy_search(stepper, chunk, max_len, eos_id=D.EOS_ID, bos_id=D.BOS_ID)
        else:
            found = [h[0] for h in beam_search(stepper, chunk, beam, max_len, eos_id=D.EOS_ID, bos_id=D.BOS_ID)]
        hyps += [D.decode(tok, h.tokens) for h in found]
    refs = [t for _, t in pairs]
    wrong = [(s, h, r) for (s, r), h in zip(pairs, hyps) if h.split() != r.split()]
    for s, h, r in wrong[:show_errors]:
        click.echo(f"  {s}  ->  {h}   (want: {r})")
    click.echo(f"{what}: {len(pairs)} pairs, beam {beam}: exact match {100 * exact_match(hyps, refs):.1f}% "
               f"({len(pairs) - len(wrong)}/{len(pairs)}), BLEU {corpus_bleu(hyps, refs):.2f}")
