"""Every op through the TVM backend against its NumPy reference in float64, one line per op.

Each kernel is built once with symbolic dims (b, s) and run at two sizes, both through the generic
lowering and schedule (``generic``) and through the kernel a build picks (hand-scheduled where one
exists), on llvm; the kernels a build picks, and their few-rows forms, also on vulkan (lavapipe) and on
the CUDA source emulator.  Every op of the registry must have a lowering and a case here.  Tolerance:
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
from attngraph.ir import TensorType
from attngraph.ir import dims as D
from attngraph.ir import ops as O
from attngraph.numerics import compare

TARGET = get_target("llvm")
SIZES = ({"b": 1, "s": 1}, {"b": 3, "s": 7})


def T(*shape, dtype="float32"):
    return TensorType(shape, dtype)


BOOL, I64 = "bool", "int64"
X = T("b", "s", 8)

# (op, attrs, operand types).  The ids name the op and a hint of the case.
CASES = [
    ("neg", {}, [X]), ("exp", {}, [X]), ("log", {}, [X]), ("sqrt", {}, [X]), ("rsqrt", {}, [X]),
    ("tanh", {}, [X]), ("erf", {}, [X]), ("sin", {}, [X]), ("cos", {}, [X]), ("relu", {}, [X]),
    ("gelu", {}, [X]), ("gelu", {"approximate": "tanh"}, [X]),
    ("cast", {"dtype": "float32"}, [T("b", "s", 8, dtype=BOOL)]), ("cast", {"dtype": "float64"}, [X]),
    ("add", {}, [X, T(8)]), ("sub", {}, [X, T("b", 1, 8)]), ("mul", {}, [X, T()]), ("div", {}, [X, T("s", 1)]),
    ("maximum", {}, [X, X]),
    ("eq", {}, [T("b", "s", dtype=I64), T(dtype=I64)]), ("ne", {}, [X, X]), ("lt", {}, [X, T(8)]),
    ("le", {}, [X, X]), ("gt", {}, [X, T()]), ("ge", {}, [X, X]),
    ("logical_and", {}, [T("b", "s", dtype=BOOL), T("s", dtype=BOOL)]),
    ("logical_or", {}, [T("b", "s", dtype=BOOL), T("b", "s", dtype=BOOL)]),
    ("logical_not", {}, [T("b", "s", dtype=BOOL)]),
    ("where", {}, [T("b", 1, 8, dtype=BOOL), X, T()]),
    ("matmul", {}, [X, T(8, 12)]),
    ("matmul", {}, [T("b", 2, "s", 4), T("b", 2, 4, "s")]),
    ("matmul", {}, [T("b", 2, "s", "s"), T("b", 2, "s", 4)]),
    ("matmul", {}, [T("s", 8), T(8, "s")]),
    ("linear", {}, [X, T(8, 12)]), ("linear", {"activation": "relu"}, [X, T(8, 12), T(12)]),
    ("linear", {"activation": "gelu"}, [X, T(8, 5), T(5)]), ("linear", {"activation": "gelu_tanh"}, [X, T(8, 4), T(4)]),
    ("softmax", {}, [X]), ("softmax", {"axis": 1}, [X]), ("log_softmax", {}, [X]),
    ("layer_norm", {"eps": 1e-5}, [X, T(8), T(8)]),
    ("add_layer_norm", {"eps": 1e-6}, [X, X, T(8), T(8)]),
    ("rms_norm", {"eps": 1e-6}, [X, T(8)]), ("add_rms_norm", {"eps": 1e-5}, [X, T("s", 8), T(8)]),
    ("scaled_masked_softmax", {"scale": 0.35}, [T("b", 2, "s", "s")]),
    ("scaled_masked_softmax", {"scale": 0.5, "mask_kinds": ("additive", "keep", "drop")},
     [T("b", 2, "s", "s"), T("b", 1, 1, "s"), T("s", "s", dtype=BOOL), T("b", 1, 1, "s", dtype=BOOL)]),
    ("fused_attention", {"scale": 0.5}, [T("b", 2, "s", 4)] * 3),
    ("fused_attention", {"scale": 0.5, "mask_kinds": ("keep", "drop"), "layout": "bshd"},
     [T("b", "s", 2, 4)] * 3 + [T("s", "s", dtype=BOOL), T("b", 1, 1, "s", dtype=BOOL)]),
    ("fused_attention", {"scale": 0.3, "mask_kinds": ("additive",)},
     [T("b", 2, "s", 4), T("b", 2, 5, 4), T("b", 2, 5, 4), T("b", 1, 1, 5)]),
    # masked_fill(-1e9) and finfo.min fills; one key/value head for all query heads; queries shared by a batch
    ("scaled_masked_softmax", {"scale": 0.5, "mask_kinds": ("keep", "drop"), "mask_fills": (-1e9, -3.4e38)},
     [T("b", 2, "s", "s"), T("s", "s", dtype=BOOL), T("b", 1, 1, "s", dtype=BOOL)]),
    ("fused_attention", {"scale": 0.5, "mask_kinds": ("drop",), "mask_fills": (-1e9,)},
     [T("b", 2, "s", 4), T("b", 1, "s", 4), T("b", 1, "s", 4), T("b", 1, 1, "s", dtype=BOOL)]),
    ("fused_attention", {"scale": 0.5, "mask_kinds": ("keep",), "layout": "bshd"},
     [T(1, "s", 2, 4), T("b", "s", 2, 4), T("b", "s", 2, 4), T("s", "s", dtype=BOOL)]),
    ("fused_attention", {"layout": "bshd"}, [T("b", "s", 4, 1), T("b", "s", 1, 1), T("b", "s", 1, 3)]),
    ("reduce_sum", {"axes": (-1,)}, [X]), ("reduce_mean", {"axes": (1,), "keepdims": True}, [X]),
    ("reduce_max", {"axes": (0, 2)}, [X]),
    ("transpose", {"perm": (0, 2, 1)}, [X]), ("transpose", {"perm": (1, 0, 2)}, [X]),
    ("reshape", {"shape": ("b", "s", 2, 4)}, [X]),
    ("slice", {"axis": 2, "start": 1, "stop": 7, "step": 2}, [X]), ("slice", {"axis": 1, "start": 0, "stop": 1}, [X]),
    ("slice", {"axis": 1, "start": 1, "stop": "s"}, [T("b", "s + 1", 8)]),
    ("concat", {"axis": 2}, [T("b", "s", 3), T("b", "s", 5)]), ("concat", {"axis": 1}, [X, T("b", 2, 8), X]),
    ("gather", {}, [T(10, 8), T("b", "s", dtype=I64)]),
    ("arange", {"n": "s"}, []),
    ("update_slice", {"axis": 1}, [T("b", 16, 8), X, T(dtype=I64)]),
    # the llvm target's own ops (weights in column panels)
    ("pack_panels", {"width": 16}, [T(8, 20)]),
    ("linear_packed", {"n": 20, "activation": "relu"}, [X, T(2, 8, 16), T(20)]),
]


def _id(case):
    op, attrs, types = case
    hint = ",".join(f"{k}={v}" for k, v in attrs.items() if k not in ("eps",))
    return f"{op}[{hint}]({';'.join(str(t) for t in types)})"


def operand(t: TensorType, op: str, sizes: dict, rng) -> np.ndarray:
    shape = tuple(D.evaluate(d, sizes) for d in t.shape)
    if t.dtype == BOOL:
        return rng.random(shape) < 0.4
    if t.dtype == I64:
        if op == "gather":
            return rng.integers(0, 10, shape)
        if op == "update_slice":
            return np.array(3)
        return rng.integers(0, 3, shape)
    x = rng.standard_normal(shape).astype(t.dtype)
    return np.abs(x) + 0.1 if op in ("log", "sqrt", "rsqrt") else x


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
        args = [operand(t, op, sizes, rng) for t in types]
        # No fully masked score row (its softmax is NaN by definition): key 0 is always kept.
        if op in ("scaled_masked_softmax", "fused_attention"):
            kinds = attrs["mask_kinds"]
            first = 1 if op == "scaled_masked_softmax" else 3
            for kind, j in zip(kinds, range(first, len(args))):
                if kind == "keep":
                    args[j][..., 0] = True
                elif kind == "drop":
                    args[j][..., 0] = False
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


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_generic_lowering(case):
    run_case(case, generic=True)


HAND = [c for c in CASES if c[0] in ("matmul", "linear", "linear_packed", "fused_attention") or O.get(c[0]).rows]


@pytest.mark.parametrize("case", HAND, ids=[_id(c) for c in HAND])
def test_kernel_a_build_picks(case):
    run_case(case, generic=False)


# -- every op on every target that runs here ---------------------------------------------------------------

def test_every_op_has_a_lowering_and_a_case():
    """Adding an op to the registry without a lowering, or without a case above, fails here."""
    from attngraph.backends.tvm.lower import lowered_ops
    ops = set(O.REGISTRY) - set(O.SOURCE_OPS)
    assert not ops - lowered_ops(), f"ops without a TVM lowering: {sorted(ops - lowered_ops())}"
    assert not ops - {c[0] for c in CASES}, f"ops without a case in test_tvm_ops.CASES: {sorted(ops - {c[0] for c in CASES})}"


def _device_cases(target):
    """(module functions, [(case, spec, forms)]) of every case the ``target`` can hold (vulkan: no float64)."""
    from attngraph.backends.tvm.build import finish
    dv = DimVars()
    funcs, cases = {}, []
    for i, case in enumerate(CASES):
        op, attrs, types = case
        opdef = O.get(op)
        attrs = {**opdef.defaults, **attrs}
        out_type = opdef.infer(list(types), attrs)
        if target.family == "vulkan" and "float64" in {t.dtype for t in list(types) + [out_type]}:
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
            args = [operand(t, op, sizes, rng) for t in types]
            if op in ("scaled_masked_softmax", "fused_attention"):  # key 0 always kept (run_case says why)
                first = 1 if op == "scaled_masked_softmax" else 3
                for kind, j in zip(spec.attrs["mask_kinds"], range(first, len(args))):
                    args[j][..., 0] = kind == "keep"
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

