"""The table op -> lowering.

A lowering is ``fn(c: Call) -> te.Tensor``: the tensor expression computing ``c.op`` on the
placeholders ``c.xs`` with result type ``c.out``.  It follows the op's NumPy meaning in
``attngraph/ir`` one for one (broadcasting, masks, layouts); schedules are the targets' business.
This module imports no TVM: a target's own ops register their lowerings here when their module is
imported, also where only TVM's runtime is (an artifact loading)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from ....ir import TensorType

LOWERINGS: dict[str, Callable] = {}


class LoweringError(NotImplementedError):
    """An op (or an op with these attributes) that the TVM backend cannot lower."""


class Call(NamedTuple):
    """One op to lower: its attributes, its operands' placeholders, its result type and that type's
    dims as TVM expressions (``shape``), the graph's ``DimVars`` (``dv``), the name of the result."""
    op: str
    attrs: dict
    xs: list
    out: TensorType
    shape: list
    dv: object
    name: str

    @property
    def rank(self) -> int:
        return len(self.shape)


def lowering(*ops: str):
    """Register the decorated function as the lowering of ``ops``."""
    def register(fn):
        for op in ops:
            if op in LOWERINGS:
                raise ValueError(f"op {op!r} has two lowerings")
            LOWERINGS[op] = fn
        return fn
    return register


def lookup(op: str) -> Callable:
    """The lowering of ``op`` (``LoweringError`` where it has none)."""
    fn = LOWERINGS.get(op)
    if fn is None:
        raise LoweringError(f"op {op!r} has no TVM lowering")
    return fn
