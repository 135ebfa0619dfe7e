"""The compile targets, each one entry: how to make the TVM target, which kernels and schedules it
uses, how its library is compiled, and which device runs it.

``llvm`` is registered here.  The GPU targets register themselves from their own modules, imported
on first use (``get_target("cuda")`` imports ``gpu.py``, ``get_target("vulkan")`` ``webgpu.py``), so
commands that do not compile never import them: ``cuda`` (``cuda:sm_90`` for another architecture)
and ``vulkan``.  The build, the cache, the artifact and the executor serve every target the same way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from .. import BuildError, DeviceUnavailable


@dataclass(frozen=True)
class TargetSpec:
    """What the build needs to know about one target."""
    name: str
    #: () -> tvm.target.Target
    make_target: Callable
    #: (PrimFunc from te.create_prim_func, target) -> the PrimFunc scheduled for this target
    schedule: Callable
    #: (KernelSpec, DimVars, target) -> a complete scheduled PrimFunc, or None for "use schedule()"
    hand_kernel: Callable | None
    #: (path of the exported library, or None when there are no kernels) -> executor.Device
    open_device: Callable
    #: (IRModule, target) -> an object with export_library(path); default tvm.compile
    compile: Callable | None = None
    #: the library file name inside an artifact
    library_name: str = "kernels.so"
    #: column-panel width of the weights its matmul kernels read (``passes.layout.pack_weights``),
    #: or None to keep weights (K, N)
    weight_panel: int | None = None
    #: whether its attention reads q, k and v in place in a merged projection
    #: (``passes.layout.read_merged_qkv``: ``fused_attention`` with ``heads``)
    merged_qkv: bool = True
    #: (KernelSpec, DimVars, target) -> {suffix: PrimFunc}: other forms of the kernel, built beside it
    #: as ``<name><suffix>`` with the same parameters (``IN_PLACE``, ``FEW_ROWS``, ``ONE_ROW``); the executor
    #: calls one where it applies
    kernel_forms: Callable | None = None
    #: the kind name of the TVM target ``make_target`` gives, where it differs from ``name`` (the
    #: vulkan target compiled through WGSL has kind ``webgpu``)
    kind: str | None = None
    #: () -> dict of what the manifest should record about how this target built (arch, code path)
    describe: Callable | None = None
    #: a file the compile writes beside the library with the generated device source (copied into
    #: the artifact; ``--dump-source``), or None
    source_file: str | None = None
    #: () -> (why it cannot compile here or None, why its builds cannot run here or None, a note)
    availability: Callable | None = None


#: The form of an ``update_slice`` kernel that writes only the new entries, into the cache it is
#: given as output (the executor passes the donated cache input as both).
IN_PLACE = "__inplace"
#: The form of a kernel for at most ``FEW_ROWS_MAX`` rows (``tile_rows``): a decode step's one
#: token per sequence.
FEW_ROWS, FEW_ROWS_MAX = "__few", 8
#: The form of a kernel for exactly one row: batch-1 greedy decoding, where a tile of one row reads
#: the weights once with no clamped second row (preferred over ``FEW_ROWS`` where both exist).
ONE_ROW = "__one"


def tile_rows(op: str, attrs: dict, out_shape: tuple) -> int:
    """The rows a kernel tiles (and pads to whole tiles): a projection's output rows, attention's query length."""
    if op == "fused_attention":
        return int(out_shape[1] if attrs.get("layout") == "bshd" else out_shape[2])
    rows = 1
    for d in out_shape[:-1]:
        rows *= int(d)
    return rows


TARGET_SPECS: dict[str, TargetSpec] = {}
#: The names of the registered targets (a live view: targets registered later appear in it).
TARGETS = TARGET_SPECS.keys()
#: Targets registered by their own module on first use: name -> module (relative to this package).
LAZY_TARGETS = {"cuda": "gpu", "vulkan": "webgpu"}
#: Every target name attngraph knows, registered yet or not.
KNOWN_TARGETS = ("llvm", "cuda", "vulkan")
#: name -> (option -> TargetSpec): targets with an option in their name (``cuda:sm_90``).
TARGET_FAMILIES: dict[str, Callable] = {}


def register_target(spec: TargetSpec) -> None:
    """Add (or replace) a target."""
    TARGET_SPECS[spec.name] = spec


def register_family(name: str, factory: Callable) -> None:
    """Targets ``NAME:OPTION`` made by ``factory(OPTION)`` when first asked for (``cuda:sm_90``)."""
    TARGET_FAMILIES[name] = factory


def get_target(name: str) -> TargetSpec:
    """The target called ``name`` (``llvm``, ``cuda``, ``cuda:sm_90``, ``vulkan``), importing its
    module on first use; an unknown name is an error listing the known ones."""
    if name in TARGET_SPECS:
        return TARGET_SPECS[name]
    base, _, option = str(name).partition(":")
    if base in LAZY_TARGETS and base not in TARGET_SPECS:
        import importlib
        importlib.import_module(f".{LAZY_TARGETS[base]}", __package__)
    if option and base in TARGET_FAMILIES:
        register_target(TARGET_FAMILIES[base](option))  # raises BuildError on a bad option
    try:
        return TARGET_SPECS[name]
    except KeyError:
        raise BuildError(f"unknown or not yet supported target {name!r}; available here: {', '.join(KNOWN_TARGETS)} "
                         f"(llvm:CPU for another CPU model, e.g. llvm:x86-64-v3; cuda:ARCH for another CUDA "
                         f"architecture, e.g. cuda:sm_90)") from None


def spec_for(tvm_target) -> TargetSpec | None:
    """The registered target whose TVM targets have the kind of ``tvm_target`` (``webgpu`` is the
    vulkan target's WGSL path); None for a kind no target compiles to."""
    kind = tvm_target.kind.name
    for spec in list(TARGET_SPECS.values()):
        if (spec.kind or spec.name.partition(":")[0]) == kind:
            return spec
    return None


class CompileOnlyDevice:
    """The device of a model compiled for a target that cannot run here (a CUDA build on a machine
    without a GPU): the build and the artifact are complete, and running raises ``DeviceUnavailable``
    with the reason.  Uploads keep only shape and dtype (the weights stay where they are)."""

    def __init__(self, reason: str, kernels):
        self.reason, self.kernels, self.name = reason, set(kernels), "unavailable"

    def allocate(self, nbytes: int):
        return None

    def view(self, base, shape, dtype):
        return _Placeholder(tuple(int(s) for s in shape), str(dtype))

    def upload(self, array):
        return _Placeholder(tuple(getattr(array, "shape", ())), str(getattr(array, "dtype", "")))

    def download(self, tensor):
        raise DeviceUnavailable(self.reason)

    def has_kernel(self, name: str) -> bool:
        return name in self.kernels

    def call(self, name: str, args: list) -> None:
        raise DeviceUnavailable(self.reason)

    def synchronize(self) -> None:
        raise DeviceUnavailable(self.reason)


@dataclass(frozen=True)
class _Placeholder:
    shape: tuple
    dtype: str


def open_or_compile_only(spec: TargetSpec, path: str | None, kernels) -> object:
    """``spec.open_device(path)``, or where the device is missing here a ``CompileOnlyDevice``
    (building needs no device; running does, and then says why it cannot)."""
    try:
        return spec.open_device(path)
    except DeviceUnavailable as e:
        return CompileOnlyDevice(str(e), kernels)


def target_status(name: str) -> dict:
    """Whether target ``name`` compiles and runs here: {"target", "compile", "run", "note"}, where
    compile / run are None when possible, else the reason (``attngraph targets``)."""
    try:
        spec = get_target(name)
    except Exception as e:  # noqa: BLE001 - a target module that fails to import is the reason itself
        return {"target": name, "compile": f"{type(e).__name__}: {e}", "run": "cannot compile", "note": ""}
    if spec.availability is None:
        return {"target": name, "compile": None, "run": None, "note": ""}
    compile_problem, run_problem, note = spec.availability()
    return {"target": name, "compile": compile_problem, "run": run_problem, "note": note}


RUNTIME_ONLY = "TVM's compiler is not loaded (TVM_USE_RUNTIME_LIB=1): built artifacts run, nothing compiles"


def _llvm_availability(cpu: str | None = None):
    """``llvm`` here, or ``llvm:CPU`` (``cpu``): it runs where this CPU has that model's instruction sets."""
    import tvm
    from .cpu_kernels import cpu_tiles
    if not compiler_loaded():
        whose = "their" if cpu is None else f"{cpu}'s"
        return RUNTIME_ONLY, None, f"built artifacts run if this CPU has {whose} instruction sets"
    isa = cpu_tiles(llvm_target(cpu)).isa
    if cpu is None:
        return None, None, f"this CPU ({tvm.target.codegen.llvm_get_system_cpu()}, {isa} kernels)"
    missing = _missing_here(cpu)
    return None, f"this CPU lacks {cpu}'s {', '.join(missing)}" if missing else None, f"CPU {cpu} ({isa} kernels)"


def _missing_here(cpu: str) -> list:
    """The instruction sets of CPU model ``cpu`` that this CPU lacks (needs TVM's compiler)."""
    return missing_cpu_features(_describe_llvm(cpu))


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
    missing = sorted(_isa_features(cpu) - host) if host else []
    if missing:
        spec["mattr"] = [f"-{f}" for f in missing]
    return tvm.target.Target(spec)


def portable_host():
    """The host code of the GPU targets (argument checks and kernel launches): generic code for this
    machine's architecture, so a GPU artifact runs on a server whose CPU lacks this one's vector
    instruction sets (an AVX-512 build machine, an AVX2 GPU server)."""
    import tvm
    return tvm.target.Target("llvm")


def _norm(feature: str) -> str:
    return feature.lower().replace("_", "").replace("-", "").replace(".", "")


@functools.lru_cache(maxsize=None)
def _isa_features(cpu: str, mattr: tuple = ()) -> frozenset:
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
    return frozenset(f for f in _isa_features(cpu) if _norm(f) in flags)


@functools.lru_cache(maxsize=1)
def compiler_loaded() -> bool:
    """Whether TVM's compiler (its LLVM) is loaded: not with ``TVM_USE_RUNTIME_LIB=1``."""
    try:
        import tvm
        tvm.target.codegen.llvm_get_system_cpu()
        return True
    except Exception:  # noqa: BLE001 - AttributeError or a missing global function, by TVM version
        return False


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
            theirs = _isa_features(cpu, tuple(target_info.get("mattr", ())))
        except Exception:  # noqa: BLE001 - a CPU name this LLVM does not know
            return [f"the instruction sets of CPU {cpu!r}"]
    flags = _cpuinfo_flags()
    if flags:
        return sorted(f for f in theirs if _norm(f) not in flags)
    if not compiler_loaded():
        return []
    here = llvm_target()
    return sorted(set(theirs) - _isa_features(str(here.mcpu), tuple(here.attrs.get("mattr", ()))))


def _describe_llvm(cpu: str | None = None) -> dict:
    from .cpu_kernels import cpu_tiles
    t = llvm_target(cpu)
    mattr = [str(a) for a in t.attrs.get("mattr", ())]
    return {"cpu": str(t.mcpu), "mattr": mattr, "features": sorted(_isa_features(str(t.mcpu), tuple(mattr))),
            "kernels": cpu_tiles(t).isa}


def _cpu_kernel(spec, dv, target):
    try:
        from .cpu_kernels import cpu_kernel
    except ImportError:
        return None
    return cpu_kernel(spec.op, spec.attrs, list(spec.in_types), spec.out_type, dv, target)


def _cpu_forms(spec, dv, target):
    from .cpu_kernels import kernel_forms
    return kernel_forms(spec.op, spec.attrs, list(spec.in_types), spec.out_type, dv, target)


def _cpu_schedule(func, target):
    from .schedule import schedule_generic
    return schedule_generic(func)


def _open_cpu(path: str | None, cpu: str | None = None):
    """The CPU device; for kernels built for CPU model ``cpu``, ``DeviceUnavailable`` where this CPU lacks
    some of its instruction sets (they would stop on an illegal instruction, or worse)."""
    import tvm

    from .executor import TVMDevice
    if cpu is not None and compiler_loaded():  # without it, the artifact's manifest was checked when it loaded
        missing = _missing_here(cpu)
        if missing:
            raise DeviceUnavailable(f"kernels built for CPU {cpu} (target llvm:{cpu}) use instructions this CPU "
                                    f"lacks: {', '.join(missing)}; build with --target llvm to run them here")
    return TVMDevice(tvm.runtime.load_module(path) if path else None, tvm.cpu())


def llvm_spec(cpu: str | None = None) -> TargetSpec:
    """``llvm`` (this CPU), or ``llvm:CPU``: the same kernels built for another CPU model, named as LLVM
    names them (``llvm:x86-64-v3`` for any AVX2 machine, ``x86-64-v4`` for AVX-512, ``haswell``,
    ``znver4``, ...): an artifact to deploy on machines other than the build machine.  It loads
    where the CPU has the instruction sets it records (``missing_cpu_features``)."""
    if cpu is not None and compiler_loaded():
        import tvm
        if not tvm.target.codegen.llvm_is_valid_cpu(cpu, tvm.target.codegen.llvm_get_system_triple()):
            raise BuildError(f"unknown CPU {cpu!r} in target 'llvm:{cpu}': LLVM names CPUs like x86-64-v3 (any AVX2 "
                             f"machine), x86-64-v4 (AVX-512), haswell, skylake-avx512, znver4; plain 'llvm' builds "
                             f"for this CPU")
    name = "llvm" if cpu is None else f"llvm:{cpu}"
    return TargetSpec(name, functools.partial(llvm_target, cpu), _cpu_schedule, _cpu_kernel,
                      functools.partial(_open_cpu, cpu=cpu), weight_panel=16, kernel_forms=_cpu_forms,
                      describe=functools.partial(_describe_llvm, cpu),
                      availability=functools.partial(_llvm_availability, cpu), kind="llvm")


register_target(llvm_spec())
register_family("llvm", llvm_spec)
