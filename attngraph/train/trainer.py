"""``attngraph train``: a zoo encoder-decoder trained on parallel text into a directory.

The run: a vocabulary from the data (``data.build_tokenizer``: a word-level or a BPE one), the zoo model built with that vocabulary and
the run's dropout, its ``TokenLoss`` in training mode compiled as one step (``TrainStep``: Adam under the
paper's schedule), batches of similar length, and now and then the loss on the validation pairs (the model
in eval mode, compiled for the same target).  At each report the run is saved as one checkpoint
(``checkpoint.RunDirectory``: the config, the vocabulary, the parameters, the optimizer's state and the log,
written whole or not at all); Ctrl-C or SIGTERM saves at the end of the step in progress and stops.

A run is a function of its seed: the batch of step k is drawn from ``(seed, k)`` alone and dropout's seed
comes from ``TrainStep``, so a run resumed from its directory takes the same steps as one that was not
interrupted (bit-exact on llvm), wherever it was stopped.

A step whose loss or gradients are not finite is never applied (``TrainStep``): by default the run stops there
(``nonfinite="stop"``) and saves the state before that step; ``"skip"`` leaves the step out and goes on, and
stops after ``MAX_SKIPPED`` such steps in a row.  Non-finite parameters are never saved.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from .. import models
from ..memory_check import check_fits
from ..nn import trace
from ..weights import WeightsError, check_finite, init_params, read_safetensors, safetensors_bytes
from . import data as D
from .checkpoint import CONFIG, LOG, OPTIMIZER, PARAMS, TOKENIZER, Checkpoint, CheckpointError, RunDirectory, resolve
from .objective import TokenLoss
from .optim import Adam
from .schedules import SCHEDULES, Noam, WarmupCosine
from .step import STEP_KEY, NonFiniteStep, TrainStep

NONFINITE = ("stop", "skip")
MAX_SKIPPED = 10


class TrainingStopped(RuntimeError):
    """The run stopped before its last step (a signal, or a step that was not finite); ``saved`` is the
    checkpoint it left, ``code`` the exit status a command should end with."""

    def __init__(self, message: str, saved: str | None, code: int):
        super().__init__(message)
        self.saved, self.code = saved, code


@dataclass
class RunConfig:
    """What a training run is: saved as ``config.json`` and read back to resume or to translate."""
    model: str
    task: str | None = None
    data: str | None = None
    valid: str | None = None
    steps: int = 1000
    batch_tokens: int = 2048
    warmup: int = 4000
    schedule: str = "noam"  # noam: the paper's; cosine: warm-up, then a cosine decay to 0 at ``steps``
    lr: float | None = None  # the peak rate; None: the paper's, d_model^-0.5 warmup^-0.5
    clip_norm: float | None = None  # clip the gradients by their global norm
    checkpoint: bool = False  # recompute each layer's values in the backward (less memory, more time)
    tokenizer: str = "word"  # word: a token per word; bpe: byte-pair merges up to vocab_size tokens
    vocab_size: int = 8000  # of a bpe vocabulary
    label_smoothing: float = 0.1
    dropout: float = 0.1
    seed: int = 0
    target: str = "llvm"
    valid_every: int = 100
    max_len: int = 128  # tokens a side: longer pairs are dropped (and counted)
    dtype: str = "float32"  # bfloat16: mixed precision (``TrainStep``), the weights and Adam's state float32


def learning_rate(config: RunConfig, d_model: int):
    """The run's schedule: the paper's (``noam``, scaled so that its peak at ``warmup`` is ``lr`` when given)
    or a linear warm-up to ``lr`` and a cosine decay to 0 at the run's last step (``cosine``)."""
    paper_peak = d_model ** -0.5 * config.warmup ** -0.5
    peak = paper_peak if config.lr is None else config.lr
    if config.schedule == "noam":
        return Noam(d_model, warmup=config.warmup, factor=peak / paper_peak)
    if config.schedule == "cosine":
        return WarmupCosine(peak=peak, warmup=config.warmup, total=config.steps)
    raise D.DataError(f"unknown learning-rate schedule {config.schedule!r} (known: {', '.join(SCHEDULES)})")


def translation_model(config: RunConfig, vocab_size: int):
    """The zoo model of ``config`` with the data's vocabulary and the run's dropout."""
    try:
        model = models.build(config.model, vocab_size=vocab_size, dropout=config.dropout)
    except models.ModelNotFound as e:
        raise D.DataError(f"attngraph train teaches the zoo's encoder-decoder models to translate: {e}") from None
    if not hasattr(model, "encode_entry"):
        raise D.DataError(f"{config.model} is not an encoder-decoder model: attngraph train teaches one to translate")
    return model


def _no_pending() -> dict:
    """What the trainer keeps between two reports (saved with a checkpoint taken between them), just after one."""
    return {"losses": [], "grad_norms": [], "skipped": 0}


def _fits(pair: tuple[str, str], max_len: int) -> bool:
    """Whether a pair can fit ``max_len`` tokens a side: a word is at least one token (word or BPE), so a side
    of more words than that is left out before its words reach the vocabulary."""
    return len(pair[0].split()) <= max_len and len(pair[1].split()) + 1 <= max_len


class Trainer:
    """One training run into ``run`` (a held ``RunDirectory``; see the module's docstring); a directory that
    holds a checkpoint goes on from it.  ``report(dict)`` receives each progress line's values, ``note(str)``
    what the user should know (pairs left out, words outside the vocabulary)."""

    def __init__(self, config: RunConfig, run: RunDirectory, *, nonfinite: str = "stop",
                 report: Callable[[dict], None] | None = None, note: Callable[[str], None] | None = None):
        if nonfinite not in NONFINITE:
            raise D.DataError(f"unknown non-finite policy {nonfinite!r} (known: {', '.join(NONFINITE)})")
        self.config, self.run_dir, self.nonfinite = config, run, nonfinite
        self.report, self.note = report or (lambda line: None), note or (lambda text: None)
        if (config.task is None) == (config.data is None):
            raise D.DataError("give a task (--task) or a file of pairs (--data), not both")
        self.dropped = 0
        if config.task is not None:
            self.task = D.get_task(config.task)
            texts, self.pairs, self.valid_pairs = self.task.vocabulary_text(), None, self.task.valid()
        else:
            self.task = None
            pairs = D.read_pairs(config.data)
            self.pairs = [p for p in pairs if _fits(p, config.max_len)]
            self.dropped = len(pairs) - len(self.pairs)
            if not self.pairs:
                raise D.DataError(f"{config.data}: every pair is longer than --max-len {config.max_len} tokens a side")
            self.valid_pairs = D.read_pairs(config.valid) if config.valid else []
            texts = [side for pair in self.pairs for side in pair]
        resumed = run.checkpoint
        self.tokenizer = D.tokenizer_from_json(resumed.read(TOKENIZER).decode(), resumed.path) if resumed else \
            D.build_tokenizer(texts, config.tokenizer, config.vocab_size)
        self._check_valid_words()
        self.model = translation_model(config, self.tokenizer.get_vocab_size())
        self._check_memory()
        self.loss = TokenLoss(self.model, label_smoothing=config.label_smoothing)
        self.train_graph = trace(self.loss.train())
        self.model.eval()
        self.eval_graph = trace(self.loss)  # its parameters are inputs: the step's state is read where it is
        for nid in list(self.eval_graph.params.values()):
            self.eval_graph.param_to_input(nid)
        self._eval = None
        params = init_params(trace(self.model), config.seed)
        self.step = TrainStep(self.train_graph, params,
                              Adam(lr=learning_rate(config, self.model.d_model), clip_norm=config.clip_norm),
                              target=config.target, seed=config.seed, checkpoint=config.checkpoint,
                              dtype=None if config.dtype == "float32" else config.dtype)
        self.log: list[dict] = []
        self.pending = _no_pending()
        if resumed:
            self._resume(resumed)
        self.encoded_train = None if self.pairs is None else self._encode(self.pairs)
        self.encoded_valid = self._encode(self.valid_pairs)

    def _resume(self, ckpt: Checkpoint) -> None:
        params = read_safetensors(ckpt.read(PARAMS), os.path.join(ckpt.path, PARAMS))
        state = read_safetensors(ckpt.read(OPTIMIZER), os.path.join(ckpt.path, OPTIMIZER))
        if int(state.get(STEP_KEY, -1)) != ckpt.step:
            raise CheckpointError(f"{ckpt.path}: its optimizer state is at step {int(state.get(STEP_KEY, -1))}, the "
                                  f"checkpoint at {ckpt.step}: the parts do not belong together")
        try:
            self.step.load_state(params, state)
        except KeyError as e:
            raise CheckpointError(f"{ckpt.path} does not fit this run's model: {e.args[0]}") from None
        self.log = [json.loads(line) for line in ckpt.read(LOG).decode().splitlines() if line.strip()]
        self.pending.update(ckpt.pending)

    def _check_valid_words(self) -> None:
        """Validation words the vocabulary lacks are read as ``<unk>``: said, with a few of them."""
        note = D.unknown_words_note(self.tokenizer, self.valid_pairs,
                                    self.config.valid or f"the {self.config.task} task's validation set")
        if note:
            self.note(note)

    def _check_memory(self) -> None:
        """A run that cannot fit this machine's memory is refused before anything big is allocated: the
        parameters with Adam's two slots, the gradients and the step's spare state (7 copies), and the
        batch's logits, log-probs and their gradient over the whole vocabulary (a lower bound)."""
        count = sum(int(ty.numel()) for ty in self.model.parameter_types().values())
        vocab = self.tokenizer.get_vocab_size()
        check_fits({"parameters and optimizer state": 4 * 7 * count,
                    "logits over the vocabulary": 4 * 3 * self.config.batch_tokens * vocab},
                   f"{self.config.model} with a vocabulary of {vocab} tokens ({count:,} parameters)",
                   error=D.DataError, hint="use a smaller vocabulary (--tokenizer bpe --vocab-size N) or fewer "
                                           "--batch-tokens")

    def _encode(self, pairs):
        out = []
        for src, tgt in pairs:
            s, t = D.encode(self.tokenizer, src), D.encode(self.tokenizer, tgt)
            if len(s) > self.config.max_len or len(t) + 1 > self.config.max_len:
                self.dropped += 1
                continue
            out.append((s, t))
        return out

    def batch(self, k: int) -> dict[str, np.ndarray]:
        """Step ``k``'s batch (from 1): a function of the seed and k alone."""
        rng = np.random.default_rng([self.config.seed, k])
        if self.task is not None:
            pool = self._encode(self.task.draw(max(8, self.config.batch_tokens // 8), rng))
        else:
            pool = [self.encoded_train[i] for i in rng.integers(0, len(self.encoded_train), 4096)]
        return next(D.length_batches(pool, self.config.batch_tokens, rng))

    def valid_loss(self, limit: int = 256) -> float | None:
        """The mean loss over (up to ``limit``) validation pairs, the model in eval mode."""
        if not self.encoded_valid:
            return None
        pairs = self.encoded_valid[:limit]
        if self._eval is None:
            from ..api import compile as compile_model
            self._eval = compile_model(self.eval_graph, {}, target=self.config.target)
        params = self.step.params()  # read back once a validation: any device's tensors, any model's

        def run(b):
            return self._eval({**b, **params})
        total = count = 0.0
        for start in range(0, len(pairs), 64):
            chunk = pairs[start:start + 64]
            b = D.teacher_forcing([p[0] for p in chunk], [p[1] for p in chunk])
            loss = float(run(b)["loss"])
            real = int((b["labels"] != D.PAD_ID).sum())
            total, count = total + loss * real, count + real
        return total / count

    def run(self) -> dict:
        """Train to ``config.steps`` (from where a resumed run stopped), saving at each report and at the end.
        A signal (SIGINT, SIGTERM) or a step that is not finite ends it early with ``TrainingStopped``."""
        cfg, pending = self.config, self.pending
        start, t0 = self.step.step, time.perf_counter()
        last, in_a_row, tokens = {}, 0, 0  # the steps left out in a row; tokens since the start
        with _Signals() as signals:
            for k in range(start + 1, cfg.steps + 1):
                b = self.batch(k)
                try:
                    pending["losses"].append(self.step(b))
                    pending["grad_norms"].append(self.step.grad_norm)
                    tokens += int((b["labels"] != D.PAD_ID).sum())
                    in_a_row = 0
                except NonFiniteStep as e:
                    in_a_row += 1
                    self._not_finite(e, in_a_row)
                if k % cfg.valid_every == 0 or k == cfg.steps:
                    elapsed = time.perf_counter() - t0
                    losses, norms = pending["losses"], pending["grad_norms"]
                    last = {"step": k, "loss": float(np.mean(losses)) if losses else math.nan,
                            "valid_loss": self.valid_loss(), "lr": self.step.optimizer.schedule(k),
                            "grad_norm": float(np.mean(norms)) if norms else math.nan,
                            "skipped": pending["skipped"], "tokens_per_s": tokens / elapsed,
                            "seconds": elapsed, "seconds_left": elapsed / (k - start) * (cfg.steps - k)}
                    self.pending = pending = _no_pending()
                    self.log.append(_json_line(last))
                    self.save()
                    self.report(last)
                if signals.received:
                    name = signal.Signals(signals.received).name
                    where = self.save()
                    raise TrainingStopped(
                        f"stopped by {name} after step {k}: saved {where}; attngraph train --resume "
                        f"{self.run_dir.path} --steps {cfg.steps} goes on from there", where, 128 + signals.received)
        return last

    def _not_finite(self, e: NonFiniteStep, in_a_row: int) -> None:
        """A step that was not finite (and not applied): skipped, or the run saved as before it and stopped."""
        if self.nonfinite == "skip" and in_a_row <= MAX_SKIPPED:
            self.step.skip()
            self.pending["skipped"] += 1
            self.note(f"step {e.step}: the loss is {e.loss:.4g} and the gradients' norm {e.grad_norm:.4g}: "
                      f"the step is left out")
            return
        where = self.save()
        why = f"{MAX_SKIPPED} steps in a row were not finite" if self.nonfinite == "skip" else \
            f"the loss is {e.loss:.4g} and the gradients' norm {e.grad_norm:.4g}"
        raise TrainingStopped(
            f"step {e.step}: {why}: training diverged and stopped; saved the run as it was before that step "
            f"({where}). Train again with a lower --lr, a longer --lr-warmup or --clip-norm (or --nonfinite skip to "
            f"leave such steps out)", where, 1)

    def save(self) -> str:
        """The run as it is now, as one checkpoint (see ``checkpoint.RunDirectory``); returns its path.
        Non-finite parameters or optimizer state are never saved."""
        saved = self.run_dir.saved_at(self.step.step)  # a report's save, then a signal: once is enough
        if saved:
            return saved
        params, state = self.step.params(), self.step.optimizer_state()
        try:
            check_finite(params, f"the parameters at step {self.step.step}")
            check_finite(state, f"the optimizer state at step {self.step.step}")
        except WeightsError as e:
            raise TrainingStopped(f"{e}; nothing was saved (the last checkpoint is kept)", None, 1) from None
        parts = {CONFIG: json.dumps(asdict(self.config), indent=1).encode(),
                 TOKENIZER: self.tokenizer.to_str().encode(),
                 PARAMS: safetensors_bytes(params), OPTIMIZER: safetensors_bytes(state),
                 LOG: "".join(json.dumps(line) + "\n" for line in self.log).encode()}
        return self.run_dir.save(self.step.step, parts, self.pending)


def _json_line(line: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in line.items()}


class _Signals:
    """SIGINT and SIGTERM while training: the first asks the loop to save after the step in progress and stop
    (``received``); a second one stops at once, as the signal does by default (a save is atomic: what was
    saved stays whole)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> _Signals:
        self.received, self._old = None, {}
        if threading.current_thread() is threading.main_thread():  # a signal ignored (a job run with &) stays so
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS
                         if signal.getsignal(s) is not signal.SIG_IGN}
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.received = signum
        os.write(2, f"\n{signal.Signals(signum).name}: saving after the step in progress, then stopping "
                    f"(again to stop at once)\n".encode())

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}


def load_run(path: str) -> RunConfig:
    """The ``RunConfig`` of a training directory's newest checkpoint (or of a checkpoint directory)."""
    ckpt = resolve(path)
    return _config(ckpt)


def _config(ckpt: Checkpoint) -> RunConfig:
    try:
        return RunConfig(**json.loads(ckpt.read(CONFIG)))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{os.path.join(ckpt.path, CONFIG)} is not a run's config ({e})") from None


def trained_model(path: str):
    """``(model, parameters, tokenizer, checkpoint)`` of a training directory's newest checkpoint (or of a
    checkpoint directory): every part checked, parameters that are not finite refused."""
    for attempt in (1, 2):  # a run training there may replace its checkpoint while it is read: once more
        ckpt = resolve(path)
        try:
            tokenizer = D.tokenizer_from_json(ckpt.read(TOKENIZER).decode(), ckpt.path)
            config = _config(ckpt)
            params = read_safetensors(ckpt.read(PARAMS), os.path.join(ckpt.path, PARAMS))
            break
        except CheckpointError:
            if attempt == 2 or os.path.isdir(ckpt.path):
                raise
    check_finite(params, os.path.join(ckpt.path, PARAMS))
    return translation_model(config, tokenizer.get_vocab_size()), params, tokenizer, ckpt


def is_training_dir(path: str) -> bool:
    from .checkpoint import is_run_dir
    return is_run_dir(path)


__all__ = ["MAX_SKIPPED", "NONFINITE", "RunConfig", "Trainer", "TrainingStopped", "is_training_dir",
           "learning_rate", "load_run", "trained_model", "translation_model"]
