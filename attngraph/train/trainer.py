"""``attngraph train``: a zoo encoder-decoder trained on parallel text into a directory.

The run: a vocabulary from the data (``data.build_tokenizer``: a word-level or a BPE one), the zoo model built with that vocabulary and
the run's dropout, its ``TokenLoss`` in training mode compiled as one step (``TrainStep``: Adam under the
paper's schedule), batches of similar length, and now and then the loss on the validation pairs (the model
in eval mode, compiled for the same target).  The directory holds what the model needs to translate and to
go on training: ``config.json`` (the model and the run's settings), ``tokenizer.json``, ``params.safetensors``
and ``optimizer.safetensors`` (the step count included) and ``log.jsonl`` (one line per report).

A run is a function of its seed: the batch of step k is drawn from ``(seed, k)`` alone and dropout's seed
comes from ``TrainStep``, so a run resumed from its directory (``resume=``) takes the same steps as one that
was not interrupted (bit-exact on llvm).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from .. import models
from ..nn import trace
from ..weights import init_params, load_weights
from . import data as D
from .objective import TokenLoss
from .optim import Adam
from .schedules import SCHEDULES, Noam, WarmupCosine
from .step import TrainStep

CONFIG, TOKENIZER, PARAMS, OPTIMIZER, LOG = ("config.json", "tokenizer.json", "params.safetensors",
                                             "optimizer.safetensors", "log.jsonl")


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


class Trainer:
    """One training run into ``out_dir`` (see the module's docstring); ``resume`` continues the run saved
    there.  ``report(dict)`` receives each progress line's values."""

    def __init__(self, config: RunConfig, out_dir: str, *, resume: bool = False,
                 report: Callable[[dict], None] | None = None):
        self.config, self.out_dir, self.report = config, out_dir, report or (lambda line: None)
        if (config.task is None) == (config.data is None):
            raise D.DataError("give a task (--task) or a file of pairs (--data), not both")
        if config.task is not None:
            self.task = D.get_task(config.task)
            texts, self.pairs, self.valid_pairs = self.task.vocabulary_text(), None, self.task.valid()
        else:
            self.task = None
            self.pairs = D.read_pairs(config.data)
            self.valid_pairs = D.read_pairs(config.valid) if config.valid else []
            texts = [side for pair in self.pairs for side in pair]
        self.tokenizer = D.load_tokenizer(os.path.join(out_dir, TOKENIZER)) if resume else \
            D.build_tokenizer(texts, config.tokenizer, config.vocab_size)
        self.model = translation_model(config, self.tokenizer.get_vocab_size())
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
                              target=config.target, seed=config.seed, checkpoint=config.checkpoint)
        if resume:
            self.step.load_state(load_weights(os.path.join(out_dir, PARAMS)), os.path.join(out_dir, OPTIMIZER))
        self.dropped = 0
        self.encoded_train = None if self.pairs is None else self._encode(self.pairs)
        self.encoded_valid = self._encode(self.valid_pairs)

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
        if self.config.target == "interpreter":
            from .. import reference
            params = self.step.params()

            def run(b):
                return reference.run(self.eval_graph, {**b, **params}, {})
        else:
            if self._eval is None:
                from ..api import compile as compile_graph
                self._eval = compile_graph(self.eval_graph, {}, target=self.config.target)

            # llvm: the step's parameters as they are in memory; another device's are read back first
            params = {n: self.step.state[n] for n in self.step.names} if self.config.target.startswith("llvm") \
                else self.step.params()

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
        """Train to ``config.steps`` (from where a resumed run stopped), saving at each report and at the end."""
        cfg = self.config
        os.makedirs(self.out_dir, exist_ok=True)
        start, t0, tokens, losses = self.step.step, time.perf_counter(), 0, []
        last = {}
        for k in range(start + 1, cfg.steps + 1):
            b = self.batch(k)
            losses.append(self.step(b))
            tokens += int((b["labels"] != D.PAD_ID).sum())
            if k % cfg.valid_every == 0 or k == cfg.steps:
                elapsed = time.perf_counter() - t0
                last = {"step": k, "loss": float(np.mean(losses)), "valid_loss": self.valid_loss(),
                        "lr": self.step.optimizer.schedule(k), "tokens_per_s": tokens / elapsed,
                        "seconds": elapsed, "seconds_left": elapsed / (k - start) * (cfg.steps - k)}
                losses = []
                self.save(last)
                self.report(last)
        return last

    def save(self, line: dict | None = None) -> None:
        self.step.save(os.path.join(self.out_dir, PARAMS))
        self.step.save_state(os.path.join(self.out_dir, OPTIMIZER))
        self.tokenizer.save(os.path.join(self.out_dir, TOKENIZER))
        with open(os.path.join(self.out_dir, CONFIG), "w") as f:
            json.dump(asdict(self.config), f, indent=1)
        if line is not None:
            with open(os.path.join(self.out_dir, LOG), "a") as f:
                f.write(json.dumps({k: (None if isinstance(v, float) and math.isnan(v) else v)
                                    for k, v in line.items()}) + "\n")


def load_run(out_dir: str) -> RunConfig:
    """The ``RunConfig`` saved in a training directory."""
    path = os.path.join(out_dir, CONFIG)
    if not os.path.isfile(path):
        raise D.DataError(f"{out_dir} is not a training directory (no {CONFIG})")
    with open(path) as f:
        return RunConfig(**json.load(f))


def is_training_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG)) and os.path.isfile(os.path.join(path, PARAMS))


__all__ = ["RunConfig", "learning_rate", "Trainer", "is_training_dir", "load_run", "translation_model"]
