"""Symbolic dims as TVM expressions: one int64 ``tirx.Var`` per dim name, shared by every kernel
built from one graph, so that one build serves any batch size and sequence length."""

from __future__ import annotations

from ...ir import dims as D
from ...ir.dims import Dim


class DimVars:
    """Maps attngraph dims (``512``, ``"seq"``, ``"batch*seq"``, ``"seq + 1"``) to int64 PrimExprs."""

    def __init__(self):
        self.vars: dict = {}

    def var(self, name: str):
        from tvm import tirx
        if name not in self.vars:
            self.vars[name] = tirx.Var(name, "int64")
        return self.vars[name]

    def __call__(self, dim: Dim):
        from tvm import tirx
        if isinstance(dim, int):
            return tirx.IntImm("int64", dim)
        expr = None
        for monomial, coef in D.terms(dim).items():
            factors = [self.var(name) for name in monomial]
            if coef != 1 or not factors:
                factors.insert(0, tirx.IntImm("int64", coef))
            term = factors[0]
            for f in factors[1:]:
                term = term * f
            expr = term if expr is None else expr + term
        return expr if expr is not None else tirx.IntImm("int64", 0)

    def shape(self, dims) -> list:
        return [self(d) for d in dims]


def scalar_dims(types) -> tuple[str, ...]:
    """The dim symbols a kernel on ``types`` cannot read off its buffers' shapes: those that occur
    only inside compound dims (``"s + 1"``, ``"past + seq"``).  Such a kernel takes them as trailing
    int64 arguments, in this (sorted) order."""
    used, whole = set(), set()
    for t in types:
        for d in t.shape:
            if isinstance(d, str):
                used |= D.symbols(d)
                if D.symbols(d) == {d}:
                    whole.add(d)
    return tuple(sorted(used - whole))
