"""This CPU's instruction sets, as LLVM names them: the TVM target of the CPU kernels (this CPU's
model with the sets a virtual machine hides turned off, or another CPU model), and which sets of an
artifact's CPU this machine lacks (read from /proc/cpuinfo: no compiler needed)."""

from __future__ import annotations

import functools

from ..base import compiler_loaded


def llvm_target(cpu: str | None = None):
    """The TVM target of the CPU kernels: this CPU with its real features, or CPU model ``cpu``
    (``llvm:CPU``, building for a machine other than this one).  Plain "llvm" is generic x86-64
    without AVX2/FMA (5x slower).

    LLVM names this CPU's model (``emeraldrapids``), and a virtual machine may hide some of that model's
    instruction sets (seen here: AMX, AVX512-FP16 and -BF16 absent from a KVM guest's flags): those
    are turned off (``mattr``), so no kernel uses an instruction this CPU lacks."""
    import tvm
    if cpu is not None:
        return tvm.target.Target({"kind": "llvm", "mcpu": cpu})
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    spec = {"kind": "llvm", "mcpu": cpu}
    host = _host_flags()
    missing = sorted(isa_features(cpu) - host) if host else []
    if missing:
        spec["mattr"] = [f"-{f}" for f in missing]
    return tvm.target.Target(spec)


def _norm(feature: str) -> str:
    return feature.lower().replace("_", "").replace("-", "").replace(".", "")


@functools.lru_cache(maxsize=None)
def isa_features(cpu: str, mattr: tuple = ()) -> frozenset:
    """The instruction-set extensions (AVX*, AMX*, FMA, F16C) LLVM enables for ``cpu`` with ``mattr``."""
    import tvm
    spec = {"kind": "llvm", "mcpu": cpu, **({"mattr": list(mattr)} if mattr else {})}
    feats = tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target(spec))
    return frozenset(f for f in feats if f.startswith(("avx", "amx")) or f in ("fma", "f16c"))


@functools.lru_cache(maxsize=1)
def _cpuinfo_flags() -> frozenset:
    """This CPU's flags from /proc/cpuinfo, normalized (``_norm``: it spells avx512_vnni and amx_tile
    where LLVM has avx512vnni and amx-tile); empty where that file is not there."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(_norm(x) for x in line.partition(":")[2].split())


@functools.lru_cache(maxsize=1)
def _host_flags() -> frozenset:
    """The instruction-set features of this CPU's model (as LLVM spells them) that /proc/cpuinfo
    confirms; empty where that file is not there (then the CPU model's features are trusted)."""
    flags = _cpuinfo_flags()
    if not flags:
        return frozenset()
    import tvm
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    return frozenset(f for f in isa_features(cpu) if _norm(f) in flags)


def missing_cpu_features(target_info: dict) -> list:
    """The instruction sets an llvm artifact's kernels may use (``target_info`` of its manifest) that
    this CPU lacks; [] when it has them all or nothing can tell.

    The manifest lists them (``features``, written at build time), and /proc/cpuinfo says what this
    CPU has, so the check needs no compiler: an artifact loads with TVM's runtime alone.  Manifests
    without the list (older builds) ask LLVM what their CPU model has, where TVM's compiler is loaded."""
    cpu = target_info.get("cpu")
    if not cpu:
        return []
    theirs = target_info.get("features")
    if theirs is None:
        if not compiler_loaded():
            return []
        try:
            theirs = isa_features(cpu, tuple(target_info.get("mattr", ())))
        except Exception:  # noqa: BLE001 - a CPU name this LLVM does not know
            return [f"the instruction sets of CPU {cpu!r}"]
    flags = _cpuinfo_flags()
    if flags:
        return sorted(f for f in theirs if _norm(f) not in flags)
    if not compiler_loaded():
        return []
    here = llvm_target()
    return sorted(set(theirs) - isa_features(str(here.mcpu), tuple(here.attrs.get("mattr", ()))))


def missing_here(cpu: str) -> list:
    """The instruction sets of CPU model ``cpu`` that this CPU lacks (needs TVM's compiler)."""
    t = llvm_target(cpu)
    return missing_cpu_features({"cpu": str(t.mcpu), "features": sorted(isa_features(str(t.mcpu)))})
