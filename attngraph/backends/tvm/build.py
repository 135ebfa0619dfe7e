"""Compile a graph's kernels with TVM into one library, for one target.

Each distinct kernel of the plan (``plan.py``) is the target's hand-written kernel where it has one
(``Target.kernel``), else the generic lowering (``lower/``) with the target's generic schedule; a
kernel's other forms (``Target.forms``) are built beside it.  All dims stay symbolic: one build serves
any batch and length.  The compiled library is cached by what it is built from (``cache.py``).
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field

from ...ir import Graph
from ...threads import ensure_threads
from .. import BuildError
from . import cache, lower
from .kernel import finish, generic_func, hand_scheduled, kernel_func
from .plan import KernelSpec, kernel_nodes, plan_kernels
from .progress import Progress
from .runtime.device import open_or_compile_only
from .runtime.executor import CompiledModel
from .shapes import DimVars, scalar_dims
from .targets import Target, get_target

__all__ = ["KernelSpec", "Kernels", "build_kernels", "compile_graph", "for_target", "generic_func", "kernel_func",
           "kernel_nodes", "lower_kernels", "plan_kernels"]


def _compiles(func, target: Target) -> bool:
    import tvm
    try:
        target.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}))
        return True
    except Exception:  # noqa: BLE001 - any failure means: do not use this kernel
        return False


@dataclass
class Kernels:
    """A compiled kernel library and the device that runs it."""
    device: object  # an executor.Device running the library's kernels
    library: str | None  # the library file (None: nothing to compile)
    specs: list[KernelSpec]
    symbol_of: dict[int, str]
    target: str  # its name
    #: kernel name -> [(dims, variant name)]: tuned static variants, used when a run's dims match
    variants: dict = field(default_factory=dict)
    cached: bool = False
    seconds: dict = field(default_factory=dict)


def lower_kernels(g: Graph, target, *, generic: bool = False, tuned=None, variants=None,
                  progress: Progress | None = None, dv: DimVars | None = None, plan=None) -> tuple[dict, set]:
    """Every kernel of ``g`` as a scheduled PrimFunc for ``target``, by name (with the target's other
    forms, e.g. ``NAME__few``, and tuned static variants), and the names of the hand-scheduled ones.
    ``plan``: ``plan_kernels(g)`` where the caller has it already."""
    target = get_target(target)
    specs, symbol_of = plan or plan_kernels(g)
    dv = dv or DimVars()
    progress = progress or Progress(enabled=False)
    funcs, hand = {}, set()
    progress.stage(f"lowering {len(specs)} kernels", total=len(specs))
    for spec in specs:
        try:
            func = None if generic else hand_scheduled(spec, dv, target)
            if func is not None:
                hand.add(spec.name)
            funcs[spec.name] = finish(func if func is not None else generic_func(spec, dv, target), spec, dv)
            for suffix, form in ({} if generic else target.forms(spec, dv)).items():
                funcs[spec.name + suffix] = finish(form, spec, dv, spec.name + suffix)
            for sizes, name in (variants or {}).get(spec.name, ()):
                funcs[name] = tuned.static_func(spec, sizes).with_attr("global_symbol", name)
        except BuildError:
            raise
        except Exception as e:  # re-raised with the node's context
            nid = next(nid for nid, name in symbol_of.items() if name == spec.name)
            raise BuildError(f"cannot lower {g.describe(nid)}: {type(e).__name__}: {e}") from e
        progress.advance()
    return funcs, hand


def build_kernels(g: Graph, target="llvm", *, progress: Progress | None = None, generic: bool = False,
                  tuning_db: str | None = None, device: str | None = None) -> Kernels:
    """Compile every kernel of ``g`` for ``target`` into one library (or load it from the cache); the
    kernels run on the target's device (``device``: another, e.g. the CUDA source emulator)."""
    import tvm
    ensure_threads()
    target = get_target(target)
    target.check_device(device)
    progress = progress or Progress(enabled=False)
    specs, symbol_of = plan_kernels(g)
    kernels = Kernels(None, None, specs, symbol_of, target.name)
    if not specs:
        kernels.device = open_or_compile_only(target, None, (), device)
        return kernels
    tuned, extra = None, f"generic={generic}"
    if tuning_db:
        from .tune import TunedSchedules
        try:
            tuned = TunedSchedules(tuning_db, target.tvm_target)
        except FileNotFoundError as e:
            raise BuildError(str(e)) from None
        extra += f";tuning={tuned.fingerprint()}"
        for spec in specs:
            sizes = tuned.variants(spec)
            if sizes:
                kernels.variants[spec.name] = [(d, spec.name + "__" + "_".join(f"{k}{v}" for k, v in d.items()))
                                               for d in sizes]
    key = cache.module_key([tuple(s) for s in specs], target.cache_key(), extra)
    path = cache.lookup(key, target.library_name)
    if path is not None:
        kernels.device = open_or_compile_only(target, path, cache.functions(path), device)
        kernels.library, kernels.cached = path, True
        return kernels
    start = time.perf_counter()
    dv = DimVars()
    funcs, hand = lower_kernels(g, target, generic=generic, tuned=tuned, variants=kernels.variants,
                                progress=progress, dv=dv, plan=(specs, symbol_of))
    kernels.seconds["lower"] = time.perf_counter() - start
    progress.stage(f"compiling {len(funcs)} kernels for {target.name}")
    start = time.perf_counter()
    try:
        executable = target.compile(tvm.IRModule(funcs))
    except Exception as e:
        # A hand-scheduled kernel that TVM cannot compile must not sink the build: find it (one
        # compile per hand-scheduled kernel, only on this path), say so, use the generic kernel.
        broken = [name for name in sorted(hand) if not _compiles(funcs[name], target)]
        if not broken:
            raise BuildError(f"TVM could not compile the kernels of {g.name}: {type(e).__name__}: {e}") from e
        for spec in specs:
            if spec.name in broken:
                warnings.warn(f"hand-scheduled kernel {spec.name} ({spec.op} on "
                              f"{', '.join(str(t) for t in spec.in_types)}) does not compile; using the generic kernel",
                              RuntimeWarning, stacklevel=2)
                funcs[spec.name] = finish(generic_func(spec, dv, target), spec, dv)
        executable = target.compile(tvm.IRModule(funcs))
    kernels.seconds["compile"] = time.perf_counter() - start
    progress.stage(f"linking {target.library_name}")
    start = time.perf_counter()
    path = cache.store(key, executable.export_library, sorted(funcs), target.library_name)
    if path is None:  # caching off: a private temporary library
        path = os.path.join(tempfile.mkdtemp(prefix="attngraph-"), target.library_name)
        executable.export_library(path)
    kernels.seconds["link"] = time.perf_counter() - start
    kernels.device, kernels.library = open_or_compile_only(target, path, funcs, device), path
    return kernels


def for_target(g: Graph, target, weight_dtype: str | None = None, **options) -> Graph:
    """``g`` in the layouts ``target``'s kernels read (``Target.layout``)."""
    return get_target(target).layout(g, weight_dtype, **options)


def compile_graph(g: Graph, params, target="llvm", *, progress: Progress | None = None,
                  generic: bool = False, tuning_db: str | None = None, weight_dtype: str | None = None,
                  device: str | None = None, layout: bool = True):
    """Compile ``g`` (at whatever stage the passes left it) for ``target`` and bind ``params``:
    a ``CompiledModel`` taking and returning NumPy arrays (``weight_dtype``: see ``for_target``;
    ``layout=False``: the target's layout passes ran already)."""
    target = get_target(target)
    if layout:
        g = for_target(g, target, weight_dtype)
    kernels = build_kernels(g, target, progress=progress, generic=generic, tuning_db=tuning_db, device=device)
    model = CompiledModel(g, params, kernels.device, kernels.symbol_of, target=target.name, variants=kernels.variants)
    model.kernels = kernels
    return model
