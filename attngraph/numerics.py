"""Compiled numerics against the float64 reference interpreter, with stated tolerances per dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

#: (rtol, atol) of a compiled result against the float64 interpreter, by the result's dtype.
TOLERANCE = {"float32": (1e-4, 1e-5), "float16": (1e-2, 1e-2), "bfloat16": (4e-2, 4e-2), "float64": (1e-10, 1e-12)}


@dataclass
class OutputCheck:
    name: str
    max_abs: float
    max_rel: float
    rtol: float
    atol: float
    ok: bool
    note: str = ""

    def __str__(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        return (f"{self.name}: max abs error {self.max_abs:.3g}, max rel error {self.max_rel:.3g} "
                f"(tolerance rtol {self.rtol:g}, atol {self.atol:g}): {verdict}{self.note}")

    def measured(self) -> str:
        """The errors alone, without a verdict (what a quantized build's outputs get: ``api.VerifyReport``)."""
        return f"{self.name}: max abs error {self.max_abs:.3g}, max rel error {self.max_rel:.3g}{self.note}"


def same_nonfinite(got: np.ndarray, want: np.ndarray) -> bool:
    """Whether ``got`` holds the non-finite entries of ``want`` (NaN, +inf, -inf) in the same places and
    no others (NaN equals NaN here: a fully masked row is NaN in both)."""
    finite = np.isfinite(want)
    return bool(np.array_equal(finite, np.isfinite(got))
                and np.array_equal(got[~finite], want[~finite].astype(got.dtype), equal_nan=True))


def compare(name: str, got: np.ndarray, want: np.ndarray) -> OutputCheck:
    """``got`` against the float64 ``want``: finite entries within tolerance, non-finite ones in the same places."""
    rtol, atol = TOLERANCE.get(got.dtype.name, (0.0, 0.0))
    if got.dtype.name == "bfloat16":  # ml_dtypes' type, compared in float32 (which holds it exactly)
        got = got.astype(np.float32)
    if got.shape != want.shape:
        return OutputCheck(name, np.inf, np.inf, rtol, atol, False, f" (shape {got.shape} vs {want.shape})")
    if not same_nonfinite(got, want):
        return OutputCheck(name, np.inf, np.inf, rtol, atol, False, " (non-finite entries differ)")
    finite = np.isfinite(want)
    g, w = got[finite].astype(np.float64), want[finite].astype(np.float64)
    err = np.abs(g - w)
    max_abs = float(err.max(initial=0.0))
    big = np.abs(w) > atol
    max_rel = float((err[big] / np.abs(w[big])).max(initial=0.0))
    ok = bool(np.all(err <= atol + rtol * np.abs(w)))
    return OutputCheck(name, max_abs, max_rel, rtol, atol, ok)


def verify_outputs(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> list[OutputCheck]:
    return [compare(name, np.asarray(got[name]), np.asarray(want[name])) for name in want]
