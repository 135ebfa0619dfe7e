"""Model inputs: checking them against a signature (binding the symbolic dims) and making random
ones that respect each input's declared range."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .ir import TensorType
from .ir import dims as D


class InputError(ValueError):
    """Inputs that do not fit the model's signature."""


def is_device_tensor(value) -> bool:
    """A tensor in a device's memory (a TVM runtime tensor, say), as a compiled model returns with
    ``keep``: it has a shape and a dtype but is not a NumPy value."""
    return not isinstance(value, (np.ndarray, np.generic, int, float, bool, list, tuple)) \
        and hasattr(value, "shape") and hasattr(value, "dtype")


class _Described:
    """Shape and dtype of a device tensor, for checking without copying it to the host."""

    def __init__(self, value):
        self.shape = tuple(int(d) for d in value.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(str(value.dtype))


def bind_dims(signature: Mapping[str, TensorType], inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Check names, ranks, dtypes and dims of ``inputs``; return the symbolic dims' values."""
    if not isinstance(inputs, Mapping):
        raise InputError(f"inputs must be a mapping of input name to array, got {type(inputs).__name__}; "
                         "expected " + ", ".join(f"{n}: {t}" for n, t in signature.items()))
    missing = sorted(set(signature) - set(inputs))
    extra = sorted(set(inputs) - set(signature))
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(extra)}"] if extra else [])
        raise InputError(f"inputs do not match the model ({'; '.join(parts)}); expected "
                         + ", ".join(f"{n}: {t}" for n, t in signature.items()))
    bindings: dict[str, int] = {}
    where: dict[str, str] = {}
    arrays = {name: _Described(inputs[name]) if is_device_tensor(inputs[name]) else np.asarray(inputs[name])
              for name in signature}
    for name, ty in signature.items():
        value = arrays[name]
        if value.ndim != ty.rank:
            raise InputError(f"input {name!r} has shape {value.shape}, expected rank {ty.rank} ({ty})")
        kind = np.dtype(ty.dtype).kind
        if value.dtype.kind != kind and not (kind == "f" and value.dtype.kind in "iu") \
                and not (kind == "i" and value.dtype.kind == "u"):
            raise InputError(f"input {name!r} has dtype {value.dtype}, expected {ty.dtype}")
        # A plain symbol takes its value from the first input that has it...
        for axis, (dim, size) in enumerate(zip(ty.shape, value.shape)):
            if isinstance(dim, str) and D.symbols(dim) == {dim} and dim not in bindings:
                if size < 1:
                    raise InputError(f"input {name!r}: dim {dim} (axis {axis}) must be at least 1, got {size}")
                bindings[dim] = int(size)
                where[dim] = f"input {name!r} axis {axis}"
    # ...and every dim of every input must then agree with those values.
    for name, ty in signature.items():
        for axis, (dim, size) in enumerate(zip(ty.shape, arrays[name].shape)):
            try:
                want = D.evaluate(dim, bindings)
            except D.DimError as e:
                raise InputError(f"input {name!r} axis {axis}: {e}") from None
            if want != size:
                source = f" (from {where[dim]})" if dim in where else ""
                expected = f"{want}" if str(dim) == str(want) else f"{dim} = {want}{source}"
                raise InputError(f"input {name!r} has shape {arrays[name].shape}, expected {ty}: "
                                 f"axis {axis} is {size}, expected {expected}")
    return bindings


class Binder:
    """``bind_dims`` for one signature that remembers the dims of the input types it has seen: the result
    depends only on each input's kind, shape and dtype, so a call with the same ones as an earlier call
    (a decode step's two dozen caches, step after step) is not checked again."""

    def __init__(self, signature: Mapping[str, TensorType]):
        self.signature = dict(signature)
        self._seen: dict = {}

    def __call__(self, inputs: Mapping) -> dict[str, int]:
        key = self._key(inputs)
        dims = self._seen.get(key) if key is not None else None
        if dims is None:
            dims = bind_dims(self.signature, inputs)
            if key is not None:
                if len(self._seen) >= 64:
                    self._seen.clear()
                self._seen[key] = dims
        return dict(dims)

    def _key(self, inputs) -> tuple | None:
        """What ``bind_dims`` reads of ``inputs``, or None where that is not cheap to tell (then it checks)."""
        if not isinstance(inputs, Mapping) or inputs.keys() != self.signature.keys():
            return None
        key = []
        for name in self.signature:
            value = inputs[name]
            if isinstance(value, (int, float, bool)):
                key.append(type(value))
            elif hasattr(value, "shape") and hasattr(value, "dtype"):
                key.append((type(value), tuple(value.shape), str(value.dtype)))
            else:
                return None
        return tuple(key)


def dim_sizes(signature: Mapping[str, TensorType], defaults: Mapping[str, int], dims: Mapping[str, int]) -> dict:
    """The model's default dim sizes with the user's ``dims`` (``--dim NAME=VALUE``) over them.  Every
    name in ``dims`` must be a dim of the inputs or of ``defaults``: a misspelt name is an error, not
    silently ignored."""
    names = set(defaults)
    for ty in signature.values():
        for d in ty.shape:
            if isinstance(d, str):
                names |= D.symbols(d)
    unknown = sorted(set(dims) - names)
    if unknown:
        raise InputError(f"unknown dim {', '.join(unknown)} (--dim NAME=VALUE); this model's dims: "
                         f"{', '.join(sorted(names)) or 'none'}")
    return {**defaults, **dims}


def random_inputs(signature: Mapping[str, TensorType], dims: Mapping[str, int], seed: int = 0,
                  meta: Mapping[str, dict] | None = None) -> dict[str, np.ndarray]:
    """Random inputs: floats from N(0, 1) (their absolute values for an input whose meta says
    ``nonnegative``: an optimizer's second moment), integers in the input's ``[low, high)`` range, bools False."""
    rng = np.random.default_rng(seed)
    meta = meta or {}
    out = {}
    for name, ty in signature.items():
        try:
            shape = ty.concrete(dims)
        except D.DimError as e:
            raise InputError(f"input {name!r}: {e}; give it with --dim NAME=VALUE") from None
        info = meta.get(name, {})
        if ty.is_float:
            x = rng.standard_normal(shape)
            out[name] = (np.abs(x) if info.get("nonnegative") else x).astype(ty.dtype)
        elif ty.dtype == "bool":
            out[name] = np.zeros(shape, bool)
        else:
            high = info.get("high", 2)
            high = D.evaluate(high, dims) if isinstance(high, str) else high
            out[name] = rng.integers(info.get("low", 0), high, shape).astype(ty.dtype)
    return out
