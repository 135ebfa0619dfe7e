"""Half-precision storage for the CPU's kernels: every hand-written kernel is written for float32, and a kernel
over float16 or bfloat16 operands is its float32 twin with those operands' buffers retyped: each load widened to
float32 in the register, each store of the result rounded once (``retyped``), the arithmetic as the float32
kernel's (``passes.precision``: the interpreter rounds each value where a build stores it).  LLVM converts
whole vectors (``vcvtph2ps``, bfloat16's shift by 16 bits), so the half kernel keeps the float32 kernel's
schedule and reads half the bytes."""

from __future__ import annotations

from collections.abc import Callable

from .....ir.types import HALF_DTYPES

FLOAT32 = "float32"


def halves(spec) -> dict[int, str]:
    """{parameter index: half dtype} of ``spec``'s operands and result (the output's index follows the operands')."""
    types = [*spec.in_types, spec.out_type]
    return {i: str(t.dtype) for i, t in enumerate(types) if str(t.dtype) in HALF_DTYPES}


#: Operands a kernel reads in a half type itself, by op: the packed weights, which the projections widen once per
#: column tile of many rows, and x, which they widen in one pass before the products (``kernels.dense``), rather
#: than at each use (bfloat16's scalar widening of x at each use ran the projections at half the float32 kernel's
#: speed on a Zen 3, which has no bfloat16 instructions).
READ_AS_STORED = {"linear_packed": (0, 1), "swiglu_packed": (0, 1)}


def float32_twin(spec):
    """``spec`` with every half-precision type made float32, but the operands its kernel reads as stored."""
    keep = READ_AS_STORED.get(spec.op, ())

    def wide(i, t):
        return t.with_dtype(FLOAT32) if str(t.dtype) in HALF_DTYPES and i not in keep else t
    return spec._replace(in_types=tuple(wide(i, t) for i, t in enumerate(spec.in_types)),
                         out_type=wide(-1, spec.out_type))


def serve(build: Callable, spec):
    """``build(spec)``, a kernel or None; where that is None and ``spec`` stores halves, ``build`` of its float32
    twin with those parameters retyped (None where the twin has no kernel either)."""
    func = build(spec)
    if func is not None or not halves(spec):
        return func
    twin = float32_twin(spec)
    func = build(twin)
    return None if func is None else retyped(func, _retyped_params(spec, twin))


def serve_forms(build: Callable, spec) -> dict:
    """``serve`` for a dict of forms: each form ``build(spec)`` lacks, from the float32 twin's forms."""
    forms = dict(build(spec))
    if halves(spec):
        twin = float32_twin(spec)
        for form, func in build(twin).items():
            forms.setdefault(form, retyped(func, _retyped_params(spec, twin)))
    return forms


def _retyped_params(spec, twin) -> dict[int, str]:
    """The parameters ``twin`` widened: {index: ``spec``'s half dtype}."""
    return {i: dt for i, dt in halves(spec).items() if i not in halves(twin)}


def retyped(func, dtypes: dict[int, str]):
    """``func`` (a float32 kernel) with parameter ``i``'s buffer of dtype ``dtypes[i]``: loads from it widened to
    float32, stores to it rounded from float32."""
    import tvm_ffi
    from tvm import ir, tirx
    new = {}  # old buffer variable -> the retyped one
    for i, param in enumerate(func.params):
        if i in dtypes:
            assert str(param.ty.dtype) == FLOAT32, f"parameter {i} of a float32 twin is {param.ty.dtype}"
            new[param] = param.with_dtype(dtypes[i])
    if not new:
        return func

    def load(node, mutator):
        b = new.get(node.source)
        if b is None:
            return mutator.default_mutate(node)
        return tirx.Cast(FLOAT32, tirx.BufferLoad(b, [mutator.mutate(i) for i in node.indices]))

    def store(node, mutator):
        b = new.get(node.buffer)
        if b is None:
            return mutator.default_mutate(node)
        value = tirx.Cast(dtypes_of[b], mutator.mutate(node.value))
        return tirx.BufferStore(b, value, [mutator.mutate(i) for i in node.indices])

    def var(node, mutator):  # the buffer named elsewhere (a block's reads and writes, an address)
        return new.get(node, node)

    dtypes_of = {b: str(b.ty.dtype) for b in new.values()}
    body = tvm_ffi.structural_mutate(func.body, ((ir.TensorLoad, load), (tirx.BufferStore, store),
                                                 (tirx.Var, var)))
    return tirx.PrimFunc([new.get(p, p) for p in func.params], body, func.ret_type, func.attrs)
