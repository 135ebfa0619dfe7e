"""The compile targets, each one entry: how to make the TVM target, which kernels and schedules it
uses, how its library is compiled, and which device runs it.

Only ``llvm`` is registered here.  A GPU target registers itself the same way from its own module
(``register_target(TargetSpec("cuda", ...))``): the build, the cache, the artifact and the executor
then serve it unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from .. import BuildError


@dataclass(frozen=True)
class TargetSpec:
    """What the build needs to know about one target."""
    name: str
    #: () -> tvm.target.Target
    make_target: Callable
    #: (PrimFunc from te.create_prim_func, target) -> the PrimFunc scheduled for this target
    schedule: Callable
    #: (KernelSpec, DimVars, target) -> a complete scheduled PrimFunc, or None for "use schedule()"
    hand_kernel: Callable | None
    #: (path of the exported library, or None when there are no kernels) -> executor.Device
    open_device: Callable
    #: (IRModule, target) -> an object with export_library(path); default tvm.compile
    compile: Callable | None = None
    #: the library file name inside an artifact
    library_name: str = "kernels.so"


TARGET_SPECS: dict[str, TargetSpec] = {}
#: The names of the registered targets (a live view: targets registered later appear in it).
TARGETS = TARGET_SPECS.keys()


def register_target(spec: TargetSpec) -> None:
    """Add (or replace) a target."""
    TARGET_SPECS[spec.name] = spec


def get_target(name: str) -> TargetSpec:
    """The target called ``name``; an unknown name is an error listing the known ones."""
    try:
        return TARGET_SPECS[name]
    except KeyError:
        raise BuildError(f"unknown or not yet supported target {name!r}; available here: "
                         f"{', '.join(TARGET_SPECS)}") from None


def llvm_target():
    """The host CPU with its real features: plain "llvm" is generic x86-64 without AVX2/FMA (5x slower)."""
    import tvm
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def ensure_threads() -> None:
    """Use every core: TVM's thread pool defaults to one thread on this kind of machine.  Must run
    before the first parallel kernel starts the pool."""
    if os.environ.get("TVM_NUM_THREADS") is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["TVM_NUM_THREADS"] = str(cores)


def _cpu_kernel(spec, dv, target):
    try:
        from .cpu_kernels import cpu_kernel
    except ImportError:
        return None
    return cpu_kernel(spec.op, spec.attrs, list(spec.in_types), spec.out_type, dv, target)


def _cpu_schedule(func, target):
    from .schedule import schedule_generic
    return schedule_generic(func)


def _open_cpu(path: str | None):
    import tvm

    from .executor import TVMDevice
    return TVMDevice(tvm.runtime.load_module(path) if path else None, tvm.cpu())


register_target(TargetSpec("llvm", llvm_target, _cpu_schedule, _cpu_kernel, _open_cpu))
