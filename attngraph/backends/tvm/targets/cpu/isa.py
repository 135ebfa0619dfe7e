"""This CPU's instruction sets, as LLVM names them: the TVM target of the CPU kernels (this CPU's LLVM model with
the sets /proc/cpuinfo lists and the model lacks turned on, those a virtual machine hides turned off; or another
CPU model), and which sets of an artifact's CPU this machine lacks (read from /proc/cpuinfo: no compiler needed)."""

from __future__ import annotations

import functools

from ..base import compiler_loaded


#: The instruction-set extensions the CPU kernels may use, as LLVM names them, added to the target where this CPU has
#: them and its LLVM model does not (LLVM names an AMX Xeon in a virtual machine ``rocketlake``, which has none of
#: AVX512-BF16, AVX512-FP16 and AMX).
EXTENSIONS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512ifma",
              "avx512vbmi", "avx512vbmi2", "avx512bitalg", "avx512vpopcntdq", "avx512vnni", "avx512bf16",
              "avx512fp16", "avxvnni", "amx-tile", "amx-bf16", "amx-int8", "amx-fp16")


def llvm_target(cpu: str | None = None):
    """The TVM target of the CPU kernels: this CPU with its real features, or CPU model ``cpu``
    (``llvm:CPU``, building for a machine other than this one).  Plain "llvm" is generic x86-64
    without AVX2/FMA (5x slower).

    LLVM names this CPU's model (``znver4``, ``emeraldrapids``), and /proc/cpuinfo says what the CPU has: the sets
    the model has and the CPU lacks are turned off (a virtual machine may hide AMX or AVX512-FP16), the sets the CPU
    has and the model lacks are turned on (``mattr``: ``host_changes``)."""
    import tvm
    if cpu is not None:
        return tvm.target.Target({"kind": "llvm", "mcpu": cpu})
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    spec = {"kind": "llvm", "mcpu": cpu}
    mattr = host_changes(cpu)
    if mattr:
        spec["mattr"] = list(mattr)
    return tvm.target.Target(spec)


def host_changes(cpu: str) -> tuple:
    """``mattr`` for LLVM's CPU model ``cpu`` to have exactly this CPU's extensions (``EXTENSIONS``) per
    /proc/cpuinfo: ``+name`` for one the CPU has and the model lacks, ``-name`` for one the model has and the CPU
    lacks; () where /proc/cpuinfo is not there (then the model is trusted)."""
    flags = _cpuinfo_flags()
    if not flags:
        return ()
    model = isa_features(cpu)
    added = [f"+{f}" for f in EXTENSIONS if _norm(f) in flags and f not in model]
    removed = [f"-{f}" for f in sorted(model) if _norm(f) not in flags]
    return tuple(added + removed)


#: How people name the extensions: a family, the LLVM feature that has it, and its members' features and names.
FAMILIES = (("AVX2", "avx2", (("fma", "FMA"), ("f16c", "F16C"))),
            ("AVX-512", "avx512f", (("avx512bf16", "BF16"), ("avx512fp16", "FP16"), ("avx512vnni", "VNNI"))),
            ("AVX-VNNI", "avxvnni", ()),
            ("AMX", "amx-tile", (("amx-bf16", "BF16"), ("amx-int8", "INT8"), ("amx-fp16", "FP16"))))


def summary(features) -> str:
    """The vector extensions among LLVM's ``features`` as people name them: "AVX2 (FMA, F16C), AVX-512 (BF16, VNNI)"."""
    parts = []
    for family, feature, members in FAMILIES:
        if feature in features:
            names = [name for f, name in members if f in features]
            parts.append(family + (f" ({', '.join(names)})" if names else ""))
    return ", ".join(parts) or "no AVX2"


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


def request_amx() -> bool:
    """Ask Linux for this process's AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``, once per
    process, inherited by its forks), without which the first tile instruction stops the process; True when granted
    (or granted before), False where the CPU has no AMX or the kernel refuses."""
    if "amxtile" not in _cpuinfo_flags():
        return False
    return _amx_granted()


@functools.lru_cache(maxsize=1)
def _amx_granted() -> bool:
    import ctypes
    import platform
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata = 158, 0x1023, 18
    try:
        return ctypes.CDLL(None, use_errno=True).syscall(sys_arch_prctl, arch_req_xcomp_perm, xfeature_xtiledata) == 0
    except (OSError, AttributeError):
        return False


def cpu_name() -> str:
    """This CPU's name as /proc/cpuinfo gives it ("AMD EPYC", "Intel(R) Xeon(R) Platinum 8488C"), or "?"."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.partition(":")[2].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        return "?"


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
