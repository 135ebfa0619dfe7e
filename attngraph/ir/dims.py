"""Symbolic dimensions.

A dimension is either a Python ``int`` or a ``str`` naming a symbolic size.  The string is the
canonical form of a small polynomial over named sizes with integer coefficients, e.g. ``"batch"``,
``"batch*seq"`` or ``"seq + 1"``: enough for reshapes that merge dims, slices and concats along a
symbolic axis.  Canonical strings compare equal exactly when the polynomials are equal, so shape
checks are plain ``==``.
"""

from __future__ import annotations

import functools
import re
from typing import Mapping, Union

Dim = Union[int, str]

# A polynomial is {monomial: coefficient}; a monomial is a sorted tuple of symbol names.
_Poly = dict

_SYMBOL = re.compile(r"^[A-Za-z_][A-Za-z_0-9]*$")


class DimError(ValueError):
    """A dimension that cannot be parsed or evaluated."""


def _parse(dim: Dim) -> _Poly:
    if isinstance(dim, bool):
        raise DimError(f"a dimension must be an int or a symbol name, got {dim!r}")
    if isinstance(dim, int):
        return {(): dim} if dim else {}
    if not isinstance(dim, str):
        raise DimError(f"a dimension must be an int or a symbol name, got {dim!r}")
    poly: _Poly = {}
    text = dim.replace(" ", "").replace("-", "+-")
    for term in filter(None, text.split("+")):
        coef, syms = 1, []
        if term.startswith("-"):
            coef, term = -1, term[1:]
        for factor in term.split("*"):
            if factor.isdigit():
                coef *= int(factor)
            elif _SYMBOL.match(factor):
                syms.append(factor)
            else:
                raise DimError(f"cannot parse dimension {dim!r}")
        key = tuple(sorted(syms))
        poly[key] = poly.get(key, 0) + coef
    return {k: c for k, c in poly.items() if c}


def _format(poly: _Poly) -> Dim:
    if not poly:
        return 0
    if list(poly) == [()]:
        return poly[()]
    terms = []
    # Highest degree first, then alphabetical; the constant goes last.
    for key in sorted(poly, key=lambda k: (-len(k), k)):
        coef = poly[key]
        body = "*".join(key)
        if not body:
            text = str(abs(coef))
        elif abs(coef) == 1:
            text = body
        else:
            text = f"{abs(coef)}*{body}"
        sign = "-" if coef < 0 else "+"
        terms.append((sign, text))
    out = ("-" if terms[0][0] == "-" else "") + terms[0][1]
    for sign, text in terms[1:]:
        out += f" {sign} {text}"
    return out


def canonical(dim: Dim) -> Dim:
    """The canonical form of a dimension: an int, or a normalized symbolic string."""
    return _format(_parse(dim))


def add(a: Dim, b: Dim) -> Dim:
    pa, pb = _parse(a), _parse(b)
    for k, c in pb.items():
        pa[k] = pa.get(k, 0) + c
    return _format({k: c for k, c in pa.items() if c})


def sub(a: Dim, b: Dim) -> Dim:
    return add(a, mul(b, -1))


def mul(a: Dim, b: Dim) -> Dim:
    out: _Poly = {}
    for ka, ca in _parse(a).items():
        for kb, cb in _parse(b).items():
            key = tuple(sorted(ka + kb))
            out[key] = out.get(key, 0) + ca * cb
    return _format({k: c for k, c in out.items() if c})


def product(dims) -> Dim:
    out: Dim = 1
    for d in dims:
        out = mul(out, d)
    return out


def divide(a: Dim, b: Dim) -> Dim | None:
    """``a / b`` when it divides exactly as a monomial quotient, else None."""
    pa, pb = _parse(a), _parse(b)
    if len(pb) != 1:
        return a if pa == pb else None
    (kb, cb), = pb.items()
    out: _Poly = {}
    for ka, ca in pa.items():
        rest = list(ka)
        for s in kb:
            if s not in rest:
                return None
            rest.remove(s)
        if ca % cb:
            return None
        out[tuple(rest)] = ca // cb
    return _format(out)


def terms(dim: Dim) -> dict[tuple[str, ...], int]:
    """The polynomial of ``dim`` as {sorted tuple of symbol names: integer coefficient}."""
    return _parse(dim)


@functools.lru_cache(maxsize=4096)
def _frozen_terms(dim: Dim) -> tuple:
    """``_parse(dim)`` as an immutable tuple, memoized: executors evaluate the same dims every call."""
    return tuple(_parse(dim).items())


def symbols(dim: Dim) -> set[str]:
    terms = _frozen_terms(dim) if isinstance(dim, str) else _parse(dim).items()
    return {s for key, _ in terms for s in key}


def is_static(dim: Dim) -> bool:
    return isinstance(dim, int)


def evaluate(dim: Dim, bindings: Mapping[str, int]) -> int:
    """The integer value of ``dim`` given values for its symbols."""
    if type(dim) is int:
        return dim
    total = 0
    for key, coef in _frozen_terms(dim) if isinstance(dim, str) else _parse(dim).items():
        term = coef
        for s in key:
            if s not in bindings:
                raise DimError(f"no value for symbolic dimension {s!r} (in {dim!r})")
            term *= int(bindings[s])
        total += term
    return total
