"""Generation: greedy decoding and beam search over a model's decode step with a key/value cache.

A model that generates has entries beside ``forward`` (see ``attngraph.nn.cache``):

- ``encode_entry(src)`` (encoder-decoder models only): once per source, the memory's padding mask
  and every decoder layer's cross-attention keys and values;
- ``decode_step(tokens, pos, **state)``: the new token(s) at positions ``pos ..`` to their
  next-token log-probs and the updated self-attention caches (``cache.0.k``, ...), preallocated to
  ``cache_len`` positions fixed when the entry is traced (built);
- ``reorder_cache(indices, **caches)``: the caches' rows gathered along the batch (beam search).

The search runs in Python over a ``Stepper``: ``encode``, ``step``, ``reorder`` and ``expand``. The
stepper owns the decoding state (caches, cross keys/values), so a compiled stepper keeps it where
the kernels run and only the log-probs come back to the host.  ``compile_entries`` compiles each entry in
memory for any target (``numpy``: the reference interpreter; ``InterpreterStepper``: the entries as traced,
the oracle); ``CompiledStepper`` builds and runs one artifact per entry.

Length penalty: GNMT's ``((5 + len) / 6) ** alpha`` (Wu et al., 2016), which the Transformer paper
used with alpha 0.6; ``len`` counts the generated tokens, EOS included.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from .ir import Graph, TensorType
from .ir.types import numpy_dtype
from .passes.precision import STATE

#: The entries a generating model provides (``encode_entry`` only with an encoder).
ENTRIES = ("encode_entry", "decode_step", "reorder_cache")
MANIFEST = "generate.json"


class GenerationError(ValueError):
    """Bad generation input: a token outside the vocabulary, a prefix past the cache, a bad option."""


# ------------------------------------------------------------------------------------------------
# The decoding state: steppers.

@dataclass(frozen=True)
class DecoderInfo:
    """What the search and a stepper need to know about the model, read off its traced entries
    (and recorded in a compiled directory's ``generate.json``)."""

    name: str
    decoder_only: bool
    vocab_size: int                 # of the generated tokens (log-probs' last axis)
    source_vocab: int | None        # encoder-decoder: ids allowed in the source
    max_source_len: int | None      # encoder-decoder: positions the encoder encodes
    pad_id: int | None              # encoder-decoder: the source padding token
    cache_len: int                  # positions each self-attention cache holds
    state: dict[str, TensorType] = field(default_factory=dict)  # decode-step inputs beside tokens and pos
    caches: tuple[str, ...] = ()    # the state the decode step updates

    @classmethod
    def from_model(cls, model, decode: Graph, encode: Graph | None) -> "DecoderInfo":
        state = {n: t for n, t in decode.input_types().items() if n not in ("tokens", "pos")}
        caches = tuple(n for n in decode.output_types() if n != "log_probs")
        source_vocab = None
        if encode is not None:
            src = next(encode.node(i) for i in encode.inputs if encode.node(i).name == "src")
            source_vocab = src.meta.get("high")
        return cls(getattr(model, "name", type(model).__name__), encode is None,
                   int(decode.output_types()["log_probs"].shape[-1]), source_vocab,
                   None if encode is None else getattr(model, "max_len", None),
                   None if encode is None else getattr(model, "pad_id", 0),
                   int(state[caches[0]].shape[1]), state, caches)

    def to_json(self) -> dict:
        return {"name": self.name, "decoder_only": self.decoder_only, "vocab_size": self.vocab_size,
                "source_vocab": self.source_vocab, "max_source_len": self.max_source_len, "pad_id": self.pad_id,
                "cache_len": self.cache_len, "state": {n: t.to_json() for n, t in self.state.items()},
                "caches": list(self.caches)}

    @classmethod
    def from_json(cls, obj: dict) -> "DecoderInfo":
        return cls(obj["name"], obj["decoder_only"], obj["vocab_size"], obj["source_vocab"], obj["max_source_len"],
                   obj["pad_id"], obj["cache_len"], {n: TensorType.from_json(t) for n, t in obj["state"].items()},
                   tuple(obj["caches"]))


class Stepper(Protocol):
    """Runs a model's decode steps.  ``state`` is the stepper's own (arrays or device tensors)."""

    info: DecoderInfo

    def encode(self, sources: np.ndarray):
        """The state for a batch of sources (encoder-decoder) or prompts (decoder-only), caches empty."""

    def step(self, tokens: np.ndarray, pos: int, state):
        """Feed ``tokens`` (batch, t) at positions ``pos .. pos+t-1``: (log-probs (batch, vocab) of
        the last position as a NumPy array, the new state)."""

    def reorder(self, state, indices: np.ndarray):
        """The state with the caches' rows taken in the order ``indices`` (same batch size)."""

    def expand(self, state, indices: np.ndarray):
        """The whole state's rows (caches, cross keys/values, padding) taken as ``indices`` (any length)."""


Entry = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


class EntryStepper:
    """The stepper logic over the model's entries, each a callable ``{name: array} -> {name: array}``;
    the interpreter and compiled steppers differ only in how they make those callables."""

    def __init__(self, info: DecoderInfo, entries: Mapping[str, Entry], dtype: str = "float32"):
        """``dtype``: the type the caches are stored in."""
        self.info, self.entries, self.dtype = info, dict(entries), dtype

    def _zero_caches(self, batch: int) -> dict:
        # Zeros, not garbage: masked-out entries are multiplied by 0, and 0 * NaN is NaN.
        return {n: np.zeros(self.info.state[n].concrete({"batch": batch}), numpy_dtype(self.dtype))
                for n in self.info.caches}

    def encode(self, sources):
        sources = np.asarray(sources, np.int64)
        if self.info.decoder_only:
            return self._zero_caches(len(sources))
        check_tokens(sources, self.info.source_vocab, "source")
        if self.info.max_source_len is not None and sources.shape[1] > self.info.max_source_len:
            raise GenerationError(f"sources of {sources.shape[1]} tokens are longer than the "
                                  f"{self.info.max_source_len} positions {self.info.name} encodes")
        out = self.entries["encode_entry"]({"src": sources})
        state = {n: out[n] for n in self.info.state if n not in self.info.caches}
        return {**state, **self._zero_caches(len(sources))}

    def step(self, tokens, pos, state):
        tokens = np.asarray(tokens, np.int64)
        check_tokens(tokens, self.info.vocab_size, "decoder input")
        if pos < 0 or pos + tokens.shape[1] > self.info.cache_len:
            raise GenerationError(f"positions {pos}..{pos + tokens.shape[1] - 1} are past the cache of "
                                  f"{self.info.cache_len} positions (built with cache_len={self.info.cache_len})")
        out = self.entries["decode_step"]({"tokens": tokens, "pos": np.int64(pos), **state})
        # The entry gives every new position's log-probs (no symbolic slice to lower); the next
        # token only needs the last (a half-precision model's in float32, for the search's sums).
        log_probs = np.asarray(out["log_probs"])[:, -1]
        if log_probs.dtype.itemsize < 4:
            log_probs = log_probs.astype(np.float32)
        return log_probs, {**state, **{n: out[n] for n in self.info.caches}}

    def reorder(self, state, indices):
        out = self.entries["reorder_cache"]({"indices": np.asarray(indices, np.int64),
                                             **{n: state[n] for n in self.info.caches}})
        return {**state, **{n: out[n] for n in self.info.caches}}

    def expand(self, state, indices):
        return dict(self.entries["expand_state"]({"indices": np.asarray(indices, np.int64), **state}))


def trace_entries(model, cache_len: int | None = None) -> dict[str, Graph]:
    """The traced entries of ``model`` with caches of ``cache_len`` positions (default: the model's
    ``cache_len``): ``decode_step``, ``reorder_cache``, ``encode_entry`` when it has an encoder,
    and ``expand_state`` (every state tensor gathered along the batch)."""
    from .nn import trace
    from .nn.cache import Reorder
    if not hasattr(model, "decode_step"):
        raise GenerationError(f"{getattr(model, 'name', type(model).__name__)} cannot generate: it has no decode_step entry")
    if cache_len is not None:
        if cache_len < 1:
            raise GenerationError(f"cache_len must be at least 1, got {cache_len}")
        limit = getattr(model, "max_len", None)
        if limit is not None and cache_len > limit:
            raise GenerationError(f"cache_len {cache_len} is past the {limit} positions {model.name} encodes")
        model.cache_len = cache_len
    graphs = {m: trace(model, method=m) for m in ENTRIES if m != "encode_entry" or hasattr(model, "encode_entry")}
    state = {n: t for n, t in graphs["decode_step"].input_types().items() if n not in ("tokens", "pos")}
    graphs["expand_state"] = trace(Reorder(state), name=f"{graphs['decode_step'].name.rpartition('.')[0]}.expand_state")
    for g in graphs.values():  # in half precision, stored in the type (``passes.precision.STATE``)
        g.meta[STATE] = sorted(n for n in g.input_types() if n in state)
    return graphs


def _entry(model) -> Entry:
    """A model's entry as the stepper calls it: its state outputs kept where the model runs."""
    state = tuple(name for name, _ in model.graph.outputs if name != "log_probs")
    return lambda inputs: model(inputs, keep=state)


def compile_entries(model, params: Mapping[str, np.ndarray], target: str = "numpy", *, cache_len: int | None = None,
                    opt_level: int = 3, dtype: str | None = None, weight_dtype: str | None = None,
                    device: str | None = None) -> EntryStepper:
    """A stepper over ``model``'s entries, each compiled in memory by ``attngraph.compile`` for ``target`` (numpy:
    the reference interpreter; ``dtype="float64"`` there: the float64 oracle of the compiled steppers), with
    caches of ``cache_len`` positions.  ``dtype``: float16 or bfloat16, the model (its caches and encoder memory
    too) in that type; ``weight_dtype``, ``device``: see ``attngraph.compile``.  ``stepper.models`` are the
    compiled entries."""
    from .api import compile
    graphs = trace_entries(model, cache_len)
    info = DecoderInfo.from_model(model, graphs["decode_step"], graphs.get("encode_entry"))
    compiled = {m: compile(g, {k: params[k] for k in g.params}, target=target, opt_level=opt_level, dtype=dtype,
                           weight_dtype=weight_dtype, device=device) for m, g in graphs.items()}
    stepper = EntryStepper(info, {m: _entry(c) for m, c in compiled.items()}, dtype or "float32")
    stepper.models = compiled
    return stepper


def InterpreterStepper(model, params: Mapping[str, np.ndarray], cache_len: int | None = None, dtype: str = "float32",
                       precision: str | None = None) -> EntryStepper:
    """Decode steps on the reference interpreter, each entry run as traced (``compile_entries`` at ``-O0`` for
    target numpy): in ``dtype`` (float32, or float64 for checking), or the model in ``precision`` (float16,
    bfloat16: the interpreter rounds each value as a build stores it)."""
    return compile_entries(model, params, "numpy", cache_len=cache_len, opt_level=0,
                           dtype=precision if precision not in (None, "float32") else dtype)


class CompiledStepper(EntryStepper):
    """Decode steps on artifacts built by ``attngraph.build``, one per entry, under one directory
    whose ``generate.json`` records the entries and the cache limits.

    The decoding state stays where the kernels run: every entry keeps its state outputs as device
    tensors (``CompiledModel(..., keep=...)``) and takes them back as inputs without a copy; the
    decode step writes the new keys and values into the caches in place, and beam search reorders
    them with the compiled ``reorder_cache`` entry.  Only the log-probs come to the host."""

    @staticmethod
    def build(model, params: Mapping[str, np.ndarray], out_dir: str, target: str = "llvm", opt_level: int = 3,
              cache_len: int | None = None, weight_dtype: str | None = None, dtype: str | None = None) -> dict:
        """Build every entry of ``model`` into ``out_dir/<entry>/``; returns the manifest written.
        ``weight_dtype="float16"`` stores the projection weights in half precision (llvm); ``dtype``: the
        model in float16 or bfloat16 (``attngraph.compile``), its caches and encoder memory in that type."""
        from . import files
        from .api import build
        from .backends.tvm.artifact import writing
        graphs = trace_entries(model, cache_len)
        info = DecoderInfo.from_model(model, graphs["decode_step"], graphs.get("encode_entry"))
        own = {*ENTRIES, "expand_state", MANIFEST}
        # One build at a time (files.DirectoryBusy), never over a user's files; generate.json replaced last.
        with writing(out_dir, own.__contains__, is_generation_dir, "a directory of generation entries"):
            for name, g in graphs.items():
                build(g, {k: params[k] for k in g.params}, os.path.join(out_dir, name), target=target,
                      opt_level=opt_level, weight_dtype=weight_dtype, dtype=dtype)
            manifest = {"format": 1, "target": target, "opt_level": opt_level, "entries": sorted(graphs),
                        "weight_dtype": weight_dtype or "float32", "dtype": dtype or "float32",
                        "cache_len": info.cache_len, "decoder": info.to_json()}
            files.write_file(out_dir, MANIFEST, json.dumps(manifest, indent=1).encode())
        return manifest

    def __init__(self, path: str):
        from .api import ArtifactError, load
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise ArtifactError(f"{path!r} holds no generation entries ({MANIFEST} missing); build them with "
                                f"attngraph.generate.CompiledStepper.build")
        with open(manifest_path) as f:
            self.manifest = json.load(f)
        self.models = {m: load(os.path.join(path, m)) for m in self.manifest["entries"]}
        super().__init__(DecoderInfo.from_json(self.manifest["decoder"]),
                         {m: _entry(model) for m, model in self.models.items()}, self.manifest.get("dtype", "float32"))


def is_generation_dir(path: str) -> bool:
    """Whether ``path`` holds compiled entries (a ``generate.json`` of ours, not a user's file of that name)."""
    from .files import our_json
    return our_json(os.path.join(path, MANIFEST), ("format", "entries", "decoder")) is not None


# ------------------------------------------------------------------------------------------------
# Search.

@dataclass
class Hypothesis:
    """A generated sequence: ``tokens`` after the BOS (or the prompt), EOS included when generated."""

    tokens: list[int]
    log_prob: float   # the sum of the tokens' log-probs
    score: float      # log_prob / length_penalty(len(tokens), alpha): what the beams are ranked by
    finished: bool    # ended with EOS (else cut at max_len)


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's ``((5 + length) / 6) ** alpha``; 1 for alpha 0."""
    return ((5.0 + length) / 6.0) ** alpha


def check_tokens(tokens: np.ndarray, vocab: int | None, what: str) -> None:
    """A ``GenerationError`` naming the first id outside ``[0, vocab)`` and where it is."""
    if tokens.ndim != 2:
        raise GenerationError(f"{what} tokens must be (batch, length), got shape {tokens.shape}")
    if vocab is None:
        return
    bad = np.argwhere((tokens < 0) | (tokens >= vocab))
    if len(bad):
        row, col = bad[0]
        raise GenerationError(f"{what} {row}, position {col}: token id {tokens[row, col]} is out of the "
                              f"vocabulary (0..{vocab - 1})")


def search_bytes(info: DecoderInfo, sources: int, beam: int, prefix_len: int, src_len: int | None = None,
                 float_bytes: int = 4) -> dict[str, int]:
    """Bytes a search over ``sources`` sources with ``beam`` beams each holds at once: the decoding
    state (every layer's self-attention cache, keys and values, of ``cache_len`` positions, and an
    encoder-decoder's cross keys/values over ``src_len`` positions) at ``sources * beam`` rows, twice
    (a step or a reorder makes the new state from the old), and the log-probs over the vocabulary (the
    first step's for each of the ``prefix_len`` positions, its logits, the search's float64 scores)."""
    from .ir import dims as D
    rows = sources * beam
    bindings = {"batch": rows}
    state = 0
    for ty in info.state.values():
        for d in ty.shape:  # src_len, and any other length: the sources' width
            if isinstance(d, str):
                bindings.update({s: src_len or prefix_len for s in D.symbols(d) if s not in bindings})
        n = 1
        for d in ty.concrete(bindings):
            n *= int(d)
        state += n * (float_bytes if ty.is_float else np.dtype(ty.dtype).itemsize)
    return {"decoder state": 2 * state, "log-probs": rows * info.vocab_size * (8 * prefix_len + 8)}


def check_search(info: DecoderInfo, sources: int, beam: int, prefix_len: int, src_len: int | None = None,
                 dtype: str = "float32") -> None:
    """A ``GenerationError`` for a beam wider than the vocabulary, or a search whose state
    (``search_bytes``) does not fit in the memory available; checked before anything is allocated."""
    if beam > info.vocab_size:
        raise GenerationError(f"beam {beam} is larger than the vocabulary of {info.name} ({info.vocab_size} "
                              f"tokens): a beam holds distinct continuations, at most {info.vocab_size} here")
    from .memory_check import check_fits
    parts = search_bytes(info, sources, beam, prefix_len, src_len, numpy_dtype(dtype).itemsize)
    check_fits(parts, f"{sources} source(s) x beam {beam}, cache {info.cache_len} positions, vocabulary "
                      f"{info.vocab_size}", error=GenerationError, hint="lower the beam or the number of inputs")


def _start(stepper: Stepper, sources, max_len: int, bos_id: int, eos_id: int | None, beam: int = 1):
    """Check the request before running anything; returns (state, prefix (batch, p))."""
    info = stepper.info
    if max_len < 1:
        raise GenerationError(f"max_len must be at least 1, got {max_len}")
    for name, tok in (("bos_id", None if info.decoder_only else bos_id), ("eos_id", eos_id)):
        if tok is not None and not 0 <= tok < info.vocab_size:
            raise GenerationError(f"{name} {tok} is out of the vocabulary (0..{info.vocab_size - 1})")
    rows = [list(s) for s in sources]
    if not rows or any(len(r) == 0 for r in rows):
        raise GenerationError("every source (prompt) needs at least one token")
    if info.decoder_only:
        if len({len(r) for r in rows}) > 1:
            raise GenerationError(f"prompts in one batch must have one length (got {sorted({len(r) for r in rows})}); "
                                  f"generate them in separate batches")
        prefix = np.asarray(rows, np.int64)
        check_tokens(prefix, info.vocab_size, "prompt")
    else:
        width = max(len(r) for r in rows)
        src = np.full((len(rows), width), info.pad_id or 0, np.int64)
        for i, r in enumerate(rows):
            src[i, :len(r)] = r
        check_tokens(src, info.source_vocab, "source")
        prefix = np.full((len(rows), 1), bos_id, np.int64)
    # The last generated token is never fed back: the prefix and max_len - 1 tokens are.
    needed = prefix.shape[1] + max_len - 1
    if needed > info.cache_len:
        raise GenerationError(f"a prefix of {prefix.shape[1]} token(s) and max_len {max_len} need {needed} cache "
                              f"positions, but the cache holds {info.cache_len} (built with cache_len="
                              f"{info.cache_len}); lower max_len or rebuild with a larger cache")
    check_search(info, len(rows), beam, prefix.shape[1], None if info.decoder_only else src.shape[1],
                 getattr(stepper, "dtype", "float32"))
    state = stepper.encode(prefix if info.decoder_only else src)
    return state, prefix


def greedy_search(stepper: Stepper, sources: Sequence[Sequence[int]], max_len: int, *, eos_id: int | None = None,
                  bos_id: int = 1, alpha: float = 0.0) -> list[Hypothesis]:
    """The most likely next token at every step, for a batch of sources (prompts), until EOS or
    ``max_len`` new tokens.  Rows that ended keep running (the batch stays static) but are ignored."""
    state, prefix = _start(stepper, sources, max_len, bos_id, eos_id)
    batch = len(prefix)
    log_probs, state = stepper.step(prefix, 0, state)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    total = np.zeros(batch)
    done = np.zeros(batch, bool)
    for t in range(max_len):
        nxt = log_probs.argmax(axis=-1)  # ties: the lowest id, as in beam search
        for s in np.flatnonzero(~done):
            tokens[s].append(int(nxt[s]))
            total[s] += float(log_probs[s, nxt[s]])
        if eos_id is not None:
            done |= nxt == eos_id
        if done.all() or t == max_len - 1:
            break
        log_probs, state = stepper.step(nxt[:, None], prefix.shape[1] + t, state)
    ended = [eos_id is not None and bool(seq) and seq[-1] == eos_id for seq in tokens]
    return [Hypothesis(seq, float(lp), float(lp) / length_penalty(len(seq), alpha), end)
            for seq, lp, end in zip(tokens, total, ended)]


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """Indices of the ``n`` largest finite ``scores``, best first, ties broken by the lower index."""
    n = min(n, scores.size)
    kth = np.partition(scores, scores.size - n)[scores.size - n]
    idx = np.flatnonzero(scores >= kth)                      # every tie with the n-th best
    idx = idx[np.argsort(-scores[idx], kind="stable")][:n]   # stable: lower index first among ties
    return idx[np.isfinite(scores[idx])]


def _keep_best(finished: list[Hypothesis], hyp: Hypothesis, beam: int) -> None:
    finished.append(hyp)
    finished.sort(key=lambda h: -h.score)  # stable: an earlier hypothesis wins a tie
    del finished[beam:]


def _source_done(finished, live_scores, beam, length, max_len, alpha, early_stopping) -> bool:
    """Whether a source's search may stop: no live beam, or ``beam`` finished hypotheses and
    (``early_stopping``, or no live beam can still beat the worst of them)."""
    if not np.isfinite(live_scores).any():
        return True
    if len(finished) < beam:
        return False
    if early_stopping:
        return True
    # Log-probs are <= 0, so a live beam's sum only falls; its final length is length+1 .. max_len,
    # and the penalty is monotonic in the length: the best it can reach is at one of the two ends.
    best = float(live_scores.max())
    bound = max(best / length_penalty(length + 1, alpha), best / length_penalty(max_len, alpha))
    return bound <= finished[-1].score


def beam_search(stepper: Stepper, sources: Sequence[Sequence[int]], beam: int, max_len: int, *,
                eos_id: int | None = None, bos_id: int = 1, alpha: float = 0.6,
                early_stopping: bool = False) -> list[list[Hypothesis]]:
    """Beam search for a batch of sources (prompts): the ``beam`` best hypotheses of each, best first.

    At each step the 2*beam best extensions of a source's live beams are walked best first (ties:
    lower beam, then lower token id): an EOS among the first ``beam`` of them finishes a hypothesis,
    other extensions refill the live beams.  After ``max_len`` new tokens the live beams are kept
    as unfinished hypotheses.  A source stops once no live beam can still beat the worst of its ``beam``
    finished hypotheses (exact: the result is then the one running to ``max_len`` would give; the
    default, as Hugging Face's ``early_stopping=False``), or with ``early_stopping`` as soon as it has
    ``beam`` finished ones: faster, but an EOS scored far below a live beam finishes a hypothesis
    whenever the other extensions score lower still, and then ends the search.  The caches follow the
    surviving beams through ``stepper.reorder``."""
    if beam < 1:
        raise GenerationError(f"beam must be at least 1, got {beam}")
    state, prefix = _start(stepper, sources, max_len, bos_id, eos_id, beam)
    batch, p = prefix.shape
    rows = batch * beam
    identity = np.arange(rows)
    state = stepper.expand(state, np.repeat(np.arange(batch), beam))
    log_probs, state = stepper.step(np.repeat(prefix, beam, axis=0), 0, state)
    live_scores = np.full((batch, beam), -np.inf)
    live_scores[:, 0] = 0.0  # the beams start identical: extend only the first
    live_tokens: list[list[list[int]]] = [[[] for _ in range(beam)] for _ in range(batch)]
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    done = np.zeros(batch, bool)
    filler = eos_id if eos_id is not None else 0  # fed to beams no longer in use
    for length in range(1, max_len + 1):
        vocab = log_probs.shape[-1]
        candidates = live_scores[:, :, None] + log_probs.reshape(batch, beam, vocab)
        order, feed = identity.copy(), np.full(rows, filler, np.int64)
        next_scores = np.full((batch, beam), -np.inf)
        next_tokens: list[list[list[int]]] = [[[] for _ in range(beam)] for _ in range(batch)]
        for s in np.flatnonzero(~done):
            flat = candidates[s].ravel()
            live = []
            for rank, idx in enumerate(_top(flat, 2 * beam)):
                b, tok = divmod(int(idx), vocab)
                seq, score = live_tokens[s][b] + [tok], float(flat[idx])
                if tok == eos_id:
                    if rank < beam:
                        _keep_best(finished[s], Hypothesis(seq, score, score / length_penalty(length, alpha), True), beam)
                else:
                    live.append((b, tok, score, seq))
                    if len(live) == beam:
                        break
            if length == max_len:
                for _, _, score, seq in live:
                    _keep_best(finished[s], Hypothesis(seq, score, score / length_penalty(length, alpha), False), beam)
                done[s] = True
                continue
            for j, (b, tok, score, seq) in enumerate(live):
                order[s * beam + j], feed[s * beam + j] = s * beam + b, tok
                next_scores[s, j], next_tokens[s][j] = score, seq
            done[s] = _source_done(finished[s], next_scores[s], beam, length, max_len, alpha, early_stopping)
        if done.all():
            break
        live_scores, live_tokens = next_scores, next_tokens
        if not np.array_equal(order, identity):
            state = stepper.reorder(state, order)
        log_probs, state = stepper.step(feed[:, None], p + length - 1, state)
    return finished


def generate(stepper: Stepper, sources: Sequence[Sequence[int]], *, beam: int = 1, max_len: int = 32,
             eos_id: int | None = None, bos_id: int = 1, alpha: float = 0.6,
             early_stopping: bool = False) -> list[Hypothesis]:
    """The best hypothesis per source: greedy decoding for ``beam`` 1, beam search otherwise."""
    if beam == 1:
        return greedy_search(stepper, sources, max_len, eos_id=eos_id, bos_id=bos_id, alpha=alpha)
    return [hyps[0] for hyps in beam_search(stepper, sources, beam, max_len, eos_id=eos_id, bos_id=bos_id,
                                            alpha=alpha, early_stopping=early_stopping)]


__all__ = ["GenerationError", "DecoderInfo", "Stepper", "EntryStepper", "InterpreterStepper", "CompiledStepper",
           "compile_entries",
           "trace_entries", "is_generation_dir", "Hypothesis", "length_penalty", "check_tokens", "greedy_search",
           "beam_search", "generate", "search_bytes", "check_search"]
