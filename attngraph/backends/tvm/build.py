"""Compile a graph's kernels with TVM into one library.

Every node that is not a source, a view (reshape) or a weights-only value is one kernel call.  Calls
with identical (op, attributes, operand and result types) share one PrimFunc, so the 6 (or 12)
layers of a Transformer compile a few dozen distinct kernels.  Each kernel is the hand-scheduled
one from ``cpu_kernels`` where it has one, else the generic lowering (``lowering.py``) with the
generic schedule (``schedule.py``).  All dims stay symbolic: one build serves any batch and length.
The compiled library is cached by what it is built from (``cache.py``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

from ...ir import Graph, TensorType
from ...passes.memory import SOURCE_OPS, VIEW_OPS, weights_only
from .. import BuildError
from ..reference import DIM_ATTRS, describe
from . import cache
from .executor import CompiledModel
from .lowering import lower
from .progress import Progress
from .shapes import DimVars, scalar_dims
from ...threads import ensure_threads
from .targets import TARGETS, get_target, llvm_target, open_or_compile_only, spec_for

__all__ = ["TARGETS", "KernelSpec", "Kernels", "build_kernels", "compile_graph", "ensure_threads", "generic_func",
           "kernel_func", "kernel_nodes", "llvm_target", "plan_kernels", "resolve_target"]


class KernelSpec(NamedTuple):
    """One distinct kernel: what it computes and on which types (its dims symbolic)."""
    name: str
    op: str
    attrs: dict
    in_types: tuple
    out_type: TensorType


def resolve_target(name: str):
    """The TVM target for a target name; an unknown name is an error listing the known ones."""
    return get_target(name).make_target()


def kernel_nodes(g: Graph, constant: set[int] | None = None) -> list[int]:
    """The nodes of ``g`` that run as kernels, in execution order."""
    constant = weights_only(g) if constant is None else constant
    return [nid for nid in g.topo_order() if g.node(nid).op not in SOURCE_OPS + VIEW_OPS and nid not in constant]


def _dedup_key(op, attrs, in_types, out_type) -> str:
    return json.dumps([op, cache._canonical(attrs), [str(t) for t in in_types], str(out_type)], sort_keys=True)


def plan_kernels(g: Graph) -> tuple[list[KernelSpec], dict[int, str]]:
    """(the distinct kernels of ``g``, {node id: kernel name}) for every kernel node."""
    specs: dict[str, KernelSpec] = {}
    symbol_of = {}
    for nid in kernel_nodes(g):
        n = g.node(nid)
        in_types = tuple(g.node(o).type for o in g.operands(nid))
        for key in DIM_ATTRS:
            # Symbolic sizes reach a kernel only through its buffers' shapes; a symbolic start does not.
            if key not in ("shape", "n", "stop") and isinstance(n.attrs.get(key), str):
                raise BuildError(f"cannot lower {describe(g, n)}: a symbolic {key!r} is not supported by the TVM backend")
        key = _dedup_key(n.op, n.attrs, in_types, n.type)
        if key not in specs:
            specs[key] = KernelSpec(f"k{len(specs)}_{n.op}", n.op, dict(n.attrs), in_types, n.type)
        symbol_of[nid] = specs[key].name
    return list(specs.values()), symbol_of


def _hand_scheduled(spec: KernelSpec, dv: DimVars, target):
    tspec = spec_for(target)
    hand_kernel = tspec.hand_kernel if tspec is not None else None
    if hand_kernel is None:
        return None
    try:
        return hand_kernel(spec, dv, target)
    except Exception as e:  # noqa: BLE001 - the generic kernel is always correct; say why it was used
        warnings.warn(f"hand-scheduled {spec.op} kernel failed for {[str(t) for t in spec.in_types]} "
                      f"({type(e).__name__}: {e}); using the generic kernel", RuntimeWarning, stacklevel=3)
        return None


def generic_func(spec: KernelSpec, dv: DimVars, target=None):
    """The generic lowering of ``spec`` as a PrimFunc (params: operands in order, then the output),
    with ``target``'s generic schedule (unscheduled when ``target`` is None)."""
    from tvm import te
    phs = [te.placeholder(dv.shape(t.shape), t.dtype, name=f"in{i}") for i, t in enumerate(spec.in_types)]
    out = lower(spec.op, spec.attrs, phs, spec.out_type, dv, name="out")
    func = te.create_prim_func(phs + [out])
    if target is None:
        return func
    tspec = spec_for(target)
    if tspec is None:
        raise BuildError(f"no attngraph target compiles for TVM target kind {target.kind.name!r}")
    return tspec.schedule(func, target)


def _finish(func, spec: KernelSpec, dv: DimVars):
    """``func`` as kernel ``spec.name``, taking the dims no buffer shape binds as int64 arguments."""
    scalars = scalar_dims(spec.in_types + (spec.out_type,))
    if scalars:  # after the output, in scalar_dims' order
        from tvm import tirx
        func = tirx.PrimFunc(list(func.params) + [dv.var(d) for d in scalars], func.body, func.ret_type, func.attrs)
    return func.with_attr("global_symbol", spec.name)


def kernel_func(spec: KernelSpec, dv: DimVars, target, generic: bool = False):
    """The scheduled PrimFunc of ``spec``: the target's hand-scheduled kernel if it has one (and not
    ``generic``), else the generic lowering with the target's generic schedule."""
    func = None if generic else _hand_scheduled(spec, dv, target)
    return _finish(func if func is not None else generic_func(spec, dv, target), spec, dv)


def _compiles(func, target, compile_module) -> bool:
    import tvm
    try:
        compile_module(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), target)
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
    target: str
    #: kernel name -> [(dims, variant name)]: tuned static variants, used when a run's dims match
    variants: dict = field(default_factory=dict)
    cached: bool = False
    seconds: dict = field(default_factory=dict)


def lower_kernels(g: Graph, target: str = "llvm", *, generic: bool = False, tuned=None, variants=None,
                  progress: Progress | None = None, dv: DimVars | None = None, plan=None) -> tuple[dict, set]:
    """Every kernel of ``g`` as a scheduled PrimFunc for ``target``, by name (with the target's other
    forms, e.g. ``NAME__few``, and tuned static variants), and the names of the hand-scheduled ones.
    ``plan``: ``plan_kernels(g)`` where the caller has it already."""
    tspec = get_target(target)
    tgt = tspec.make_target()
    specs, symbol_of = plan or plan_kernels(g)
    dv = dv or DimVars()
    progress = progress or Progress(enabled=False)
    funcs, hand = {}, set()
    progress.stage(f"lowering {len(specs)} kernels", total=len(specs))
    for spec in specs:
        try:
            func = None if generic else _hand_scheduled(spec, dv, tgt)
            if func is not None:
                hand.add(spec.name)
            funcs[spec.name] = _finish(func if func is not None else generic_func(spec, dv, tgt), spec, dv)
            for suffix, form in (tspec.kernel_forms(spec, dv, tgt) if tspec.kernel_forms and not generic else {}).items():
                funcs[spec.name + suffix] = _finish(form, spec, dv).with_attr("global_symbol", spec.name + suffix)
            for sizes, name in (variants or {}).get(spec.name, ()):
                funcs[name] = tuned.static_func(spec, sizes).with_attr("global_symbol", name)
        except BuildError:
            raise
        except Exception as e:  # re-raised with the node's context
            nid = next(nid for nid, name in symbol_of.items() if name == spec.name)
            raise BuildError(f"cannot lower {describe(g, g.node(nid))}: {type(e).__name__}: {e}") from e
        progress.advance()
    return funcs, hand


def build_kernels(g: Graph, target: str = "llvm", *, progress: Progress | None = None, generic: bool = False,
                  tuning_db: str | None = None) -> Kernels:
    """Compile every kernel of ``g`` for ``target`` into one library (or load it from the cache)."""
    import tvm
    ensure_threads()
    tspec = get_target(target)
    tgt = tspec.make_target()
    progress = progress or Progress(enabled=False)
    specs, symbol_of = plan_kernels(g)
    kernels = Kernels(None, None, specs, symbol_of, target)
    if not specs:
        kernels.device = open_or_compile_only(tspec, None, ())
        return kernels
    tuned, extra = None, f"generic={generic}"
    if tuning_db:
        from .tune import TunedSchedules
        try:
            tuned = TunedSchedules(tuning_db, tgt)
        except FileNotFoundError as e:
            raise BuildError(str(e)) from None
        extra += f";tuning={tuned.fingerprint()}"
        for spec in specs:
            sizes = tuned.variants(spec)
            if sizes:
                kernels.variants[spec.name] = [(d, spec.name + "__" + "_".join(f"{k}{v}" for k, v in d.items()))
                                               for d in sizes]
    key = cache.module_key([tuple(s) for s in specs], str(tgt), extra)
    path = cache.lookup(key, tspec.library_name)
    if path is not None:
        kernels.device = open_or_compile_only(tspec, path, cache.functions(path))
        kernels.library, kernels.cached = path, True
        return kernels
    start = time.perf_counter()
    dv = DimVars()
    funcs, hand = lower_kernels(g, target, generic=generic, tuned=tuned, variants=kernels.variants,
                                progress=progress, dv=dv, plan=(specs, symbol_of))
    kernels.seconds["lower"] = time.perf_counter() - start
    progress.stage(f"compiling {len(funcs)} kernels for {target}")
    start = time.perf_counter()
    compile_module = tspec.compile or (lambda mod, t: tvm.compile(mod, target=t))
    try:
        executable = compile_module(tvm.IRModule(funcs), tgt)
    except Exception as e:
        # A hand-scheduled kernel that TVM cannot compile must not sink the build: find it (one
        # compile per hand-scheduled kernel, only on this path), say so, use the generic kernel.
        broken = [name for name in sorted(hand) if not _compiles(funcs[name], tgt, compile_module)]
        if not broken:
            raise BuildError(f"TVM could not compile the kernels of {g.name}: {type(e).__name__}: {e}") from e
        for spec in specs:
            if spec.name in broken:
                warnings.warn(f"hand-scheduled kernel {spec.name} ({spec.op} on "
                              f"{', '.join(str(t) for t in spec.in_types)}) does not compile; using the generic kernel",
                              RuntimeWarning, stacklevel=2)
                funcs[spec.name] = _finish(generic_func(spec, dv, tgt), spec, dv)
        executable = compile_module(tvm.IRModule(funcs), tgt)
    kernels.seconds["compile"] = time.perf_counter() - start
    progress.stage(f"linking {tspec.library_name}")
    start = time.perf_counter()
    path = cache.store(key, executable.export_library, sorted(funcs), tspec.library_name)
    if path is None:  # caching off: a private temporary library
        path = os.path.join(tempfile.mkdtemp(prefix="attngraph-"), tspec.library_name)
        executable.export_library(path)
    kernels.seconds["link"] = time.perf_counter() - start
    kernels.device, kernels.library = open_or_compile_only(tspec, path, funcs), path
    return kernels


#: The dtypes projection weights may be stored in (``weight_dtype``); None keeps the graph's.
WEIGHT_DTYPES = ("float32", "float16")


def for_target(g: Graph, target: str, weight_dtype: str | None = None) -> Graph:
    """``g`` in the layouts ``target``'s kernels read (``passes.layout``): a copy when it changes.
    ``weight_dtype="float16"`` stores the packed projection weights in half precision (computed in
    float32): half the bytes per decode step, at float16's rounding of every weight."""
    tspec = get_target(target)
    panel = tspec.weight_panel
    if weight_dtype not in (None, *WEIGHT_DTYPES):
        raise BuildError(f"weight dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    if weight_dtype == "float32":
        weight_dtype = None
    if weight_dtype and not panel:
        raise BuildError(f"weights stored as {weight_dtype} are supported on the llvm target only, not {target!r}")
    if not panel and not tspec.merged_qkv:
        return g
    from ...passes.layout import pack_weights, read_merged_qkv
    g = g.copy()
    if panel:
        pack_weights(g, panel, weight_dtype)
    if tspec.merged_qkv:
        read_merged_qkv(g)  # the attention reads q, k, v in place in a merged projection
    return g


def compile_graph(g: Graph, params, target: str = "llvm", *, progress: Progress | None = None,
                  generic: bool = False, tuning_db: str | None = None, weight_dtype: str | None = None):
    """Compile ``g`` (at whatever stage the passes left it) for ``target`` and bind ``params``:
    a ``CompiledModel`` taking and returning NumPy arrays (``weight_dtype``: see ``for_target``)."""
    g = for_target(g, target, weight_dtype)
    kernels = build_kernels(g, target, progress=progress, generic=generic, tuning_db=tuning_db)
    model = CompiledModel(g, params, kernels.device, kernels.symbol_of, target=target, variants=kernels.variants)
    model.kernels = kernels
    return model
