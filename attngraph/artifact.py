"""The build artifact: a directory that runs without the model's Python code.

    DIR/manifest.json      model, target, opt level, input/output signature, kernel plan, versions
    DIR/graph.json         the optimized graph (so verify can re-run the interpreter from DIR alone)
    DIR/weights.safetensors  parameters, and the graph's constant arrays under ``__const__.*``
    DIR/kernels.so         the compiled TVM module

``build`` writes it, ``load`` gives a callable taking and returning NumPy arrays.
"""

from __future__ import annotations

import json
import os
import platform

import numpy as np

from .backends import BuildError
from .ir import Graph, serialize

FILES = ("manifest.json", "graph.json", "weights.safetensors", "kernels.so")
FORMAT = 1


class ArtifactError(RuntimeError):
    """A missing, incomplete or corrupted artifact directory."""


def _versions() -> dict:
    import tvm

    from . import __version__
    return {"attngraph": __version__, "tvm": tvm.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def build(graph: Graph, params, out_dir: str, target: str = "llvm", opt_level: int = 3) -> dict:
    """Optimize ``graph`` at ``opt_level``, compile it for ``target`` and write the artifact to ``out_dir``.
    Returns the manifest."""
    from .backends.tvm.build import TARGETS, build_module
    from .passes import optimize
    from .weights import check_params, save_weights
    if target not in TARGETS:
        raise BuildError(f"unknown or not yet supported target {target!r}; available here: {', '.join(TARGETS)}")
    check_params(graph, params)
    g, report = optimize(graph, opt_level)
    module, symbol_of = build_module(g)
    os.makedirs(out_dir, exist_ok=True)
    obj, arrays = serialize.to_json(g)
    tensors = {k: v for k, v in params.items() if k in g.params}
    tensors.update(arrays)
    save_weights(os.path.join(out_dir, "weights.safetensors"), tensors)
    with open(os.path.join(out_dir, "graph.json"), "w") as f:
        json.dump(obj, f)
    if module is not None:
        module.export_library(os.path.join(out_dir, "kernels.so"))
    manifest = {
        "format": FORMAT, "model": graph.name, "target": target, "opt_level": opt_level,
        "inputs": {n: t.to_json() for n, t in g.input_types().items()},
        "outputs": {n: t.to_json() for n, t in g.output_types().items()},
        "kernel_plan": [{"node": g.node(nid).name, "op": g.node(nid).op, "kernel": sym} for nid, sym in symbol_of.items()],
        "kernels": sorted(set(symbol_of.values())),
        "versions": _versions(),
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def is_artifact(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.json"))


def load(path: str):
    """The compiled model in ``path``: ``model(inputs: dict) -> dict`` of NumPy arrays; ``model.graph``,
    ``model.manifest`` and ``model.params`` describe it."""
    import tvm

    from .backends.tvm.build import CompiledModel
    from .weights import WeightsError, load_weights
    if not os.path.isdir(path):
        raise ArtifactError(f"{path!r} is not a directory; build one with: attngraph build MODEL -o {path}")
    missing = [f for f in FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise ArtifactError(f"artifact {path!r} is incomplete: {', '.join(missing)} missing; rebuild it with attngraph build")
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
        with open(os.path.join(path, "graph.json")) as f:
            obj = json.load(f)
        tensors = load_weights(os.path.join(path, "weights.safetensors"))
        graph = serialize.from_json(obj, tensors)
    except (ValueError, KeyError, WeightsError) as e:
        raise ArtifactError(f"artifact {path!r} is corrupted ({type(e).__name__}: {e}); rebuild it with attngraph build") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"artifact {path!r} has format {manifest.get('format')}, this attngraph reads {FORMAT}; rebuild it")
    try:
        module = tvm.runtime.load_module(os.path.join(path, "kernels.so"))
    except Exception as e:  # noqa: BLE001 - the loader's own message is kept
        raise ArtifactError(f"cannot load {path}/kernels.so ({e}); rebuild it with attngraph build") from None
    by_name = {graph.node(nid).name: nid for nid in graph.nx.nodes}
    symbol_of = {by_name[k["node"]]: k["kernel"] for k in manifest["kernel_plan"]}
    params = {k: v for k, v in tensors.items() if not k.startswith("__const__.")}
    model = CompiledModel(graph, params, module, symbol_of)
    model.manifest, model.params = manifest, params
    return model
