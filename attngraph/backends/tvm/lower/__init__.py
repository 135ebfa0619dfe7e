"""Every op as a TVM tensor expression, one table (``registry.LOWERINGS``) filled by one module per
group of ops: ``elementwise``, ``contraction``, ``rows``, ``attention``, ``layout``; a target's own ops (the
CPU's packed weights) register theirs the same way.  ``lower`` looks an op up; ``generic_func`` makes
the unscheduled PrimFunc that a target's generic schedule turns into a kernel.  Importing this package
imports no TVM: the groups load on first use (an artifact loads with TVM's runtime alone)."""

from __future__ import annotations

from ....ir import TensorType
from ....ir.types import HALF_DTYPES
from .registry import LOWERINGS, Call, LoweringError, lookup, lowering


def _load_groups() -> None:
    from . import attention, contraction, elementwise, layout, rows  # noqa: F401  (each registers its lowerings)


#: the name of a stage reading a half-precision operand into float32 is the result's name, this, the operand's index
WIDENED = "_f32_in"


def is_widening(stage: str) -> bool:
    """Whether ``stage`` (a block name) only reads a half-precision operand into float32 (``lower``): a schedule
    inlines it into its readers (dlight's matmul rule then sees half-precision products and takes tensor cores)."""
    head, _, index = stage.rpartition(WIDENED)
    return bool(head) and index.isdigit()


def lower(op: str, attrs: dict, xs: list, out: TensorType, dv, name: str = "out"):
    """The tensor expression computing ``op(xs)`` with result type ``out``.  Half-precision operands
    (float16, bfloat16) are read into float32 and the op computed there, the result rounded to ``out``'s
    type once (``passes.precision``): every lowering is written for float32 and float64 alone."""
    _load_groups()
    half = [str(x.dtype) in HALF_DTYPES for x in xs]
    if out.dtype not in HALF_DTYPES and not any(half):
        return lookup(op)(Call(op, attrs, list(xs), out, dv.shape(out.shape), dv, name))
    from tvm import te
    def widen(x, k):
        return te.compute(x.shape, lambda *i: x[i].astype("float32"), name=f"{name}{WIDENED}{k}")
    wide = [widen(x, k) if h else x for k, (x, h) in enumerate(zip(xs, half))]
    inner = out.with_dtype("float32") if out.dtype in HALF_DTYPES else out
    result = lookup(op)(Call(op, attrs, wide, inner, dv.shape(out.shape), dv, f"{name}_f32"))
    if str(result.dtype) == out.dtype:
        return result
    return te.compute(result.shape, lambda *i: result[i].astype(out.dtype), name=name)


def generic_func(op: str, attrs: dict, in_types, out_type: TensorType, dv):
    """The generic lowering of an op on these types as an unscheduled PrimFunc (params: the operands in
    order, then the output)."""
    from tvm import te
    phs = [te.placeholder(dv.shape(t.shape), t.dtype, name=f"in{i}") for i, t in enumerate(in_types)]
    return te.create_prim_func(phs + [lower(op, attrs, phs, out_type, dv, name="out")])


def lowered_ops() -> set:
    """Every op with a lowering (the groups' and those registered by the targets imported so far)."""
    _load_groups()
    return set(LOWERINGS)


__all__ = ["LOWERINGS", "WIDENED", "Call", "LoweringError", "generic_func", "is_widening", "lower", "lowered_ops",
           "lowering"]
