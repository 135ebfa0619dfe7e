"""Comparisons against the float64 interpreter: tolerances, and non-finite entries that must match."""

import numpy as np

from attngraph.numerics import compare


def test_within_tolerance_passes_and_reports_errors():
    want = np.array([1.0, -2.0, 1e-7])
    c = compare("y", (want * (1 + 5e-5)).astype(np.float32), want)
    assert c.ok and 0 < c.max_abs < 1e-4 and c.max_rel < 6e-5


def test_beyond_tolerance_fails():
    want = np.array([1.0, 2.0])
    assert not compare("y", np.array([1.0, 2.01], np.float32), want).ok


def test_non_finite_entries_must_be_in_the_same_places():
    want = np.array([-np.inf, 0.5])
    assert compare("y", np.array([-np.inf, 0.5], np.float32), want).ok
    assert not compare("y", np.array([0.0, 0.5], np.float32), want).ok
    assert not compare("y", np.array([np.nan, 0.5], np.float32), want).ok


def test_nan_rows_in_the_same_places_pass_and_moved_ones_fail():
    """A fully masked row is NaN in the interpreter and in the kernels alike: equal there (NaN != NaN
    must not fail it), but a NaN moved, or in place of an inf, fails."""
    want = np.array([[np.nan, np.nan], [0.25, 0.75]])
    assert compare("y", np.array([[np.nan, np.nan], [0.25, 0.75]], np.float32), want).ok
    assert not compare("y", np.array([[np.nan, 0.5], [0.25, np.nan]], np.float32), want).ok
    assert not compare("y", np.array([[np.inf, np.nan], [0.25, 0.75]], np.float32), want).ok
    assert not compare("y", np.array([np.inf, 0.5], np.float32), np.array([-np.inf, 0.5])).ok
