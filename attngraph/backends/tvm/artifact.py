"""The build artifact: a directory that runs without the model's Python code.

    DIR/manifest.json        model, target, opt level, input/output signature (symbolic dims), the
                             kernel plan, the distinct kernels, the weights-only values computed at
                             load, a sample memory plan, file checksums, versions
    DIR/graph.json           the optimized graph (verify re-runs the interpreter from DIR alone)
    DIR/weights.safetensors  parameters, and the graph's constant arrays under ``__const__.*``
    DIR/kernels.so           the compiled kernels (one shared library)

``write_artifact`` writes it from a compiled model, ``load_artifact`` gives the callable back.

An artifact holds native code that runs when it is loaded (as any shared library does): load only
artifacts from a source you trust.  The manifest's sha256 of every file is checked on every load, before
the library is loaded: it detects damage (a truncated or flipped file, a rewrite that stopped half-way or
mixed two builds), not tampering (whoever can rewrite a file can rewrite the manifest).  A build holds
the directory's lock (``files.DirectoryLock``) and replaces each file whole (``files.write_file``), the
manifest last; the lock file ``.attngraph.lock`` stays in the directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import stat
import struct
import sys

import numpy as np

from ... import files as dirfiles
from ...ir import serialize
from ...weights import WeightsError, check_finite, read_safetensors, save_weights
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


def _own_name(name: str) -> bool:
    """A file name an artifact of some target holds (the kernel library and its companions: ``kernels.*``)."""
    return name in FILES or name.startswith("kernels.")


def _is_ours(path: str) -> bool:
    """Whether ``path`` holds an artifact's manifest (a JSON object with a format and checksums), not a
    user's ``manifest.json`` that only shares its name."""
    return dirfiles.our_json(os.path.join(path, "manifest.json"), ("format", "files")) is not None


def check_out_dir(out_dir: str, own_name, is_ours: bool, what: str = "an artifact") -> None:
    """Refuse (``ArtifactError``) to write ``out_dir`` unless it is missing, ``is_ours`` (a complete
    directory of this kind, replaced), empty but for attngraph's lock and temporaries, or holds the lock file
    (an attngraph directory whose first write was stopped) and nothing but names for which ``own_name``
    holds.  Never writes over a user's files that only share a name with ours."""
    if not os.path.isdir(out_dir) or is_ours:
        return
    others = dirfiles.foreign(out_dir)
    if os.path.lexists(os.path.join(out_dir, dirfiles.LOCK)):  # attngraph's: its own files may be left from a
        others = [n for n in others if not own_name(n)]         # stopped write
    if others:
        raise ArtifactError(f"{out_dir!r} is a directory with other files in it ({dirfiles.listing(others)}), not "
                            f"{what}: give a new or empty directory (an existing one is replaced)")


@contextlib.contextmanager
def writing(out_dir: str, own_name, is_ours, what: str = "an artifact"):
    """Hold ``out_dir`` (made if missing) for one build: its ``files.DirectoryLock`` (``files.DirectoryBusy``
    at once while another process holds it), its contents checked (``check_out_dir``; ``is_ours(out_dir)``:
    whether it is a complete directory of this kind), what a stopped writer left removed.  A directory the
    build made is removed again if the build fails."""
    # Checked before the lock file is made (a refused directory is left as it was), and again holding it.
    check_out_dir(out_dir, own_name, is_ours(out_dir), what)
    created = not os.path.exists(out_dir)
    with dirfiles.DirectoryLock(out_dir, "building") as lock:
        try:
            check_out_dir(out_dir, own_name, is_ours(out_dir), what)
        except ArtifactError:
            lock.release(unmark=True)  # the lock file would mark a user's directory as attngraph's
            raise
        dirfiles.remove_temporaries(out_dir)
        try:
            yield
        except BaseException:  # a build that failed leaves no directory it made behind
            if created and not dirfiles.foreign(out_dir):
                shutil.rmtree(out_dir, ignore_errors=True)
            raise


@contextlib.contextmanager
def artifact_dir(out_dir: str):
    """``with artifact_dir(out_dir):`` holds ``out_dir`` for one build (``writing``), so that a build can hold it
    from before its compile: a second build into the same directory fails at once, not after compiling."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(writing(out_dir, _own_name, _is_ours))
        except OSError as e:
            raise _cannot_write(out_dir, e) from None
        yield


def _cannot_write(out_dir: str, e: OSError) -> ArtifactError:
    return ArtifactError(f"cannot write the artifact to {out_dir!r}: {e.strerror or e}"
                         + (f" ({e.filename})" if e.filename else ""))


def write_artifact(out_dir: str, model: CompiledModel, kernels: Kernels, manifest: dict, *, held: bool = False) -> dict:
    """Write ``model`` (compiled as ``kernels``) to ``out_dir``; returns the manifest as written.
    ``files.DirectoryBusy`` where another process is writing ``out_dir``; ``held``: the caller holds
    ``artifact_dir(out_dir)`` already."""
    with contextlib.nullcontext() if held else artifact_dir(out_dir):
        try:
            return _write(out_dir, model, kernels, manifest)
        except OSError as e:
            raise _cannot_write(out_dir, e) from None


def _write(out_dir: str, model: CompiledModel, kernels: Kernels, manifest: dict) -> dict:
    """The files of ``model``, written into ``out_dir`` (held by the caller).  Each file is replaced whole
    (never written through a link planted in the directory); the old manifest stays until the new files are
    in place, so a stopped rewrite fails their checksums."""
    g = model.graph
    obj, arrays = serialize.to_json(g)
    used = g.params  # a property that walks the graph: once, not per parameter
    tensors = {k: v for k, v in model.params.items() if k in used}
    tensors.update(arrays)
    dirfiles.write_file_by(out_dir, "weights.safetensors", lambda path: save_weights(path, tensors))
    dirfiles.write_file(out_dir, "graph.json", json.dumps(obj).encode())
    target = get_target(kernels.target)
    library = target.library_name
    if kernels.library is not None:
        dirfiles.write_file_by(out_dir, library, lambda path: shutil.copyfile(kernels.library, path))
    else:  # nothing to compute at run time (a graph of views and weights): an empty library marker
        dirfiles.write_file(out_dir, library, b"")
    names = [f for f in FILES if f != "manifest.json"] + [library]
    for name in target.companion_files:  # the device source and what else the compile wrote beside the library
        beside = os.path.join(os.path.dirname(kernels.library), name) if kernels.library else None
        if beside and os.path.isfile(beside):
            dirfiles.write_file_by(out_dir, name, lambda path, beside=beside: shutil.copyfile(beside, path))
            names.append(name)
    manifest = dict(manifest, library=library,
                    files={f: {"bytes": os.path.getsize(os.path.join(out_dir, f)),
                               "sha256": _sha256(os.path.join(out_dir, f))} for f in names})
    dirfiles.write_file(out_dir, "manifest.json", json.dumps(manifest, indent=1).encode())
    return manifest


def _plain_name(name) -> bool:
    """A file name inside the directory: no path separator, not ``.``/``..``, not absolute."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name
            and os.sep not in name and (os.altsep is None or os.altsep not in name) and not os.path.isabs(name))


def _check_names(path: str, manifest: dict, library, rebuild: str) -> None:
    """The manifest's ``library`` and every name in its ``files``: plain names of regular files inside
    ``path`` (not links, not paths elsewhere), each with a size and a checksum; the library, the graph and
    the weights among them."""
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        raise ArtifactError(f"artifact {path!r} is corrupted (its manifest lists no files with checksums); {rebuild}")
    for name in [library, *listed]:
        if not _plain_name(name):
            raise ArtifactError(f"artifact {path!r} is refused: its manifest names the file {name!r}, which is not "
                                f"a plain file name inside the directory; {rebuild}")
    if not os.path.lexists(os.path.join(path, library)):
        raise ArtifactError(f"artifact {path!r} is incomplete: {library} missing; {rebuild}")
    for name in [library, *listed]:
        try:
            mode = os.lstat(os.path.join(path, name)).st_mode
        except FileNotFoundError:
            raise ArtifactError(f"artifact {path!r} is incomplete: {name} missing; {rebuild}") from None
        if stat.S_ISLNK(mode):
            raise ArtifactError(f"artifact {path!r} is refused: {name} is a symbolic link; an artifact's files "
                                f"must be regular files inside its directory; {rebuild}")
        if not stat.S_ISREG(mode):
            raise ArtifactError(f"artifact {path!r} is refused: {name} is not a regular file; {rebuild}")
    for name in ("graph.json", "weights.safetensors", library):
        if name not in listed:
            raise ArtifactError(f"artifact {path!r} is corrupted (its manifest has no checksum of {name}); {rebuild}")
    for name, info in listed.items():
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)):
            raise ArtifactError(f"artifact {path!r} is corrupted (its manifest's entry for {name} has no size and "
                                f"sha256); {rebuild}")


#: the files a load parses: checked and parsed from the same bytes, so a rebuild replacing them meanwhile
#: cannot slip an unchecked file in
PARSED = ("graph.json", "weights.safetensors")


def _check_files(path: str, manifest: dict) -> dict[str, bytes]:
    """Every file's size and sha256 against the manifest, on every load, the weights included; returns the
    bytes of the ``PARSED`` files as they were checked."""
    kept = {}
    for name, info in manifest.get("files", {}).items():
        with open(os.path.join(path, name), "rb") as f:
            data = f.read()
        if len(data) != info["bytes"]:
            raise ArtifactError(f"artifact {path!r} is corrupted: {name} has {len(data)} bytes, the manifest says "
                                f"{info['bytes']}; rebuild it with attngraph build")
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            raise ArtifactError(f"artifact {path!r} is corrupted: {name} does not match its checksum in the "
                                f"manifest; rebuild it with attngraph build")
        if name in PARSED:
            kept[name] = data
    return kept


def _check_plan(path: str, manifest: dict, graph, by_name: dict, rebuild: str) -> None:
    """Each kernel plan entry's kernel is one the manifest lists, with the operand and output types of its node."""
    kernels = {k["name"]: k for k in manifest["kernels"]}
    for entry in manifest["kernel_plan"]:
        node, kernel = entry["node"], entry["kernel"]
        nid = by_name[node]
        spec = kernels.get(kernel)
        if spec is None:
            raise ArtifactError(f"artifact {path!r} is corrupted: its kernel plan calls kernel {kernel!r} for node "
                                f"{node!r}, and the manifest lists no such kernel; {rebuild}")
        n = graph.node(nid)
        want_in = [str(graph.node(o).type) for o in graph.operands(nid)]
        if list(spec["in_types"]) != want_in or spec["out_type"] != str(n.type) or spec.get("op", n.op) != n.op:
            raise ArtifactError(f"artifact {path!r} is corrupted: its kernel plan calls kernel {kernel!r} "
                                f"({spec.get('op')}: {', '.join(spec['in_types'])} -> {spec['out_type']}) for node "
                                f"{node!r} ({n.op}: {', '.join(want_in)} -> {n.type}); {rebuild}")


def _check_elf(file: str, name: str, path: str, rebuild: str) -> None:
    """A shared library dlopen can map: an ELF header of this machine's class and byte order, and every
    loaded segment and the section header table inside the file (a truncated library gives SIGBUS)."""
    def refuse(why: str):
        raise ArtifactError(f"artifact {path!r} is corrupted: {name} is not a loadable shared library ({why}); "
                            f"{rebuild}")

    size = os.path.getsize(file)
    with open(file, "rb") as f:
        ident = f.read(16)
        if len(ident) < 16 or ident[:4] != b"\x7fELF":
            refuse("no ELF header")
        cls, data = ident[4], ident[5]
        if cls not in (1, 2) or data not in (1, 2):
            refuse(f"ELF class {cls}, data encoding {data}")
        bits = 64 if cls == 2 else 32
        if bits != struct.calcsize("P") * 8:
            refuse(f"a {bits}-bit library; this Python is {struct.calcsize('P') * 8}-bit")
        if (data == 1) != (sys.byteorder == "little"):
            refuse(f"{'little' if data == 1 else 'big'}-endian; this machine is {sys.byteorder}-endian")
        e = "<" if data == 1 else ">"
        header = e + ("HHIQQQIHHHHHH" if bits == 64 else "HHIIIIIHHHHHH")
        raw = f.read(struct.calcsize(header))
        if len(raw) < struct.calcsize(header):
            refuse(f"its ELF header is cut off at {size} bytes")
        e_type, _, _, _, phoff, shoff, _, _, phentsize, phnum, shentsize, shnum, _ = struct.unpack(header, raw)
        if e_type != 3:  # ET_DYN
            refuse(f"ELF type {e_type}, not a shared object")
        ph_fmt = e + ("IIQQQQQQ" if bits == 64 else "IIIIIIII")
        sh_fmt = e + ("IIQQQQIIQQ" if bits == 64 else "IIIIIIIIII")
        if shoff:
            if shentsize < struct.calcsize(sh_fmt) or shoff + shentsize > size:
                refuse(f"its section header table at byte {shoff} is past the end of its {size} bytes (truncated?)")
            if shnum == 0 or phnum == 0xFFFF:  # more entries than the header holds: section 0 gives the counts
                f.seek(shoff)
                first = struct.unpack(sh_fmt, f.read(struct.calcsize(sh_fmt)))
                shnum = shnum or first[5]
                phnum = first[7] if phnum == 0xFFFF else phnum
            if shoff + shnum * shentsize > size:
                refuse(f"its section header table ends at byte {shoff + shnum * shentsize}, past the end of its "
                       f"{size} bytes (truncated?)")
        if phnum == 0 or phentsize < struct.calcsize(ph_fmt) or phoff + phnum * phentsize > size:
            refuse(f"its program headers ({phnum} at byte {phoff}) are missing or past the end of its {size} bytes")
        loads = 0
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            fields = struct.unpack(ph_fmt, f.read(struct.calcsize(ph_fmt)))
            p_type = fields[0]
            p_offset, p_filesz = (fields[2], fields[5]) if bits == 64 else (fields[1], fields[4])
            if p_type == 1:  # PT_LOAD
                loads += 1
                if p_offset + p_filesz > size:
                    refuse(f"its loaded segment {i} ends at byte {p_offset + p_filesz}, past the end of its "
                           f"{size} bytes (truncated?)")
        if not loads:
            refuse("no loadable segment")


def up_to_date(path: str, stamp: str | None) -> dict | None:
    """The manifest of the artifact in ``path`` when it was built with ``stamp`` (``stamp.build_stamp``) and every
    file it lists is whole (its size and sha256), else None: the build must run."""
    if stamp is None:
        return None
    manifest = dirfiles.our_json(os.path.join(path, "manifest.json"), ("format", "files"))
    if manifest is None or manifest.get("format") != FORMAT or manifest.get("stamp") != stamp:
        return None
    try:
        _check_names(path, manifest, manifest.get("library", "kernels.so"), "")
        _check_files(path, manifest)
    except (ArtifactError, OSError):
        return None
    return manifest


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
    _check_names(path, manifest, library, rebuild)
    checked = _check_files(path, manifest)  # before any of it is parsed, and before the library is loaded
    try:
        obj = json.loads(checked["graph.json"])
        tensors = read_safetensors(checked.pop("weights.safetensors"), os.path.join(path, "weights.safetensors"))
        graph = serialize.from_json(obj, tensors)
        by_name = {graph.node(nid).name: nid for nid in graph.nx.nodes}
        symbol_of = {by_name[k["node"]]: k["kernel"] for k in manifest["kernel_plan"]}
        variants = {k: [(v["dims"], v["kernel"]) for v in vs] for k, vs in manifest.get("variants", {}).items()}
        _check_plan(path, manifest, graph, by_name, rebuild)
    except (ValueError, KeyError, TypeError, WeightsError) as e:
        raise ArtifactError(f"artifact {path!r} is corrupted ({type(e).__name__}: {e}); {rebuild}") from None
    params = {k: v for k, v in tensors.items() if not k.startswith("__const__.")}
    try:
        check_finite(params, f"artifact {path!r}")
    except WeightsError as e:
        raise ArtifactError(f"{e}; {rebuild} from finite weights") from None
    library_path = os.path.join(path, library) if symbol_of else None
    if library_path and (library.endswith(".so") or target.library_name.endswith(".so")):  # an ELF library
        _check_elf(library_path, library, path, rebuild)
    ensure_threads()
    try:
        target.check_device(device)
        device = target.open_device(library_path, device)
    except (DeviceUnavailable, BuildError):  # the artifact is fine; this machine (or that device) cannot run it
        raise
    except Exception as e:  # noqa: BLE001 - the loader's own message is kept
        raise ArtifactError(f"cannot load {path}/{library} ({e}); {rebuild}") from None
    try:
        model = CompiledModel(graph, params, device, symbol_of, target=target.name, variants=variants)
    except (RuntimeError, WeightsError) as e:
        raise ArtifactError(f"artifact {path!r} does not fit together ({e}); {rebuild}") from None
    model.manifest = manifest
    return model
