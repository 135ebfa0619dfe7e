"""The build artifact: a directory that runs without the model's Python code.

    DIR/manifest.json        model, target, opt level, input/output signature (symbolic dims), the
                             kernel plan, the distinct kernels, the weights-only values computed at
                             load, a sample memory plan, file checksums, versions
    DIR/graph.json           the optimized graph (verify re-runs the interpreter from DIR alone)
    DIR/weights.safetensors  parameters, and the graph's constant arrays under ``__const__.*``
    DIR/kernels.so           the compiled kernels (one shared library)

``write_artifact`` writes it from a compiled model, ``load_artifact`` gives the callable back.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil

import numpy as np

from ...ir import serialize
from ...weights import WeightsError, load_weights, save_weights
from .. import ArtifactError, BuildError, DeviceUnavailable, is_artifact  # noqa: F401  (re-exported)
from .build import Kernels
from .runtime.executor import CompiledModel
from .targets import FAMILIES, get_target

#: The files every artifact has; the kernel library (kernels.so for llvm) is named by the target.
FILES = ("manifest.json", "graph.json", "weights.safetensors")
FORMAT = 2


def versions() -> dict:
    import tvm

    from ...version import __version__
    return {"attngraph": __version__, "tvm": tvm.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest_of(model: CompiledModel, kernels: Kernels, *, model_name: str, opt_level: int) -> dict:
    """The manifest describing ``model`` (files' checksums are added when they are written)."""
    g = model.graph
    name = {nid: g.node(nid).name for nid in g.nx.nodes}
    dims = g.meta.get("dims", {})
    manifest = {
        "format": FORMAT, "model": model_name, "target": kernels.target, "opt_level": opt_level,
        "target_info": get_target(kernels.target).describe(),
        "inputs": {n: t.to_json() for n, t in g.input_types().items()},
        "outputs": {n: t.to_json() for n, t in g.output_types().items()},
        "kernel_plan": [{"node": name[s.node], "op": g.node(s.node).op, "kernel": s.kernel,
                         "operands": [name[o] for o in s.operands], "scalar_dims": list(s.scalars)}
                        for s in model.steps if s.kind == "kernel"],
        "kernels": [{"name": k.name, "op": k.op, "in_types": [str(t) for t in k.in_types], "out_type": str(k.out_type)}
                    for k in kernels.specs],
        "variants": {k: [{"dims": d, "kernel": v} for d, v in vs] for k, vs in model.variants.items()},
        "views": [name[s.node] for s in model.steps if s.kind == "view"],
        "precomputed": [name[nid] for nid in model.precomputed],
        "versions": versions(),
    }
    if dims and set(dims) >= set().union(*(t.symbols for t in g.input_types().values())):
        plan = model.memory(**dims)
        manifest["memory_plan"] = {
            "note": "planned again for each call's dims; this is the plan at the model's default dims",
            "dims": dims, "buffer_bytes": plan.buffer_bytes, "peak_bytes": plan.peak_bytes,
            "naive_bytes": plan.naive_bytes,
            "buffer_of": {name[nid]: b for nid, b in plan.buffer_of.items()}}
    return manifest


def write_artifact(out_dir: str, model: CompiledModel, kernels: Kernels, manifest: dict) -> dict:
    """Write ``model`` (compiled as ``kernels``) to ``out_dir``; returns the manifest as written."""
    try:
        return _write(out_dir, model, kernels, manifest)
    except OSError as e:
        raise ArtifactError(f"cannot write the artifact to {out_dir!r}: {e.strerror or e}"
                            + (f" ({e.filename})" if e.filename else "")) from None


def _write(out_dir: str, model: CompiledModel, kernels: Kernels, manifest: dict) -> dict:
    g = model.graph
    if os.path.isdir(out_dir) and not is_artifact(out_dir):
        # (An artifact whose rewrite stopped before its manifest holds only our own files.)
        others = sorted(f for f in os.listdir(out_dir) if f not in FILES and not f.startswith("kernels."))
        if others:  # never write over files of the user's that only share a name with ours
            shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            raise ArtifactError(f"{out_dir!r} is a directory with other files in it ({shown}), not an "
                                f"artifact: give a new or empty directory (an existing artifact is replaced)")
    os.makedirs(out_dir, exist_ok=True)
    # A half-written directory must not pass for a good one: the manifest goes last.
    if os.path.exists(os.path.join(out_dir, "manifest.json")):
        os.remove(os.path.join(out_dir, "manifest.json"))
    obj, arrays = serialize.to_json(g)
    used = g.params  # a property that walks the graph: once, not per parameter
    tensors = {k: v for k, v in model.params.items() if k in used}
    tensors.update(arrays)
    save_weights(os.path.join(out_dir, "weights.safetensors"), tensors)
    with open(os.path.join(out_dir, "graph.json"), "w") as f:
        json.dump(obj, f)
    target = get_target(kernels.target)
    library = target.library_name
    if kernels.library is not None:
        shutil.copyfile(kernels.library, os.path.join(out_dir, library))
    else:  # nothing to compute at run time (a graph of views and weights): an empty library marker
        open(os.path.join(out_dir, library), "wb").close()
    files = [f for f in FILES if f != "manifest.json"] + [library]
    for name in target.companion_files:  # the device source and what else the compile wrote beside the library
        beside = os.path.join(os.path.dirname(kernels.library), name) if kernels.library else None
        if beside and os.path.isfile(beside):
            shutil.copyfile(beside, os.path.join(out_dir, name))
            files.append(name)
    manifest = dict(manifest, library=library,
                    files={f: {"bytes": os.path.getsize(os.path.join(out_dir, f)),
                               "sha256": _sha256(os.path.join(out_dir, f))} for f in files})
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def _check_files(path: str, manifest: dict) -> None:
    for name, info in manifest.get("files", {}).items():
        file = os.path.join(path, name)
        size = os.path.getsize(file)
        if size != info["bytes"]:
            raise ArtifactError(f"artifact {path!r} is corrupted: {name} has {size} bytes, the manifest says "
                                f"{info['bytes']}; rebuild it with attngraph build")
        # The weights are large: their size and the safetensors header checks catch truncation.
        if name != "weights.safetensors" and _sha256(file) != info["sha256"]:
            raise ArtifactError(f"artifact {path!r} is corrupted: {name} does not match its checksum in the "
                                f"manifest; rebuild it with attngraph build")


def load_artifact(path: str, device: str | None = None) -> CompiledModel:
    """The compiled model in ``path``: ``model(inputs) -> outputs`` (NumPy arrays by name), with
    ``model.graph``, ``model.params`` and ``model.manifest``.  ``device``: another device than the
    target's own (``emulator``: a cuda build on the CUDA source emulator)."""
    from ...threads import ensure_threads
    rebuild = "rebuild it with: attngraph build MODEL -o " + path
    if not os.path.isdir(path):
        raise ArtifactError(f"{path!r} is not a directory; build one with: attngraph build MODEL -o {path}")
    missing = [f for f in FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise ArtifactError(f"artifact {path!r} is incomplete: {', '.join(missing)} missing; {rebuild}")
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
    except ValueError as e:
        raise ArtifactError(f"artifact {path!r} is corrupted (manifest.json: {e}); {rebuild}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"artifact {path!r} is corrupted (manifest.json is not a JSON object); {rebuild}")
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"artifact {path!r} has format {manifest.get('format')}, this attngraph reads {FORMAT}; "
                            f"{rebuild}")
    try:
        target = get_target(str(manifest.get("target")))  # imports a GPU target's module on first use
    except BuildError:
        raise ArtifactError(f"artifact {path!r} was built for target {manifest.get('target')!r}, which this "
                            f"installation cannot run (targets here: {', '.join(FAMILIES)})") from None
    target.check_manifest(manifest, path)
    library = manifest.get("library", "kernels.so")
    if not os.path.isfile(os.path.join(path, library)):
        raise ArtifactError(f"artifact {path!r} is incomplete: {library} missing; {rebuild}")
    _check_files(path, manifest)
    try:
        with open(os.path.join(path, "graph.json")) as f:
            obj = json.load(f)
        tensors = load_weights(os.path.join(path, "weights.safetensors"))
        graph = serialize.from_json(obj, tensors)
        by_name = {graph.node(nid).name: nid for nid in graph.nx.nodes}
        symbol_of = {by_name[k["node"]]: k["kernel"] for k in manifest["kernel_plan"]}
        variants = {k: [(v["dims"], v["kernel"]) for v in vs] for k, vs in manifest.get("variants", {}).items()}
    except (ValueError, KeyError, TypeError, WeightsError) as e:
        raise ArtifactError(f"artifact {path!r} is corrupted ({type(e).__name__}: {e}); {rebuild}") from None
    ensure_threads()
    try:
        target.check_device(device)
        device = target.open_device(os.path.join(path, library) if symbol_of else None, device)
    except (DeviceUnavailable, BuildError):  # the artifact is fine; this machine (or that device) cannot run it
        raise
    except Exception as e:  # noqa: BLE001 - the loader's own message is kept
        raise ArtifactError(f"cannot load {path}/{library} ({e}); {rebuild}") from None
    params = {k: v for k, v in tensors.items() if not k.startswith("__const__.")}
    try:
        model = CompiledModel(graph, params, device, symbol_of, target=target.name, variants=variants)
    except (RuntimeError, WeightsError) as e:
        raise ArtifactError(f"artifact {path!r} does not fit together ({e}); {rebuild}") from None
    model.manifest = manifest
    return model
