"""Every op through the TVM backend against its NumPy reference in float64, one line per op.

Each kernel is built once with symbolic dims (b, s) and run at two sizes, both through the generic
lowering and schedule (``generic``) and through the kernel a build picks (hand-scheduled where one
exists), on llvm; the kernels a build picks, and their few-rows forms, also on vulkan (lavapipe) and on
the CUDA source emulator.  Every op of the registry must have a lowering and a case (``op_cases.CASES``).  Tolerance:
the float32 one of ``attngraph.numerics`` (rtol 1e-4, atol 1e-5); -inf entries must be in the same
places.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from attngraph.ir.ops import bind_attrs
from attngraph.backends.tvm.build import kernel_func
from attngraph.backends.tvm.plan import KernelSpec
from attngraph.backends.tvm.targets import get_target
from attngraph.backends.tvm.shapes import DimVars, scalar_dims
from attngraph.ir import ops as O
from attngraph.numerics import compare

from op_cases import BYTES, CASES, SIZES, case_id, case_operands

TARGET = get_target("llvm")


def build(case, generic: bool):
    op, attrs, types = case
    opdef = O.get(op)
    attrs = {**opdef.defaults, **attrs}
    out_type = opdef.infer(list(types), attrs)
    spec = KernelSpec("k", op, attrs, tuple(types), out_type)
    func = kernel_func(spec, DimVars(), TARGET, generic=generic)
    return tvm.compile(tvm.IRModule({"k": func}), target=TARGET.tvm_target)["k"], attrs, out_type


def run_case(case, generic: bool):
    op, _, types = case
    fn, attrs, out_type = build(case, generic)
    rng = np.random.default_rng(0)
    for sizes in SIZES:
        args = case_operands(case, attrs, sizes, rng)
        want = opdef_ref(op, args, attrs, sizes)
        out = tvm.runtime.empty(out_type.concrete(sizes), out_type.dtype)
        scalars = [sizes[d] for d in scalar_dims(list(types) + [out_type])]
        fn(*[tvm.runtime.tensor(np.require(a, requirements="C")) for a in args], out, *scalars)
        got = out.numpy()
        assert got.shape == want.shape and got.dtype == np.dtype(out_type.dtype)
        if got.dtype.kind == "f":
            check = compare(op, got, want)
            assert check.ok, f"{check} at {sizes}"
        else:
            np.testing.assert_array_equal(got, want, err_msg=f"{op} at {sizes}")


def opdef_ref(op, args, attrs, sizes):
    """The reference result in float64 (integer and bool operands as they are)."""
    wide = [a.astype(np.float64) if a.dtype.kind == "f" else a for a in args]
    return np.asarray(O.get(op).ref(*wide, **bind_attrs(attrs, sizes)))


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_generic_lowering(case):
    run_case(case, generic=True)


#: the cases of every op that some target's kernel table (``Target.kernels``) has a hand kernel for
HAND = [c for c in CASES if c[0] in set().union(*(get_target(t).kernels.ops() for t in ("llvm", "cuda", "vulkan")))]


@pytest.mark.parametrize("case", HAND, ids=[case_id(c) for c in HAND])
def test_kernel_a_build_picks(case):
    run_case(case, generic=False)


# -- every op on every target that runs here ---------------------------------------------------------------

def test_every_op_has_a_lowering_and_a_case():
    """Adding an op to the registry without a lowering, or without a case above, fails here."""
    from attngraph.backends.tvm.lower import lowered_ops
    ops = set(O.REGISTRY) - set(O.SOURCE_OPS)
    assert not ops - lowered_ops(), f"ops without a TVM lowering: {sorted(ops - lowered_ops())}"
    assert not ops - {c[0] for c in CASES}, f"ops without a case in test_tvm_ops.CASES: {sorted(ops - {c[0] for c in CASES})}"


def test_every_elementwise_op_can_be_a_fused_step():
    """``fused_elementwise`` lowers its steps from one expression table: an elementwise op (the groups
    ``fuse-elementwise`` takes) missing from it would fail to build once fused."""
    from attngraph.backends.tvm.lower.elementwise import EXPRESSIONS
    steps = {n for n, d in O.REGISTRY.items() if d.group in O.ELEMENTWISE_GROUPS}
    assert steps <= set(EXPRESSIONS), f"elementwise ops without an expression: {sorted(steps - set(EXPRESSIONS))}"


def _device_cases(target):
    """(module functions, [(case, spec, forms)]) of every case the ``target`` can hold (vulkan: no float64, no
    8-bit integers)."""
    from attngraph.backends.tvm.build import finish
    dv = DimVars()
    funcs, cases = {}, []
    for i, case in enumerate(CASES):
        op, attrs, types = case
        opdef = O.get(op)
        attrs = {**opdef.defaults, **attrs}
        out_type = opdef.infer(list(types), attrs)
        if target.family == "vulkan" and {"float64", *BYTES} & {t.dtype for t in list(types) + [out_type]}:
            continue
        spec = KernelSpec(f"c{i}_{op}", op, attrs, tuple(types), out_type)
        funcs[spec.name] = kernel_func(spec, dv, target)
        forms = target.forms(spec, dv)
        funcs.update((spec.name + s, finish(f, spec, dv, spec.name + s)) for s, f in forms.items())
        cases.append((case, spec, list(forms)))
    return funcs, cases


def _run_on(device, cases):
    rng = np.random.default_rng(0)
    for case, spec, forms in cases:
        op, _, types = case
        for sizes in SIZES:
            args = case_operands(case, spec.attrs, sizes, rng)
            want = opdef_ref(op, args, spec.attrs, sizes)
            scalars = [sizes[d] for d in scalar_dims(list(types) + [spec.out_type])]
            for name in [spec.name] + [spec.name + f for f in forms if sizes["s"] == 1]:  # forms: at one row
                out = device.upload(np.zeros(spec.out_type.concrete(sizes), spec.out_type.dtype))
                device.call(name, [device.upload(np.require(a, requirements="C")) for a in args] + [out] + scalars)
                got = device.download(out)
                if got.dtype.kind == "f":
                    check = compare(op, got, want.astype(got.dtype) if want.dtype.kind != "f" else want)
                    assert check.ok, f"{name}: {check} at {sizes}"
                else:
                    np.testing.assert_array_equal(got, want, err_msg=f"{name} at {sizes}")


def test_every_op_on_vulkan():
    from attngraph.backends.tvm.targets import target_status
    problem = target_status("vulkan")["run"]
    if problem:
        pytest.skip(f"no Vulkan device here: {problem}")
    vulkan = get_target("vulkan")
    funcs, cases = _device_cases(vulkan)
    library = vulkan.compile(tvm.IRModule(funcs))
    from attngraph.backends.tvm.targets.vulkan.device import WgpuDevice
    _run_on(WgpuDevice(library), cases)


def test_every_op_on_the_cuda_emulator():
    import shutil
    if shutil.which("g++") is None:
        pytest.skip("the CUDA source emulator compiles with g++")
    from attngraph.backends.tvm.targets.cuda.emulator import CudaEmulator
    cuda = get_target("cuda:sm_90")
    funcs, cases = _device_cases(cuda)
    _run_on(CudaEmulator.from_funcs(funcs, cuda), cases)

