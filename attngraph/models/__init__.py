"""The model zoo, by name, and user models given as ``path/to/file.py:factory``."""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
from functools import partial
from typing import Callable

from .bert import ZOO as BERT_ZOO
from .bert import BertModel
from .gpt import GPT
from .gpt import ZOO as GPT_ZOO
from .transformer import Transformer, TransformerEncoderModel


class ModelNotFound(LookupError):
    """An unknown model name or an unloadable ``file.py:factory``."""


ZOO: dict[str, Callable] = {
    "transformer-tiny": partial(Transformer, vocab_size=64, d_model=32, num_heads=4, d_ff=64, num_layers=2,
                                max_len=128, name="transformer-tiny"),
    # sized for training on a 2-core CPU (attngraph train): the vocabulary comes from the data
    "transformer-small": partial(Transformer, vocab_size=1000, d_model=256, num_heads=4, d_ff=1024, num_layers=3,
                                 max_len=256, name="transformer-small"),
    "transformer-base": partial(Transformer, 37000, 512, 8, 2048, 6, name="transformer-base"),
    "transformer-big": partial(Transformer, 37000, 1024, 16, 4096, 6, name="transformer-big"),
    "encoder-tiny": lambda: TransformerEncoderModel(32, 4, 64, 2, name="encoder-tiny"),
    "transformer-base-encoder": lambda: TransformerEncoderModel(512, 8, 2048, 6, name="transformer-base-encoder"),
    "transformer-base-encoder-layer": lambda: TransformerEncoderModel(512, 8, 2048, 1, name="transformer-base-encoder-layer"),
}
ZOO.update(GPT_ZOO)
ZOO.update(BERT_ZOO)


def names() -> list[str]:
    return sorted(ZOO)


#: What each kind of zoo model is, by class.
KINDS = {Transformer: "encoder-decoder", TransformerEncoderModel: "encoder", GPT: "decoder-only LM",
         BertModel: "encoder (BERT)"}


def count(n: int) -> str:
    """A parameter count in short: ``44.8 K``, ``63.1 M``, ``214 M``."""
    for unit, scale in (("G", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return str(n)


def describe(name: str) -> dict:
    """A zoo model's ``kind`` (encoder-decoder, encoder, decoder-only LM), ``params`` (its parameter count,
    at its default vocabulary: from the parameters' shapes, without tracing or weights) and ``weights``
    (where they come from: seeded random, or a real checkpoint and whether its package is installed)."""
    from .bert import MINILM_PACKAGE, BertConfig, CheckpointError
    try:
        model = get(name)
        installed = True
    except CheckpointError:  # minilm-l6 without its package: the same shapes from its config
        model = BertModel(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                     intermediate_size=1536), name=name)
        installed = False
    kind = next((k for cls, k in KINDS.items() if isinstance(model, cls)), None) or \
        ("encoder-decoder" if hasattr(model, "encode_entry") else
         "decoder-only LM" if hasattr(model, "decode_step") else "encoder")
    params = sum(int(ty.numel()) for ty in model.parameter_types().values())
    if isinstance(model, BertModel) and (model.checkpoint is not None or not installed):
        package = MINILM_PACKAGE.replace("_", "-")
        weights = f"checkpoint from {package} ({'installed' if installed else 'not installed'})"
    else:
        weights = "seeded random"
    return {"name": name, "kind": kind, "params": params, "weights": weights}


def _load_factory(spec: str):
    path, _, factory = spec.rpartition(":")
    if not os.path.isfile(path):
        raise ModelNotFound(f"model file {path!r} not found (from {spec!r})")
    modname = "attngraph_user_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    module_spec = importlib.util.spec_from_file_location(modname, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ModelNotFound(f"importing {path} failed{_line_in(path, e)}: {type(e).__name__}: {e}") from e
    fn = getattr(module, factory, None)
    if fn is None:
        found = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        raise ModelNotFound(f"{path} has no {factory!r}; callables there: {', '.join(found) or 'none'}")
    return fn


def _line_in(path: str, error: BaseException) -> str:
    """`` at FILE:LINE`` of the innermost frame of ``error``'s traceback in the user's file ``path``."""
    where = ""
    tb = error.__traceback__
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
            where = f" at {path}:{tb.tb_lineno}"
        tb = tb.tb_next
    if not where and isinstance(error, SyntaxError) and error.lineno:
        where = f" at {path}:{error.lineno}"
    return where


def _required_params(fn) -> list[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or other callable without a signature: just call it
        return []
    return [p.name for p in params if p.default is p.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def get(spec: str):
    """A model instance: a zoo name (``transformer-base``), ``path/to/file.py:factory`` or a saved
    ``torch.export`` program (``model.pt2``: its weights are the model's ``default_params``)."""
    if spec in ZOO:
        return ZOO[spec]()
    if spec.endswith(".pt2"):
        if not os.path.isfile(spec):
            raise ModelNotFound(f"program file {spec!r} not found")
        from ..frontends import torch_export
        return torch_export.load(spec)
    if ":" in spec and spec.rpartition(":")[0].endswith(".py"):
        fn = _load_factory(spec)
        required = _required_params(fn)
        if required:
            raise ModelNotFound(f"{spec}: the factory must be callable without arguments, but it needs "
                                f"{', '.join(required)}; give it defaults or wrap it in one that has none")
        try:
            model = fn()
        except Exception as e:  # the user's constructor: one line that names its failing line
            path = spec.rpartition(":")[0]
            raise ModelNotFound(f"{spec}: creating the model failed{_line_in(path, e)}: "
                                f"{type(e).__name__}: {e}") from e
        from ..nn import Module
        if not isinstance(model, Module):
            raise ModelNotFound(f"{spec} returned {type(model).__name__}, not an attngraph.nn.Module")
        if not hasattr(model, "name"):
            model.name = spec.rpartition(":")[2]
        return model
    close = difflib.get_close_matches(spec, ZOO, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ModelNotFound(f"unknown model {spec!r}.{hint} Known models: {', '.join(names())}; "
                        f"or give your own as path/to/file.py:factory, or a saved torch.export program (.pt2)")


def build(name: str, **overrides):
    """Zoo model ``name`` with some of its constructor's arguments changed (``vocab_size=`` from a training
    set's vocabulary, ``dropout=``): the zoo's encoder-decoder models take them."""
    factory = ZOO.get(name)
    if not isinstance(factory, partial):
        raise ModelNotFound(f"{name!r} is not a zoo model built from arguments; those are: "
                            f"{', '.join(n for n, f in ZOO.items() if isinstance(f, partial))}")
    try:
        return factory(**overrides)
    except TypeError as e:
        raise ModelNotFound(f"{name}: {e}") from None


def load_graph(spec: str):
    """The traced graph of a zoo model or ``file.py:factory``."""
    from ..nn import trace
    return trace(get(spec))


__all__ = ["BertModel", "GPT", "build", "describe", "count", "load_graph", "Transformer", "TransformerEncoderModel",
           "ModelNotFound", "ZOO", "names", "get"]
