"""Generation: greedy decoding and beam search over a model's decode step with a key/value cache.

A model that generates has entries beside ``forward`` (see ``attngraph.nn.cache``):

- ``encode_entry(src)`` (encoder-decoder models only): once per source, the memory's padding mask
  and every decoder layer's cross-attention keys and values;
- ``decode_step(tokens, pos, **state)``: the new token(s) at positions ``pos ..`` to their
  next-token log-probs and the updated self-attention caches (``cache.0.k``, ...), of any length up
  to ``cache_len`` (the stepper allocates and grows them);
- ``reorder_cache(indices, **caches)``: the caches' rows gathered along the batch (beam search).

The search runs over a ``Stepper``: ``encode``, ``step``, ``reorder`` and ``expand``, vectorized across
the sources (NumPy over the whole batch; Python only where a hypothesis finishes); the sources and
hypotheses that are done leave the batch.  The stepper owns the decoding state (caches, cross
keys/values), so a compiled stepper keeps it where the kernels run and only the log-probs come back
to the host.  ``compile_entries`` compiles each entry in
memory for any target (``numpy``: the reference interpreter; ``InterpreterStepper``: the entries as traced,
the oracle); ``CompiledStepper`` builds and runs one artifact per entry.

Length penalty: GNMT's ``((5 + len) / 6) ** alpha`` (Wu et al., 2016), which the Transformer paper
used with alpha 0.6; ``len`` counts the generated tokens, EOS included.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Mapping, Protocol, Sequence

import numpy as np

from .ir import Graph, TensorType
from .ir.types import numpy_dtype
from .passes.precision import STATE

#: The entries a generating model provides (``encode_entry`` only with an encoder).
ENTRIES = ("encode_entry", "decode_step", "reorder_cache")
MANIFEST = "generate.json"
#: generate.json's format: 2 since the caches' length is symbolic (format 1's were fixed at the build).
FORMAT = 2


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
    cache_len: int                  # the most positions a self-attention cache may hold
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
                   None if encode is None else getattr(model, "pad_id", 0), int(model.cache_len), state, caches)

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
    """Runs a model's decode steps.  ``state`` is the stepper's own (arrays or device tensors); a call that
    returns a new state consumes the one it was given (its caches are written in place or reused)."""

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


#: Positions a cache grows by: each step's attention reads the whole cache, so a cache holds at most
#: ``GROW - 1`` positions more than the positions written (and never more than ``DecoderInfo.cache_len``).
GROW = 16


def cache_axis(ty: TensorType) -> int:
    """The axis of a self-attention cache that holds its positions: the one sized ``cache`` (``nn.cache.CACHE``: the
    zoo's caches are (batch, cache, heads, dim), an imported Hugging Face model's (batch, heads, cache, dim))."""
    from .nn.cache import CACHE
    return list(ty.shape).index(CACHE) if CACHE in ty.shape else 1


def capacity(info: DecoderInfo, end: int) -> int:
    """The positions a cache gets when a step writes up to position ``end`` (exclusive)."""
    return min(info.cache_len, -(-end // GROW) * GROW)


class EntryStepper:
    """The stepper logic over the model's compiled entries (``{entry: model}``, each called with ``keep``: its
    state outputs stay where it runs); the interpreter and compiled steppers differ only in how the entries
    were compiled.

    The caches start with room for the first step and grow by ``GROW`` positions as the steps reach their end
    (a copy through the host, once per ``GROW`` steps), so a step costs what the positions written need,
    whatever the longest length allowed.  ``reorder`` writes into the caches the previous reorder consumed
    (no allocation per beam step)."""

    def __init__(self, info: DecoderInfo, models: Mapping, dtype: str = "float32"):
        """``dtype``: the type the caches are stored in."""
        self.info, self.models, self.dtype = info, dict(models), dtype
        self._spare: dict = {}  # the caches the last reorder consumed: the next one writes into them

    def _call(self, entry: str, inputs: Mapping, into: Mapping | None = None) -> Mapping:
        model = self.models[entry]
        keep = tuple(name for name, _ in model.graph.outputs if name != "log_probs")
        return model(inputs, keep=keep, into=into)

    def _caches_of(self, batch: int, length: int) -> dict:
        """Empty caches: zeros, not garbage (masked-out entries are multiplied by 0, and 0 * NaN is NaN)."""
        return {n: np.zeros(self._cache_shape(n, batch, length), numpy_dtype(self.dtype)) for n in self.info.caches}

    def _cache_shape(self, name: str, batch: int, length: int) -> tuple:
        ty = self.info.state[name]
        return ty.concrete({"batch": batch, str(ty.shape[cache_axis(ty)]): length})

    def _fit(self, state, end: int):
        """``state`` with caches of at least ``end`` positions: grown (zeros after the written ones) if shorter."""
        axis = cache_axis(self.info.state[self.info.caches[0]])
        if state[self.info.caches[0]].shape[axis] >= end:
            return state
        length, model = capacity(self.info, end), self.models["decode_step"]
        grown = {}
        for n in self.info.caches:
            old = state[n] if isinstance(state[n], np.ndarray) else model.get(state[n])
            new = np.zeros(self._cache_shape(n, old.shape[0], length), old.dtype)
            new[(slice(None),) * axis + (slice(0, old.shape[axis]),)] = old
            grown[n] = new if isinstance(state[n], np.ndarray) else model.put(new, self.dtype)
        return {**state, **grown}

    def encode(self, sources):
        sources = np.asarray(sources, np.int64)
        caches = self._caches_of(len(sources), capacity(self.info, sources.shape[1] if self.info.decoder_only else 1))
        if self.info.decoder_only:
            return caches
        check_tokens(sources, self.info.source_vocab, "source")
        if self.info.max_source_len is not None and sources.shape[1] > self.info.max_source_len:
            raise GenerationError(f"sources of {sources.shape[1]} tokens are longer than the "
                                  f"{self.info.max_source_len} positions {self.info.name} encodes")
        out = self._call("encode_entry", {"src": sources})
        return {**{n: out[n] for n in self.info.state if n not in self.info.caches}, **caches}

    def step(self, tokens, pos, state):
        tokens = np.asarray(tokens, np.int64)
        check_tokens(tokens, self.info.vocab_size, "decoder input")
        if pos < 0 or pos + tokens.shape[1] > self.info.cache_len:
            raise GenerationError(f"positions {pos}..{pos + tokens.shape[1] - 1} are past the cache of "
                                  f"{self.info.cache_len} positions (built with cache_len={self.info.cache_len})")
        state = self._fit(state, pos + tokens.shape[1])
        out = self._call("decode_step", {"tokens": tokens, "pos": np.int64(pos), **state})
        # The entry gives every new position's log-probs (no symbolic slice to lower); the next
        # token only needs the last (a half-precision model's in float32, for the search's sums).
        log_probs = np.asarray(out["log_probs"])[:, -1]
        if log_probs.dtype.itemsize < 4:
            log_probs = log_probs.astype(np.float32)
        return log_probs, {**state, **{n: out[n] for n in self.info.caches}}

    def reorder(self, state, indices):
        caches = {n: state[n] for n in self.info.caches}
        spare = self._spare
        reuse = all(n in spare and spare[n] is not caches[n] and tuple(spare[n].shape) == tuple(caches[n].shape)
                    for n in caches)
        out = self._call("reorder_cache", {"indices": np.asarray(indices, np.int64), **caches},
                         into=spare if reuse else None)
        self._spare = caches
        return {**state, **{n: out[n] for n in self.info.caches}}

    def expand(self, state, indices):
        return dict(self._call("expand_state", {"indices": np.asarray(indices, np.int64), **state}))


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


def compile_entries(model, params: Mapping[str, np.ndarray], target: str = "numpy", *, cache_len: int | None = None,
                    opt_level: int = 3, dtype: str | None = None, weight_dtype: str | None = None,
                    device: str | None = None, quantize: str | None = None) -> EntryStepper:
    """A stepper over ``model``'s entries, each compiled in memory by ``attngraph.compile`` for ``target`` (numpy:
    the reference interpreter; ``dtype="float64"`` there: the float64 oracle of the compiled steppers), with
    caches of ``cache_len`` positions.  ``dtype``: float16 or bfloat16, the model (its caches and encoder memory
    too) in that type; ``weight_dtype``, ``device``, ``quantize``: see ``attngraph.compile``.  ``stepper.models``
    are the compiled entries."""
    from .api import compile
    graphs = trace_entries(model, cache_len)
    info = DecoderInfo.from_model(model, graphs["decode_step"], graphs.get("encode_entry"))
    compiled = {m: compile(g, {k: params[k] for k in g.params}, target=target, opt_level=opt_level, dtype=dtype,
                           weight_dtype=weight_dtype, device=device, quantize=quantize) for m, g in graphs.items()}
    return EntryStepper(info, compiled, dtype or "float32")


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
              cache_len: int | None = None, weight_dtype: str | None = None, dtype: str | None = None,
              quantize: str | None = None) -> dict:
        """Build every entry of ``model`` into ``out_dir/<entry>/``; returns the manifest written.
        ``weight_dtype="float16"`` stores the projection weights in half precision (llvm); ``dtype``: the
        model in float16 or bfloat16 (``attngraph.compile``), its caches and encoder memory in that type;
        ``quantize="int8"``: the projections in int8 (llvm)."""
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
                      opt_level=opt_level, weight_dtype=weight_dtype, dtype=dtype, quantize=quantize)
            manifest = {"format": FORMAT, "target": target, "opt_level": opt_level, "entries": sorted(graphs),
                        "weight_dtype": weight_dtype or "float32", "dtype": dtype or "float32",
                        "quantize": quantize or "none",
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
        if self.manifest.get("format") != FORMAT:
            raise ArtifactError(f"{path!r} holds generation entries of format {self.manifest.get('format')} (an "
                                f"older attngraph's, with caches of a fixed length); build them again")
        super().__init__(DecoderInfo.from_json(self.manifest["decoder"]),
                         {m: load(os.path.join(path, m)) for m in self.manifest["entries"]},
                         self.manifest.get("dtype", "float32"))


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
                 float_bytes: int = 4, positions: int | None = None) -> dict[str, int]:
    """Bytes a search over ``sources`` sources with ``beam`` beams each holds at once: the decoding
    state (every layer's self-attention cache, keys and values, of ``positions`` positions (default: the
    most a cache may hold), and an
    encoder-decoder's cross keys/values over ``src_len`` positions) at ``sources * beam`` rows, twice
    (a step or a reorder makes the new state from the old), and the log-probs over the vocabulary (the
    first step's for each of the ``prefix_len`` positions, its logits, the search's float64 scores)."""
    from .ir import dims as D
    rows = sources * beam
    bindings = {"batch": rows}
    for n in info.caches:
        ty = info.state[n]
        bindings[str(ty.shape[cache_axis(ty)])] = positions or info.cache_len
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
                 dtype: str = "float32", positions: int | None = None) -> None:
    """A ``GenerationError`` for a beam wider than the vocabulary, or a search whose state
    (``search_bytes``) does not fit in the memory available; checked before anything is allocated."""
    if beam > info.vocab_size:
        raise GenerationError(f"beam {beam} is larger than the vocabulary of {info.name} ({info.vocab_size} "
                              f"tokens): a beam holds distinct continuations, at most {info.vocab_size} here")
    from .memory_check import check_fits
    positions = positions or info.cache_len
    parts = search_bytes(info, sources, beam, prefix_len, src_len, numpy_dtype(dtype).itemsize, positions)
    check_fits(parts, f"{sources} source(s) x beam {beam}, cache {positions} positions, vocabulary "
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
                 getattr(stepper, "dtype", "float32"), capacity(info, needed))
    state = stepper.encode(prefix if info.decoder_only else src)
    return state, prefix


def greedy_search(stepper: Stepper, sources: Sequence[Sequence[int]], max_len: int, *, eos_id: int | None = None,
                  bos_id: int = 1, alpha: float = 0.0) -> list[Hypothesis]:
    """The most likely next token at every step, for a batch of sources (prompts), until EOS or
    ``max_len`` new tokens.  A row that generated EOS leaves the batch (``stepper.expand``)."""
    state, prefix = _start(stepper, sources, max_len, bos_id, eos_id)
    batch, p = prefix.shape
    log_probs, state = stepper.step(prefix, 0, state)
    tokens = np.zeros((batch, max_len), np.int64)
    lengths = np.zeros(batch, np.int64)
    total = np.zeros(batch)
    active = np.arange(batch)  # the source of each row of the running batch
    for t in range(max_len):
        nxt = log_probs.argmax(axis=-1)  # ties: the lowest id, as in beam search
        tokens[active, t] = nxt
        total[active] += log_probs[np.arange(len(active)), nxt]
        lengths[active] = t + 1
        if t == max_len - 1:
            break
        going = np.flatnonzero(nxt != eos_id) if eos_id is not None else np.arange(len(active))
        if len(going) == 0:
            break
        if len(going) < len(active):
            state, active, nxt = stepper.expand(state, going), active[going], nxt[going]
        log_probs, state = stepper.step(nxt[:, None], p + t, state)
    out = []
    for s in range(batch):
        seq = tokens[s, :lengths[s]].tolist()
        end = eos_id is not None and seq[-1] == eos_id
        out.append(Hypothesis(seq, float(total[s]), float(total[s]) / length_penalty(len(seq), alpha), end))
    return out


def _row_top(log_probs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, values) of each row's ``n`` largest log-probs, best first, ties broken by the lower id (NaN never
    taken): the candidates a beam can contribute to its source's best ``2 * beam``.  For a few (a beam's 2 x
    beam) by repeated ``argmax``, which takes the lowest id among ties by itself and costs ``n`` passes over the
    rows (at 128 rows of 37000, 8 passes take 7 ms, where ``argpartition`` took 50).  Past the row's finite values
    the ids are arbitrary: their values are -inf."""
    if n > 16:
        return _row_top_partition(log_probs, n)
    work = np.where(np.isnan(log_probs), -np.inf, log_probs)  # a copy to strike the ones taken from
    rows = np.arange(len(work))
    ids = np.empty((len(work), n), np.int64)
    values = np.empty((len(work), n), work.dtype)
    for j in range(n):
        ids[:, j] = best = work.argmax(axis=1)
        values[:, j] = work[rows, best]
        work[rows, best] = -np.inf
    return ids, values


def _row_top_partition(log_probs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``_row_top`` for a larger ``n``: ``argpartition``, then the ties with the ``n``-th put right."""
    log_probs = np.where(np.isnan(log_probs), -np.inf, log_probs)
    ids = np.argpartition(-log_probs, n - 1, axis=1)[:, :n]
    values = np.take_along_axis(log_probs, ids, 1)
    nth = values.min(axis=1)
    # argpartition picks any of the values tied with the n-th: where the row holds more of them than
    # were picked, take the lowest ids among them.
    ties = np.flatnonzero((log_probs == nth[:, None]).sum(1) > (values == nth[:, None]).sum(1))
    for r in ties:
        row = log_probs[r]
        above = np.flatnonzero(row > nth[r])
        ids[r] = np.concatenate([above, np.flatnonzero(row == nth[r])[:n - len(above)]])
        values[r] = row[ids[r]]
    order = np.lexsort((ids, -values), axis=1)
    return np.take_along_axis(ids, order, 1), np.take_along_axis(values, order, 1)


def _keep_best(finished: list[Hypothesis], hyp: Hypothesis, beam: int) -> None:
    finished.append(hyp)
    finished.sort(key=lambda h: -h.score)  # stable: an earlier hypothesis wins a tie
    del finished[beam:]


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
    whenever the other extensions score lower still, and then ends the search.

    The search runs on arrays over all sources at once; a source that stops leaves the batch (its rows
    dropped from the state by ``stepper.expand``), and the caches follow the surviving beams through
    ``stepper.reorder``."""
    if beam < 1:
        raise GenerationError(f"beam must be at least 1, got {beam}")
    state, prefix = _start(stepper, sources, max_len, bos_id, eos_id, beam)
    batch, p = prefix.shape
    state = stepper.expand(state, np.repeat(np.arange(batch), beam))
    log_probs, state = stepper.step(np.repeat(prefix, beam, axis=0), 0, state)
    active = np.arange(batch)                         # the sources still searching, in batch order
    live_scores = np.full((batch, beam), -np.inf)
    live_scores[:, 0] = 0.0                           # the beams start identical: extend only the first
    seqs = np.zeros((batch, beam, max_len), np.int64)  # each live beam's tokens
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    worst = np.full(batch, np.inf)                    # the score of a source's beam-th finished hypothesis
    filler = eos_id if eos_id is not None else 0      # fed to beams no longer in use
    slots = np.arange(beam)
    per_row = min(2 * beam, log_probs.shape[-1])  # a beam's candidates
    n = min(2 * beam, beam * per_row)               # a source's
    for length in range(1, max_len + 1):
        vocab = log_probs.shape[-1]
        sources_now = len(active)
        ids, values = _row_top(log_probs, per_row)
        # A source's candidates: each live beam's best; its best n overall, ties by (beam, token).
        scores = (live_scores[:, :, None] + values.reshape(sources_now, beam, per_row)).reshape(sources_now, -1)
        flat = (slots[None, :, None] * vocab + ids.reshape(sources_now, beam, per_row)).reshape(sources_now, -1)
        order = np.lexsort((flat, -scores), axis=1)[:, :n]
        scores, flat = np.take_along_axis(scores, order, 1), np.take_along_axis(flat, order, 1)
        parent, tok = np.divmod(flat, vocab)
        finite = np.isfinite(scores)
        is_eos = finite & (tok == eos_id) if eos_id is not None else np.zeros_like(finite)
        ends = is_eos & (np.arange(n) < beam)         # an EOS among the first beam finishes a hypothesis
        live = finite & ~is_eos
        slot = np.cumsum(live, axis=1) - 1
        live &= slot < beam                            # the first beam other extensions stay live
        def finish(which, ended: bool) -> None:  # candidates (source row, rank) become hypotheses
            for a, r in zip(*np.nonzero(which)):
                s, score = active[a], float(scores[a, r])
                seq = seqs[a, parent[a, r], :length - 1].tolist() + [int(tok[a, r])]
                _keep_best(finished[s], Hypothesis(seq, score, score / length_penalty(length, alpha), ended), beam)
                if len(finished[s]) == beam:
                    worst[s] = finished[s][-1].score
        finish(ends, True)
        if length == max_len:
            finish(live, False)
            break
        a, r = np.nonzero(live)
        j = slot[a, r]
        next_scores = np.full((sources_now, beam), -np.inf)
        next_scores[a, j] = scores[a, r]
        beams = np.tile(slots, (sources_now, 1))       # the row each new beam continues (itself if unused)
        beams[a, j] = parent[a, r]
        feed = np.full((sources_now, beam), filler, np.int64)
        feed[a, j] = tok[a, r]
        seqs = np.take_along_axis(seqs, beams[:, :, None], 1)
        seqs[a, j, length - 1] = tok[a, r]
        # Stop a source with no live beam, or with beam finished hypotheses that no live beam can beat: a
        # live beam's sum only falls, and the penalty is monotonic in the length, so its best is at an end.
        full = np.isfinite(worst[active])
        if early_stopping:
            beaten = full
        else:
            best = next_scores.max(axis=1)
            bound = np.maximum(best / length_penalty(length + 1, alpha), best / length_penalty(max_len, alpha))
            beaten = full & (bound <= worst[active])
        going = np.flatnonzero(np.isfinite(next_scores).any(axis=1) & ~beaten)
        if len(going) == 0:
            break
        rows = (going[:, None] * beam + beams[going]).ravel()
        if len(going) < sources_now:  # finished sources leave the batch
            state = stepper.expand(state, rows)
            active, next_scores, seqs, feed = active[going], next_scores[going], seqs[going], feed[going]
        elif not np.array_equal(rows, np.arange(len(rows))):
            state = stepper.reorder(state, rows)
        live_scores = next_scores
        log_probs, state = stepper.step(feed.reshape(-1, 1), p + length - 1, state)
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
           "beam_search", "generate", "search_bytes", "check_search", "capacity", "GROW"]
