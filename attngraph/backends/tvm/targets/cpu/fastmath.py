"""Vectorizable float32 ``exp`` and ``erf`` for the CPU kernels: LLVM vectorizes straight-line arithmetic
but not a loop calling the C library's expf/erff."""

from __future__ import annotations

from tvm import tirx

def _fast_exp(x):
    """exp(x) for float32 as straight-line arithmetic (Cephes polynomial, as ``topi.fast_exp``, relative
    error about 1e-7): unlike a call to the C library's expf, LLVM vectorizes a loop of it.  Results
    below ~1e-38 (exp of a masked score, -inf) come out as about 4e-39 instead of 0; NaN stays NaN."""
    f32 = "float32"

    def c(v):
        return tirx.const(v, f32)
    xc = tirx.max(tirx.min(x, c(88.3762626647950)), c(-88.3762626647949))
    n = tirx.floor(xc * c(1.44269504088896341) + c(0.5))
    r = xc - n * c(0.6931471805599453)
    p = c(1.9875691500e-4)
    for coef in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + c(coef)
    y = p * r * r + r + c(1.0)
    two_n = tirx.reinterpret(f32, tirx.shift_left((n + c(127.0)).astype("int32"), tirx.const(23, "int32")))
    return tirx.Select(x == x, tirx.max(two_n * y, x), x)


# erf(x) = x P(x^2) / Q(x^2) on [-4, 4] (XLA's float32 erf; beyond 4, erf is 1 in float32).
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)


def _fast_erf(x):
    """erf(x) for float32 as a rational function (absolute error below 5e-7, measured against
    scipy on [-6, 6]): unlike a call to the C library's erff, LLVM vectorizes it, so exact GELU
    epilogues (BERT's) run at the matmul's speed.  NaN stays NaN."""
    f32 = "float32"
    xc = tirx.max(tirx.min(x, tirx.const(4.0, f32)), tirx.const(-4.0, f32))
    x2 = xc * xc
    p, q = tirx.const(0.0, f32), tirx.const(0.0, f32)
    for coef in _ERF_P:
        p = p * x2 + tirx.const(coef, f32)
    for coef in _ERF_Q:
        q = q * x2 + tirx.const(coef, f32)
    return tirx.Select(x == x, xc * p / q, x)


_FAST = {"tirx.exp": _fast_exp, "tirx.erf": _fast_erf}


def fast_math(func):
    """``func`` with every float32 ``exp`` and ``erf`` call replaced by ``_fast_exp`` / ``_fast_erf``."""
    import tvm
    import tvm_ffi

    def visit(call, mutator):
        if isinstance(call.op, tvm.ir.Op) and call.op.name in _FAST and str(call.ty) == "float32":
            return _FAST[call.op.name](mutator.mutate(call.args[0]))
        return mutator.default_mutate(call)
    return tvm_ffi.structural_mutate(func, (tvm.ir.Call, visit))
