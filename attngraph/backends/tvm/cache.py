"""The compile cache: compiled kernel libraries keyed by what they are built from.

A module is fully determined by its distinct kernels (op, attributes, operand and result types, in
order), the target, the tuning records applied, and the code that lowers and schedules them, so the
key is a hash of exactly that.  Entries live under ``$ATTNGRAPH_CACHE`` (default
``~/.cache/attngraph``) as ``kernels/<key>/kernels.so`` plus ``kernels.json`` (the function names); an
unchanged rebuild loads the library instead of compiling.  ``ATTNGRAPH_CACHE=off`` disables it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile

from ...ir.serialize import canonical

#: The code that decides what a kernel compiles to: every file of this package (lowering, schedules,
#: hand kernels, targets) and of the IR (the ops' meaning, the masks' one definition); editing one
#: invalidates the cache.
_CODE_DIRS = (os.path.dirname(os.path.abspath(__file__)),
              os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "ir"))


def cache_root() -> str | None:
    """The cache directory, or None when caching is off."""
    root = os.environ.get("ATTNGRAPH_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "attngraph"))
    return None if root.lower() in ("off", "0", "none", "") else root


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    import tvm
    h = hashlib.sha256(tvm.__version__.encode())
    for top in _CODE_DIRS:
        for folder, dirs, files in sorted(os.walk(top)):
            dirs.sort()
            for name in sorted(files):
                if name.endswith((".py", ".h")):
                    path = os.path.join(folder, name)
                    with open(path, "rb") as f:
                        h.update(os.path.relpath(path, top).encode() + f.read())
    return h.hexdigest()


def module_key(kernels: list[tuple], target: str, extra: str = "") -> str:
    """The cache key of a module made of ``kernels`` (each ``(name, op, attrs, in_types, out_type)``)."""
    items = [[name, op, canonical(attrs), [str(t) for t in ins], str(out)] for name, op, attrs, ins, out in kernels]
    text = json.dumps({"kernels": items, "target": target, "code": code_fingerprint(), "extra": extra},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def lookup(key: str, library_name: str = "kernels.so") -> str | None:
    """Path of the cached library for ``key``, or None."""
    root = cache_root()
    if root is None:
        return None
    path = os.path.join(root, "kernels", key, library_name)
    return path if os.path.isfile(path) and os.path.isfile(os.path.join(root, "kernels", key, "kernels.json")) else None


def functions(path: str) -> list[str]:
    """The function names of the cached library at ``path`` (from its ``kernels.json``)."""
    with open(os.path.join(os.path.dirname(path), "kernels.json")) as f:
        return list(json.load(f)["functions"])


def store(key: str, export, names: list[str], library_name: str = "kernels.so") -> str | None:
    """Write a library into the cache with ``export(path)``; returns its path (None when caching is off).
    The entry appears atomically (written aside, then renamed), so a concurrent reader never sees half of it."""
    root = cache_root()
    if root is None:
        return None
    final = os.path.join(root, "kernels", key)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{key}.", dir=os.path.dirname(final))
    try:
        export(os.path.join(staging, library_name))
        with open(os.path.join(staging, "kernels.json"), "w") as f:
            json.dump({"functions": names}, f)
        try:
            os.rename(staging, final)
        except OSError:  # another process stored the same key first: theirs is as good
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return os.path.join(final, library_name)
