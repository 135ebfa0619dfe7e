"""The compile targets, one family per folder: ``cpu`` (``llvm``, ``llvm:CPU``), ``cuda`` (``cuda``,
``cuda:ARCH``) and ``vulkan``.  ``get_target(name)`` makes a target once from its name and returns the
same object after; a family's module is imported on first use (commands that do not compile never
import the GPU ones).  Adding a target is adding a family here and a folder beside it."""

from __future__ import annotations

import importlib

from ... import BuildError
from .base import RUNTIME_ONLY, Target, compiler_loaded, portable_host

#: family -> (its module in this package, what it compiles for: the CLI's help)
FAMILIES = {
    "llvm": ("cpu", "this CPU with its vector units; llvm:CPU for another CPU model (llvm:x86-64-v3: any AVX2 "
                    "machine, llvm:x86-64-v4: AVX-512)"),
    "cuda": ("cuda", "NVIDIA GPUs (sm_80; cuda:sm_90 or --arch for another architecture)"),
    "vulkan": ("vulkan", "any Vulkan driver (Mesa's lavapipe on a CPU)"),
}
_MADE: dict[str, Target] = {}


def get_target(name) -> Target:
    """The target called ``name`` (``llvm``, ``llvm:x86-64-v3``, ``cuda``, ``cuda:sm_90``, ``vulkan``; a
    ``Target`` is returned as it is).  An unknown name or a bad option is a ``BuildError`` saying which."""
    if isinstance(name, Target):
        return name
    name = str(name)
    if name not in _MADE:
        family, _, option = name.partition(":")
        if family not in FAMILIES:
            raise BuildError(f"unknown or not yet supported target {name!r}; available here: {', '.join(FAMILIES)} "
                             f"(llvm:CPU for another CPU model, e.g. llvm:x86-64-v3; cuda:ARCH for another CUDA "
                             f"architecture, e.g. cuda:sm_90)")
        module = importlib.import_module(f".{FAMILIES[family][0]}", __package__)
        _MADE[name] = module.make_target(option or None, name)  # a bad option raises BuildError here
    return _MADE[name]


def target_status(name: str) -> dict:
    """Whether target ``name`` compiles and runs here: {"target", "compile", "run", "note"}, where
    compile / run are None when possible, else the reason (``attngraph targets``)."""
    try:
        target = get_target(name)
    except Exception as e:  # noqa: BLE001 - a family module that fails to import is the reason itself
        return {"target": name, "compile": f"{type(e).__name__}: {e}", "run": "cannot compile", "note": ""}
    compile_problem, run_problem, note = target.availability()
    return {"target": name, "compile": compile_problem, "run": run_problem, "note": note}


__all__ = ["FAMILIES", "RUNTIME_ONLY", "Target", "compiler_loaded", "get_target", "portable_host", "target_status"]
