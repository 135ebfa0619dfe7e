"""A target's hand-written kernels as one table: a row per kernel, saying which ops it serves, in which
dtypes, under what guard, and in which form; the generic lowering with the target's schedule serves every
kernel no row takes.

    KernelTable(
        Row("dense projection", ("linear",), dense, dtypes=FLOATS, guard=is_dense),
        Row("attention, few rows", ("fused_attention",), few_rows_attention, dtypes=FLOATS, form=FEW_ROWS),
        ...)

``table.kernel(spec, dv, ctx)`` builds the first row of the main form that applies to ``spec``;
``table.forms(spec, dv, ctx)`` the first of each other form (``plan.FEW_ROWS``, ``ONE_ROW``, ``IN_PLACE``).
``ctx`` is what the builds read besides the kernel (the CPU's register tiles; a GPU target itself).  A row
applies when it serves the op, the output's dtype and its guard holds; a build may still find, while it
builds, that it cannot serve ``spec`` (a GPU kernel whose shared memory would not fit) and return None, and
the next row is asked.  The rows are data: tests read which ops have hand kernels from the tables
(``hand_ops``), and a new dtype is a column of a row, not a branch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ....ir import ops as O

MAIN = ""  # the kernel itself; the other forms are the plan's suffixes
ROW_OPS = ("<every row op>",)  # ``ops`` of a row serving each op whose ``OpDef.rows`` holds
ANY_OP = ("<every op>",)


def _always(spec, ctx) -> bool:
    return True


@dataclass(frozen=True)
class Row:
    """One hand-written kernel: ``build(spec, dv, ctx)`` serves ``ops`` (or ``ROW_OPS``, ``ANY_OP``) whose
    output dtype is one of ``dtypes`` (None: any) and for which ``guard(spec, ctx)`` holds, as ``form``."""
    name: str
    ops: tuple
    build: Callable
    dtypes: tuple | None = None
    guard: Callable = _always
    form: str = MAIN

    def serves(self, op: str) -> bool:
        if self.ops is ANY_OP:
            return True
        if self.ops is ROW_OPS:
            return O.get(op).rows
        return op in self.ops

    def applies(self, spec, ctx) -> bool:
        return (self.serves(spec.op) and (self.dtypes is None or str(spec.out_type.dtype) in self.dtypes)
                and self.guard(spec, ctx))


class KernelTable:
    """The rows of a target, asked in order (see the module's docstring)."""

    def __init__(self, *rows: Row):
        self.rows = rows

    def __add__(self, other: KernelTable) -> KernelTable:
        """This table's rows first, then ``other``'s (a target that adds kernels in front of its family's)."""
        return KernelTable(*self.rows, *other.rows)

    def _first(self, spec, dv, ctx, form: str):
        for row in self.rows:
            if row.form == form and row.applies(spec, ctx):
                func = row.build(spec, dv, ctx)
                if func is not None:
                    return func
        return None

    def kernel(self, spec, dv, ctx):
        """The hand-written kernel of ``spec``, or None: the generic lowering serves it."""
        return self._first(spec, dv, ctx, MAIN)

    def forms(self, spec, dv, ctx) -> dict:
        """{form: PrimFunc}: the other forms of ``spec``'s kernel, each from its first row that applies."""
        out = {}
        for form in dict.fromkeys(row.form for row in self.rows if row.form != MAIN):
            func = self._first(spec, dv, ctx, form)
            if func is not None:
                out[form] = func
        return out

    def serves(self, spec, ctx, ops: tuple | None = None) -> bool:
        """Whether a main-form row for ``spec``'s op (one of ``ops``, if given) applies to it (``ANY_OP`` rows,
        which serve by dtype, left out)."""
        return any(row.form == MAIN and row.ops is not ANY_OP and (ops is None or spec.op in ops)
                   and row.applies(spec, ctx) for row in self.rows)

    def ops(self) -> set[str]:
        """The ops of the registry some main-form row serves (``ANY_OP`` rows left out: they serve by dtype)."""
        return {op for op in O.REGISTRY for row in self.rows
                if row.form == MAIN and row.ops is not ANY_OP and row.serves(op)}


__all__ = ["ANY_OP", "KernelTable", "MAIN", "ROW_OPS", "Row"]
