"""Weights: deterministic initialization, safetensors / NumPy archives, and checks that name the
tensor that is missing, unexpected or of the wrong shape."""

from __future__ import annotations

import os
import zlib
from typing import Mapping

import numpy as np

from .ir import Graph, TensorType


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
    return x.astype(ty.dtype)


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
        elif value.dtype.kind != np.dtype(ty.dtype).kind:
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


def load_weights(path: str) -> dict[str, np.ndarray]:
    """Read ``.safetensors`` or ``.npz``; a missing or malformed file is a ``WeightsError``."""
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path!r} not found")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        from safetensors.numpy import load_file
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        kind = "NumPy archive" if path.endswith(".npz") else "safetensors file"
        raise WeightsError(f"cannot read {path!r} as a {kind}: {type(e).__name__}: {e}") from None
