"""One kernel's PrimFunc for a target: the target's hand-written kernel where it has one, else the
generic lowering with the target's generic schedule; ``finish`` names it and adds the dims no buffer
binds as arguments."""

from __future__ import annotations

import warnings

from . import lower
from .plan import KernelSpec
from .shapes import DimVars, scalar_dims
from .targets import Target, get_target


def hand_scheduled(spec: KernelSpec, dv: DimVars, target: Target):
    try:
        return target.kernel(spec, dv)
    except Exception as e:  # noqa: BLE001 - the generic kernel is always correct; say why it was used
        warnings.warn(f"hand-scheduled {spec.op} kernel failed for {[str(t) for t in spec.in_types]} "
                      f"({type(e).__name__}: {e}); using the generic kernel", RuntimeWarning, stacklevel=3)
        return None


def generic_func(spec: KernelSpec, dv: DimVars, target=None):
    """The generic lowering of ``spec`` as a PrimFunc (params: operands in order, then the output),
    with ``target``'s generic schedule (unscheduled when ``target`` is None)."""
    func = lower.generic_func(spec.op, spec.attrs, spec.in_types, spec.out_type, dv)
    return func if target is None else get_target(target).schedule(func)


def finish(func, spec: KernelSpec, dv: DimVars, name: str | None = None):
    """``func`` as kernel ``name`` (``spec.name``), taking the dims no buffer shape binds as int64 arguments."""
    scalars = scalar_dims(spec.in_types + (spec.out_type,))
    if scalars:  # after the output, in scalar_dims' order
        from tvm import tirx
        func = tirx.PrimFunc(list(func.params) + [dv.var(d) for d in scalars], func.body, func.ret_type, func.attrs)
    return func.with_attr("global_symbol", name or spec.name)


def kernel_func(spec: KernelSpec, dv: DimVars, target, generic: bool = False):
    """The scheduled PrimFunc of ``spec``: the target's hand-scheduled kernel if it has one (and not
    ``generic``), else the generic lowering with the target's generic schedule."""
    target = get_target(target)
    func = None if generic else hand_scheduled(spec, dv, target)
    return finish(func if func is not None else generic_func(spec, dv, target), spec, dv)
