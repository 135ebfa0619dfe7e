"""The bfloat16 projection on AMX tiles (``targets/cpu/amx.py``), behind ``ATTNGRAPH_AMX=1`` until it has run on a CPU
with AMX: on every CPU it is built for one that has AMX (``llvm:sapphirerapids``) and its instructions read; where this
CPU has AMX, it runs against the float64 reference."""

from __future__ import annotations

import dataclasses

import pytest

tvm = pytest.importorskip("tvm")

import attngraph as ag  # noqa: E402
from attngraph.backends import DeviceUnavailable  # noqa: E402
from attngraph.backends.tvm.plan import FEW_ROWS, KernelSpec  # noqa: E402
from attngraph.backends.tvm.shapes import DimVars  # noqa: E402
from attngraph.backends.tvm.targets import get_target  # noqa: E402
from attngraph.backends.tvm.targets.cpu import LLVMTarget, isa, kernels  # noqa: E402
from attngraph.backends.tvm.targets.cpu.tiles import AMX_OPT_IN, AVX512_BF16, cpu_tiles  # noqa: E402
from attngraph.ir import TensorType as T  # noqa: E402
from attngraph.ir import ops as O  # noqa: E402

BF16 = "bfloat16"
AMX = dataclasses.replace(AVX512_BF16, amx=True)
SAPPHIRE = "llvm:sapphirerapids"
HERE_HAS_AMX = isa.request_amx()


def projection(k: int, n: int, bias: bool, activation: str = "none", lead=("batch", "seq")):
    x = T((*lead, k), BF16)
    w = O.get("pack_panels").infer([T((k, n), BF16)], {"width": 16, "dtype": None, "interleave": 2})
    ts = [x, w] + ([T((n,), BF16)] if bias else [])
    attrs = {**O.get("linear_packed").defaults, "n": n, "activation": activation}
    return KernelSpec("k", "linear_packed", attrs, tuple(ts), O.get("linear_packed").infer(ts, attrs))


def asm_of(func, target=SAPPHIRE) -> str:
    lib = tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), target=get_target(target).tvm_target)
    return lib.mod.inspect_source("asm")


@pytest.mark.parametrize("lead", [("batch", "seq"), ("rows",)])
def test_compiles_to_tile_instructions_for_a_cpu_that_has_them(lead):
    # the micro-kernel as built: the tile configuration loaded, C, A and B tiles loaded, 4 tile products per 32 K
    # values, C stored, the tiles released (K = 64: two steps, which LLVM unrolls)
    f = kernels.KERNELS.kernel(projection(64, 96, True, "gelu", lead), DimVars(), AMX)
    assert f is not None and "attngraph_amx_bf16_32x32" in f.script()
    asm = asm_of(f)
    counts = {i: asm.count(i) for i in ("ldtilecfg", "tdpbf16ps", "tilestored", "tilerelease")}
    assert counts["ldtilecfg"] == counts["tilerelease"] == 1 and counts["tilestored"] == 4, counts
    assert counts["tdpbf16ps"] in (4, 8), counts


def test_chosen_only_where_asked_and_the_shape_suits():
    spec = projection(64, 96, True)
    assert "attngraph_amx" not in kernels.KERNELS.kernel(spec, DimVars(), AVX512_BF16).script()
    for other in (projection(48, 96, True), projection(64, 80, True)):  # K or N not a multiple of 32
        f = kernels.KERNELS.kernel(other, DimVars(), AMX)
        assert "attngraph_amx" not in f.script() and "attngraph_dpbf16ps" in f.script()
    few = kernels.KERNELS.forms(spec, DimVars(), AMX)[FEW_ROWS]  # a decode step's rows: the dot-product kernel
    assert "attngraph_amx" not in few.script() and "attngraph_dpbf16ps" in few.script()


def test_opt_in_by_environment_and_cpu(monkeypatch):
    sapphire = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids"})
    assert not cpu_tiles(sapphire).amx
    monkeypatch.setenv(AMX_OPT_IN, "1")
    assert cpu_tiles(sapphire) == AMX
    assert not cpu_tiles(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})).amx  # no AMX there
    target = LLVMTarget("sapphirerapids")
    assert "AMX tiles" in target.availability()[2]


def test_a_bfloat16_build_lowers_its_projections_onto_tiles(monkeypatch):
    from attngraph.backends.tvm.build import lower_kernels
    from attngraph.backends.tvm.plan import plan_kernels
    monkeypatch.setenv(AMX_OPT_IN, "1")
    target = LLVMTarget("sapphirerapids")  # a target of its own: get_target's keeps the tiles it first saw
    g = ag.compile("encoder-tiny", target=target, dtype=BF16).graph  # compile-only where this CPU lacks AMX
    specs, _ = plan_kernels(g)
    lowered, _ = lower_kernels(g, target, plan=plan_kernels(g))
    scripts = [lowered[s.name].script() for s in specs if s.op == "linear_packed"]
    assert scripts and any("attngraph_amx" in s for s in scripts)


def test_refused_where_linux_does_not_grant_the_tile_state(monkeypatch):
    monkeypatch.setenv(AMX_OPT_IN, "1")
    monkeypatch.setattr(isa, "missing_here", lambda cpu: [])
    monkeypatch.setattr(isa, "missing_cpu_features", lambda info: [])
    monkeypatch.setattr(isa, "request_amx", lambda: False)
    with pytest.raises(DeviceUnavailable, match="refused AMX state"):
        LLVMTarget("sapphirerapids").open_device(None)
    # an artifact whose manifest says its kernels use AMX, loaded (with TVM's runtime alone, as it may be)
    manifest = {"target_info": LLVMTarget("sapphirerapids").describe()}
    assert manifest["target_info"]["tiles"]["amx"]
    with pytest.raises(DeviceUnavailable, match="refused AMX state"):
        LLVMTarget().check_manifest(manifest, "art")


@pytest.mark.skipif(not HERE_HAS_AMX, reason="this CPU has no AMX (or Linux refused its state): compile-only here")
@pytest.mark.parametrize("k,n,bias,activation", [(64, 96, True, "gelu"), (32, 32, False, "none"), (96, 64, True, "relu")])
def test_kernel_against_float64(k, n, bias, activation):
    from test_bf16_dot import check_projection
    spec = projection(k, n, bias, activation)
    check_projection(kernels.KERNELS.kernel(spec, DimVars(), AMX), spec, k, n, bias, activation,
                     ({"batch": 1, "seq": 1}, {"batch": 2, "seq": 7}, {"batch": 1, "seq": 45}, {"batch": 3, "seq": 64}))


def _peak_module():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "peak.py")
    spec = importlib.util.spec_from_file_location("peak", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_probe_compiles_for_a_cpu_that_has_amx():
    # bench/peak.py's AMX probe: 4 tile products an iteration in a loop, the tiles configured and released once
    peak = _peak_module()
    lib = tvm.compile(tvm.IRModule({"peak": peak._amx_probe(2, 10)}), target=get_target(SAPPHIRE).tvm_target)
    asm = lib.mod.inspect_source("asm")
    assert asm.count("tdpbf16ps") >= 4 and asm.count("ldtilecfg") == 1 and asm.count("tilerelease") == 1


@pytest.mark.skipif(not HERE_HAS_AMX, reason="this CPU has no AMX (or Linux refused its state): compile-only here")
def test_peak_probe_runs():
    assert _peak_module().amx_peak_gflops(1, iterations=10_000) > 0
