"""Weights: deterministic initialization, safetensors / NumPy archives, and checks that name the
tensor that is missing, unexpected or of the wrong shape."""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .ir import Graph, TensorType
from .ir.types import HALF_DTYPES, numpy_dtype


class WeightsError(ValueError):
    """Weights that do not fit the model, or a weights file that cannot be read."""


def _param_specs(model) -> dict[str, tuple[TensorType, tuple]]:
    if isinstance(model, Graph):
        return {n.name: (n.type, tuple(n.meta.get("init", ("normal", 0.02)))) for n in model.nodes() if n.op == "param"}
    return {name: (TensorType(p.shape, p.dtype), p.init) for name, p in model.named_parameters()}


def _fill(rng: np.random.Generator, ty: TensorType, init: tuple, perturb: bool) -> np.ndarray:
    shape = ty.concrete({})
    kind = init[0]
    if kind == "normal":
        x = rng.normal(0.0, init[1], shape)
    elif kind == "uniform":
        x = rng.uniform(-init[1], init[1], shape)
    elif kind == "xavier_uniform":
        fan_in, fan_out = (shape[0], shape[-1]) if len(shape) >= 2 else (shape[0], shape[0])
        bound = np.sqrt(6.0 / (fan_in + fan_out))
        x = rng.uniform(-bound, bound, shape)
    elif kind in ("zeros", "ones"):
        # ``perturb`` makes norms and biases non-trivial so that tests catch a swapped or dropped one.
        x = np.full(shape, 1.0 if kind == "ones" else 0.0)
        if perturb:
            x = x + rng.normal(0.0, 0.1, shape)
    else:
        raise WeightsError(f"unknown init {init!r}")
    if ty.dtype in HALF_DTYPES:  # drawn as a float32 model's, rounded once (``passes.precision.params_in``)
        x = x.astype(np.float32)
    return x.astype(numpy_dtype(ty.dtype))


def init_params(model, seed: int = 0, perturb: bool = False) -> dict[str, np.ndarray]:
    """Initial values for every parameter of a ``Graph`` or ``Module``.

    Each tensor draws from its own generator seeded by ``seed`` and its name, so a value does not
    change when other parameters are added.  ``perturb`` also randomizes ones/zeros initializers."""
    out = {}
    for name, (ty, init) in _param_specs(model).items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        out[name] = _fill(rng, ty, init, perturb)
    return out


def default_params(model, seed: int = 0) -> dict[str, np.ndarray]:
    """The weights ``model`` runs on when the user gives none: its own when it has them (a zoo model
    backed by a real checkpoint defines ``default_params(seed)``), else ``init_params(model, seed)``."""
    own = getattr(model, "default_params", None)
    return own(seed) if callable(own) else init_params(model, seed)


def is_float_array(value: np.ndarray) -> bool:
    """A NumPy float array, or ``ml_dtypes``' bfloat16 (which NumPy does not count as a float kind)."""
    return value.dtype.kind == "f" or value.dtype.name == "bfloat16"


def check_params(model, params: Mapping[str, np.ndarray]) -> None:
    """Raise ``WeightsError`` naming every missing, unexpected or wrongly shaped/typed tensor."""
    specs = _param_specs(model)
    problems = []
    for name in sorted(set(specs) - set(params)):
        problems.append(f"missing tensor {name!r} (expected {specs[name][0]})")
    for name in sorted(set(params) - set(specs)):
        problems.append(f"unexpected tensor {name!r} (the model has no such parameter)")
    for name in sorted(set(specs) & set(params)):
        ty, value = specs[name][0], np.asarray(params[name])
        want = ty.concrete({})
        if tuple(value.shape) != want:
            problems.append(f"tensor {name!r} has shape {tuple(value.shape)}, expected {want}")
        elif not (ty.is_float and is_float_array(value)) and value.dtype.kind != np.dtype(ty.dtype).kind:
            problems.append(f"tensor {name!r} has dtype {value.dtype}, expected {ty.dtype}")
    if problems:
        raise WeightsError(f"weights do not fit the model ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))


def save_weights(path: str, params: Mapping[str, np.ndarray]) -> None:
    """Write ``.safetensors`` (default) or ``.npz``."""
    arrays = {k: np.require(v, requirements="C") for k, v in params.items()}  # keeps 0-d arrays 0-d
    if path.endswith(".npz"):
        np.savez(path, **arrays)
    else:
        from safetensors.numpy import save_file
        save_file(arrays, path)


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _read_bfloat16(data: bytes) -> dict[str, np.ndarray] | None:
    """A safetensors file holding bfloat16 tensors, which ``safetensors.numpy`` cannot read (NumPy has no
    bfloat16; ``ml_dtypes`` gives one): read by the format (an 8-byte little-endian header length, the
    JSON header of dtype, shape and byte range per tensor, the data).  None for a file without them."""
    import json
    import struct

    from .ir.types import numpy_dtype
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    if not any(isinstance(v, dict) and v.get("dtype") == "BF16" for v in header.values()):
        return None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        dtype = numpy_dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        count = (stop - start) // dtype.itemsize
        out[name] = np.frombuffer(data, dtype, count, 8 + size + start).reshape(info["shape"]).copy()
    return out


def safetensors_bytes(params: Mapping[str, np.ndarray]) -> bytes:
    """``params`` as the bytes of a ``.safetensors`` file (written whole by the caller: a checkpoint's part)."""
    from safetensors.numpy import save
    return save({k: np.require(v, requirements="C") for k, v in params.items()})


def read_safetensors(data: bytes, where: str) -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` file's bytes; malformed bytes are a ``WeightsError`` naming ``where``."""
    try:
        from safetensors.numpy import load
        return _read_bfloat16(data) or load(data)
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise WeightsError(f"cannot read {where!r} as a safetensors file: {type(e).__name__}: {e}") from None


def load_weights(path: str) -> dict[str, np.ndarray]:
    """Read ``.safetensors`` or ``.npz``; a missing or malformed file is a ``WeightsError``."""
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path!r} not found")
    if not path.endswith(".npz"):
        with open(path, "rb") as f:
            return read_safetensors(f.read(), path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise WeightsError(f"cannot read {path!r} as a NumPy archive: {type(e).__name__}: {e}") from None


def check_finite(params: Mapping[str, np.ndarray], where: str) -> None:
    """A ``WeightsError`` naming the tensors of ``params`` (from ``where``) that hold NaN or infinity: weights
    of a diverged training run, or damaged ones, which would only compute NaN."""
    bad = []
    for name, value in params.items():
        value = np.asarray(value)
        if is_float_array(value):
            count = value.size - int(np.count_nonzero(np.isfinite(value)))
            if count:
                bad.append(f"{name} ({count} of {value.size})")
    if bad:
        from .files import listing
        raise WeightsError(f"{where}: weights hold NaN or infinite values, in {len(bad)} tensor(s): {listing(bad)}; "
                           f"such weights compute nothing but NaN (a diverged training run saves none)")


# -- checkpoints of other frameworks ---------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """One checkpoint tensor's way into a model: ``source`` its name in the checkpoint, ``targets`` the
    parameters it fills (several: the tensor splits evenly along its first axis, as PyTorch's
    ``in_proj_weight`` holds Q, K and V), ``transpose`` for linear weights (PyTorch stores (out, in),
    the DSL (in, out)).  Names are templates: ``{i}`` stands for a layer number in both."""
    source: str
    targets: tuple
    transpose: bool = False

    def _regex(self, template: str):
        return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")

    def match_source(self, name: str) -> list[str] | None:
        """The parameter names that checkpoint tensor ``name`` fills, or None."""
        m = self._regex(self.source).match(name)
        return None if m is None else [t.format(**m.groupdict()) for t in self.targets]

    def source_of(self, target: str) -> str | None:
        """The checkpoint name that fills parameter ``target``, or None."""
        for t in self.targets:
            m = self._regex(t).match(target)
            if m is not None:
                return self.source.format(**m.groupdict())
        return None


def import_state_dict(tensors: Mapping[str, np.ndarray], model, rules, *, prefixes=(), ignore: str | None = None,
                      source: str = "checkpoint", error=WeightsError) -> dict[str, np.ndarray]:
    """``tensors`` (a checkpoint's state dict: NumPy arrays, or anything ``np.asarray`` reads, torch
    tensors included) mapped onto ``model``'s parameters by ``rules``: linear weights transposed,
    packed tensors split.  A name may carry one of ``prefixes``; names matching the regex ``ignore``
    are skipped (buffers, heads the model has not).  Raises ``error`` naming every missing,
    unexpected or misshapen tensor, with both names and the shapes found and expected."""
    specs = _param_specs(model)
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    problems = []
    for name, value in tensors.items():
        bare = next((name[len(p):] for p in prefixes if name.startswith(p)), name)
        if ignore and re.match(ignore, bare):
            continue
        rule, targets = next(((r, t) for r in rules if (t := r.match_source(bare)) is not None), (None, None))
        if rule is None or not all(t in specs for t in targets):
            problems.append(f"unexpected tensor {name!r} (no parameter of the model takes it)")
            continue
        clash = next((t for t in targets if t in origin), None)
        if clash is not None:
            problems.append(f"tensors {origin[clash]!r} and {name!r} both map to {clash!r}")
            continue
        arrow = ", ".join(targets)
        origin.update((t, name) for t in targets)  # found, whether or not it fits
        value = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
        shapes = [specs[t][0].concrete({}) for t in targets]
        parts = [s[::-1] if rule.transpose else s for s in shapes]
        want = (sum(p[0] for p in parts),) + tuple(parts[0][1:])
        if tuple(value.shape) != want or any(p[1:] != parts[0][1:] for p in parts):
            problems.append(f"tensor {name!r} (-> {arrow}) has shape {tuple(value.shape)}, expected {want}")
            continue
        if value.dtype.kind != "f":
            problems.append(f"tensor {name!r} (-> {arrow}) has dtype {value.dtype}, expected a float type")
            continue
        start = 0
        for t, part in zip(targets, parts):
            piece = value[start:start + part[0]]
            start += part[0]
            out[t] = np.ascontiguousarray(piece.T if rule.transpose else piece, dtype=specs[t][0].dtype)
    for t in specs:
        if t not in origin:
            src = next((s for r in rules if (s := r.source_of(t)) is not None), None)
            problems.append(f"missing tensor for {t!r}" + (f" (expected {src!r})" if src else ""))
    if problems:
        what = getattr(model, "name", None) or type(model).__name__
        raise error(f"{source} does not fit {what} ({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
    return out


def _attention_rules(ours: str, theirs: str) -> list[Rule]:
    """PyTorch ``nn.MultiheadAttention`` at ``theirs`` -> the DSL's ``MultiHeadAttention`` at ``ours``."""
    proj = [f"{ours}.{p}_proj" for p in "qkv"]
    return [Rule(f"{theirs}.in_proj_weight", tuple(f"{p}.weight" for p in proj), transpose=True),
            Rule(f"{theirs}.in_proj_bias", tuple(f"{p}.bias" for p in proj)),
            Rule(f"{theirs}.out_proj.weight", (f"{ours}.out_proj.weight",), transpose=True),
            Rule(f"{theirs}.out_proj.bias", (f"{ours}.out_proj.bias",))]


def _layer_rules(stack: str, attentions: dict, norms: int) -> list[Rule]:
    layer = f"{stack}.layers.{{i}}"
    rules = [r for ours, theirs in attentions.items() for r in _attention_rules(f"{layer}.{ours}", f"{layer}.{theirs}")]
    for n in (1, 2):
        rules += [Rule(f"{layer}.linear{n}.weight", (f"{layer}.ffn.linear{n}.weight",), transpose=True),
                  Rule(f"{layer}.linear{n}.bias", (f"{layer}.ffn.linear{n}.bias",))]
    rules += [Rule(f"{layer}.norm{n}.{w}", (f"{layer}.norm{n}.{w}",)) for n in range(1, norms + 1) for w in ("weight", "bias")]
    return rules + [Rule(f"{stack}.norm.{w}", (f"{stack}.norm.{w}",)) for w in ("weight", "bias")]


#: ``torch.nn.Transformer`` (and its encoder / decoder stacks) -> ``attngraph.nn.Transformer``.
TORCH_TRANSFORMER = (_layer_rules("encoder", {"self_attn": "self_attn"}, 2)
                     + _layer_rules("decoder", {"self_attn": "self_attn", "cross_attn": "multihead_attn"}, 3))


def from_torch_transformer(state_dict: Mapping, model, at: str = "",
                           source: str = "torch.nn.Transformer state dict") -> dict:
    """The parameters of ``model``, an ``attngraph.nn.Transformer``, from a ``torch.nn.Transformer``
    state dict: Q, K and V split out of ``in_proj_weight`` / ``in_proj_bias``, linear weights
    transposed, ``multihead_attn`` read as ``cross_attn``.  ``at``: the path of ``model`` inside the
    module that is traced (``"t"`` for ``self.t = nn.Transformer(...)``), which prefixes every name.
    Every tensor that maps to nothing, every parameter left without one and every misshapen tensor is
    named (``WeightsError``)."""
    params = import_state_dict(state_dict, model, TORCH_TRANSFORMER, source=source)
    return {f"{at}.{k}" if at else k: v for k, v in params.items()}
