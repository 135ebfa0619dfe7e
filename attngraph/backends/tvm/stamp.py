"""A build's stamp: one hash of everything an artifact is made from, so that an unchanged rebuild does
nothing (as make, ninja and cargo skip a target that is up to date).

What goes in: the traced graph (every node's op, attributes, constant arrays, metadata and operands),
the weights (the given arrays by content; else the seed, and the files a model reads its own weights
from, by content), the build options (target, opt level, dtypes, the tuning database by content), the
code (every source file of attngraph and the versions of TVM, NumPy, ml_dtypes and safetensors) and
this machine (its CPU's model and flags, which the llvm kernels are compiled for).  Computing it imports
no TVM, so checking a fresh artifact costs the model's trace and the hashing of its files.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import platform

import numpy as np

from ...ir import Graph
from ...ir.serialize import canonical

#: the distributions whose versions change what a build writes
_DISTRIBUTIONS = ("apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes", "safetensors")
_PACKAGE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def hash_files(paths, h=None, root: str | None = None):
    """``h`` (a new sha256) updated with each file's name (relative to ``root``) and bytes, in order."""
    h = h or hashlib.sha256()
    for path in paths:
        h.update(os.path.relpath(path, root or os.path.dirname(path)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h


def tree_files(top: str, suffixes=None) -> list[str]:
    """The files under ``top`` (a file: itself), in a stable order; ``suffixes``: only names ending so."""
    if os.path.isfile(top):
        return [top]
    out = []
    for folder, dirs, files in sorted(os.walk(top)):
        dirs.sort()
        out += [os.path.join(folder, f) for f in sorted(files) if suffixes is None or f.endswith(suffixes)]
    return out


@functools.lru_cache(maxsize=1)
def code_identity() -> str:
    """attngraph's source and the versions of what it builds with."""
    h = hash_files(tree_files(_PACKAGE, (".py", ".h")), root=_PACKAGE)
    for dist in _DISTRIBUTIONS:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = None
        h.update(f"{dist}={version};".encode())
    h.update(platform.python_version().encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def host_identity() -> str:
    """This machine's CPU as /proc/cpuinfo describes its first processor (model and flags: what the llvm
    target is detected from), and its architecture."""
    wanted = ("vendor_id", "cpu family", "model", "model name", "flags", "isa", "uarch")
    lines = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key = line.partition(":")[0].strip()
                if key in wanted:
                    lines.append(line.strip())
    except OSError:
        lines.append(platform.processor())
    return hashlib.sha256(("\n".join(lines) + platform.machine()).encode()).hexdigest()


def graph_identity(g: Graph) -> str:
    """Every node of ``g`` (op, name, type, attributes with arrays by content, metadata, operands), its inputs,
    outputs and metadata."""
    nodes = [[n.id, n.op, n.name, str(n.type), canonical(n.attrs), canonical(n.meta), g.operands(n.id)]
             for n in g.nodes()]
    text = json.dumps({"name": g.name, "inputs": g.inputs, "outputs": g.outputs, "meta": canonical(g.meta),
                       "nodes": nodes}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def weights_identity(module, params, seed: int) -> str | None:
    """The weights a build binds: ``params`` by content; else the seed of the random ones, and the files a
    model reads its own from (``module.checkpoint``, a file or directory).  None when that cannot be told (a
    model with its own ``default_params`` and no ``checkpoint`` to name them): such a build always runs."""
    h = hashlib.sha256()
    if params is not None:
        for name in sorted(params):
            value = np.ascontiguousarray(params[name])
            h.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
            h.update(memoryview(value).cast("B"))
        return "given:" + h.hexdigest()
    h.update(f"seed {seed};".encode())
    if callable(getattr(module, "default_params", None)):
        source = getattr(module, "checkpoint", None)
        if source is None:
            return None if not hasattr(module, "checkpoint") else "seed:" + h.hexdigest()
        if not os.path.exists(source):
            return None  # the build itself says what is missing
        hash_files(tree_files(source), h, root=source)
    return "seed:" + h.hexdigest()


def build_stamp(graph: Graph, weights: str | None, options: dict) -> str | None:
    """The stamp of building ``graph`` with ``weights`` (``weights_identity``) and ``options`` (target, opt
    level, dtypes, ...); None when the weights cannot be told (the build always runs)."""
    if weights is None:
        return None
    tuning_db = options.get("tuning_db")
    text = json.dumps({"graph": graph_identity(graph), "weights": weights, "options": canonical(options),
                       "tuning": hash_files(tree_files(tuning_db), root=tuning_db).hexdigest()
                       if tuning_db and os.path.exists(tuning_db) else None,
                       "code": code_identity(), "host": host_identity()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


__all__ = ["build_stamp", "code_identity", "graph_identity", "hash_files", "host_identity", "tree_files",
           "weights_identity"]
