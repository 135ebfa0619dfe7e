"""GPU targets: CUDA (compiled here, run where an NVIDIA GPU is) and WebGPU (the WGSL code
generator that the ``vulkan`` target runs through wgpu, see ``webgpu.py``).

The fused attention (flash-style) and the projections (register-tiled SIMT matmul, bias and
activation in the write back) are the hand-written kernels of ``gpu_kernels.py``; every other kernel
gets TVM's rule-based default GPU schedules (dlight): a softmax or layer norm one workgroup per row
with a tree reduction, a matmul that is not a projection shared-memory tiles, anything else the
fallback rule (one thread per output element).  Two traps this module guards against (TVM_NOTES 3.1):

- dlight mutates the IRModule it is given, so every target schedules its own copy;
- a PrimFunc left without thread bindings compiles for a GPU target *without error* as host code
  that would dereference device pointers, so every function must end up with a device kernel.

CUDA: ``tvm.compile`` stores CUDA C source, compiled when the module is loaded on the GPU machine
(NVRTC through ``cuda-bindings``, or nvcc with ``TVM_CUDA_COMPILE_MODE=nvcc``).  ``check_cuda_source``
compiles that source with nvcc here, so a build for a GPU is known to compile before it ships.
The build needs no GPU (a machine without one gets a compile-only model that says why it cannot
run); loading or running where the GPU, the driver or TVM's CUDA runtime is missing raises
``GPUUnavailable`` with the reason.  Run on a GPU: not yet (written and tested without one).
"""

from __future__ import annotations

import os
import re
import shutil

from .. import BuildError, DeviceUnavailable
from .targets import TargetSpec, portable_host, register_family, register_target

#: The CUDA architecture a plain ``cuda`` target builds for (A100; runs on H100 as well).
DEFAULT_ARCH = "sm_80"
_ARCH = re.compile(r"^sm_\d{2,3}[af]?$")


class GPUUnavailable(DeviceUnavailable):
    """A GPU build run where its device (GPU, driver, runtime library) is missing or lacks a
    feature or limit its kernels need."""


def cuda_target(arch: str = DEFAULT_ARCH):
    """The TVM target for NVIDIA GPUs of ``arch`` (``sm_80``, ``sm_90``, ...), host code for any CPU of this architecture."""
    import tvm
    if not _ARCH.match(arch):
        raise BuildError(f"bad CUDA architecture {arch!r}: expected the form sm_80, sm_86, sm_90, sm_90a")
    # A plain Target("cuda") silently means sm_50 when no GPU is present to ask.
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host=portable_host())


def webgpu_target():
    """The TVM target of the WGSL code generator (defaults: 256 threads, 32 KiB shared memory)."""
    import tvm
    return tvm.target.Target("webgpu", host=portable_host())


def default_rules():
    """dlight's default GPU rules, in the order the Relax GPU pipeline uses them (first match wins)."""
    from tvm.s_tir import dlight as dl
    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def _is_func(value) -> bool:
    from tvm import tirx
    return isinstance(value, tirx.PrimFunc)


def has_thread_binding(func) -> bool:
    """Whether ``func`` binds any loop to a GPU thread or block axis (it then lowers to a device kernel)."""
    import tvm_ffi
    from tvm import tirx
    found = []

    def visit(node):
        if node.kind == tirx.ForKind.THREAD_BINDING:
            found.append(node)
        return True

    tvm_ffi.structural_walk(func.body, (tirx.For, visit), order="pre")
    if found:
        return True

    def visit_attr(node):
        if node.attr_key == "thread_extent":
            found.append(node)
        return True

    tvm_ffi.structural_walk(func.body, (tirx.AttrStmt, visit_attr), order="pre")
    return bool(found)


def schedule_module(mod, target, rules=None):
    """A copy of ``mod`` (unscheduled PrimFuncs, e.g. from ``te.create_prim_func``) with dlight's GPU
    schedules for ``target``.  Functions already marked ``tirx.is_scheduled`` are kept as they are.
    Raises ``BuildError`` naming every function that got no device kernel."""
    import tvm
    from tvm.s_tir import dlight as dl
    fresh = tvm.IRModule(dict(mod.functions_items()))  # dlight schedules in place
    with target:
        scheduled = dl.ApplyDefaultSchedule(*(rules or default_rules()))(fresh)
    require_device_kernels(scheduled)
    return scheduled


def schedule_func(func, target):
    """One PrimFunc with dlight's GPU schedule for ``target`` (the ``TargetSpec.schedule`` hook)."""
    import tvm
    mod = schedule_module(tvm.IRModule({"main": func}), target)
    return mod["main"]


def require_device_kernels(mod) -> None:
    """Raise ``BuildError`` unless every PrimFunc of ``mod`` binds loops to GPU threads: an unbound
    function would compile without error into host code reading device memory."""
    unbound = sorted(gv.name_hint for gv, f in mod.functions_items() if _is_func(f) and not has_thread_binding(f))
    if unbound:
        raise BuildError(f"no GPU schedule for {', '.join(unbound)}: the function has no thread bindings "
                         f"(schedule it, or let dlight's Fallback rule handle it)")


def build_cuda(mod, arch: str = DEFAULT_ARCH, *, schedule: bool = True):
    """Compile ``mod`` for CUDA ``arch``: dlight schedules (unless ``schedule`` is False and the
    functions come scheduled), then ``tvm.compile``.  The result holds CUDA source (see ``cuda_source``)."""
    import tvm
    target = cuda_target(arch)
    mod = schedule_module(mod, target) if schedule else mod
    if not schedule:
        require_device_kernels(mod)
    return tvm.compile(mod, target=target)


def device_source(executable, kind: str = "cuda") -> str:
    """The generated device source (``cuda`` C, or ``webgpu`` WGSL) of a compiled executable."""
    module = getattr(executable, "mod", executable)
    for m in module.imports:
        if m.kind == kind:
            return m.inspect_source()
    raise BuildError(f"the compiled module has no {kind} device code (kinds: "
                     f"{', '.join(m.kind for m in module.imports) or 'none'})")


def cuda_source(executable) -> str:
    """The CUDA C source of a module compiled for a ``cuda`` target."""
    return device_source(executable, "cuda")


def kernel_names(source: str) -> list[str]:
    """The ``__global__`` kernel names in CUDA source, in order (each once: TVM declares every kernel
    before defining it)."""
    names = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', source)
    return list(dict.fromkeys(names))


def find_nvcc() -> str | None:
    """Path of nvcc (PATH, then ``$CUDA_HOME/bin``), or None."""
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    path = os.path.join(home, "bin", "nvcc") if home else None
    return path if path and os.access(path, os.X_OK) else None


def check_cuda_source(source: str, arch: str = DEFAULT_ARCH, target_format: str = "ptx") -> bytes:
    """Compile CUDA ``source`` with nvcc for ``arch`` (``ptx`` or ``cubin``); returns the result.
    Proves that a CUDA build compiles without a GPU; raises ``BuildError`` with nvcc's message."""
    from tvm.support import nvcc
    if find_nvcc() is None:
        raise BuildError("cannot check CUDA source: nvcc not found (PATH or $CUDA_HOME/bin)")
    # compile_cuda reads the architecture from the current target even when given arch=.
    with cuda_target(arch):
        try:
            return nvcc.compile_cuda(source, target_format=target_format, arch=arch, compiler="nvcc")
        except Exception as e:  # nvcc's diagnostics are in the message
            raise BuildError(f"nvcc could not compile the generated CUDA source for {arch}: {e}") from e


def dump_source(executable, path: str, kind: str = "cuda") -> str:
    """Write the generated device source to ``path`` (``--dump-source``); returns the path."""
    with open(path, "w") as f:
        f.write(device_source(executable, kind))
    return path


# -- the cuda target ---------------------------------------------------------------------------


def cuda_runtime_problem() -> str | None:
    """Why a CUDA module cannot run here (None when it can): TVM's CUDA runtime needs libcuda, a
    GPU, and a way to compile the stored source at load time (NVRTC via cuda-bindings, or nvcc)."""
    import tvm
    try:
        enabled = tvm.runtime.enabled("cuda")
    except Exception:  # noqa: BLE001 - an unknown runtime counts as absent
        enabled = False
    if not enabled:
        return "TVM's CUDA runtime is not usable here (libtvm_runtime_cuda.so needs libcuda.so.1: no NVIDIA driver)"
    if not tvm.cuda(0).exist:
        return "no CUDA GPU is present"
    if os.environ.get("TVM_CUDA_COMPILE_MODE") == "nvcc":
        return None if find_nvcc() else "TVM_CUDA_COMPILE_MODE=nvcc but nvcc is not found"
    try:
        import cuda.bindings  # noqa: F401 - NVRTC, TVM's default JIT compiler for the stored source
    except ImportError:
        return ("the CUDA source is compiled when loaded: install cuda-bindings (NVRTC), or set "
                "TVM_CUDA_COMPILE_MODE=nvcc with nvcc on PATH")
    return None


def open_cuda_device(path: str | None):
    """The executor device for a CUDA kernel library (``TargetSpec.open_device``); a clear
    ``GPUUnavailable`` where it cannot run."""
    import tvm

    from .executor import TVMDevice
    problem = cuda_runtime_problem()
    if problem:
        raise GPUUnavailable(f"cannot run a CUDA build here: {problem}")
    return TVMDevice(tvm.runtime.load_module(path) if path else None, tvm.cuda(0))


#: The CUDA source a cuda build writes beside its library (and into the artifact).
CUDA_SOURCE = "kernels.cu"


def nvcc_check_enabled() -> bool:
    """Whether a cuda build compiles its source with nvcc (when nvcc is here; ATTNGRAPH_NVCC_CHECK=0 skips)."""
    return os.environ.get("ATTNGRAPH_NVCC_CHECK", "1") != "0" and find_nvcc() is not None


class CudaLibrary:
    """A module compiled for CUDA: ``export_library`` writes the TVM library (host code and the
    embedded CUDA source, compiled on the GPU machine when loaded) and the source beside it."""

    def __init__(self, executable, source: str):
        self.executable, self.source = executable, source

    def export_library(self, path: str) -> None:
        self.executable.export_library(path)
        with open(os.path.join(os.path.dirname(path), CUDA_SOURCE), "w") as f:
            f.write(self.source)


def compile_cuda_module(mod, target) -> CudaLibrary:
    """``tvm.compile`` for a cuda target (the ``TargetSpec.compile`` hook), then, where nvcc is
    present, compile the generated source to PTX for the target's arch: a build known to compile."""
    import tvm
    require_device_kernels(mod)
    executable = tvm.compile(mod, target=target)
    source = cuda_source(executable)
    if nvcc_check_enabled():
        check_cuda_source(source, str(target.attrs["arch"]))
    return CudaLibrary(executable, source)


def cuda_kernel(spec, dv, target):
    """The ``TargetSpec.hand_kernel`` hook of cuda: the flash-style fused attention and the register-tiled
    projection (``gpu_kernels``); None for every other kernel (dlight's schedules serve them)."""
    from .gpu_kernels import flash_attention, linear
    return flash_attention(spec, dv, target) or linear(spec, dv, target)


def gpu_forms(spec, dv, target):
    """The ``TargetSpec.kernel_forms`` hook of cuda and vulkan (WGSL): the ``FEW_ROWS`` forms, for a
    decode step's one row per sequence.  A projection that the hand-written kernel serves gets dlight's
    schedule of the generic lowering (the hand kernel's 64- or 128-row tile would compute mostly
    clamped rows on N/64 or N/128 workgroups; dlight's 32 x 64 tile wastes less); the attention gets
    ``decode_attention`` (the keys dealt out among a workgroup's threads: the flash kernel would walk
    them all on one thread)."""
    from .build import generic_func
    from .gpu_kernels import decode_attention, linear_applies
    from .targets import FEW_ROWS
    if linear_applies(spec, target):
        return {FEW_ROWS: generic_func(spec, dv, target)}
    attention = decode_attention(spec, dv, target, narrow_bool=target.kind.name == "webgpu")
    return {FEW_ROWS: attention} if attention is not None else {}


def cuda_availability():
    """(compile problem, run problem, note) of the cuda target here (``attngraph targets``)."""
    import tvm
    from .targets import RUNTIME_ONLY, compiler_loaded
    compile_problem = None if compiler_loaded() else RUNTIME_ONLY
    if compile_problem is None and tvm.get_global_func("target.build.cuda", allow_missing=True) is None:
        compile_problem = "this TVM has no CUDA code generator (target.build.cuda)"
    nvcc = find_nvcc()
    note = (f"nvcc {nvcc}: every build's CUDA source is compiled to PTX as a check" if nvcc else
            "no nvcc: builds are not checked by compiling their CUDA source here")
    return compile_problem, cuda_runtime_problem(), note


def cuda_spec(arch: str = DEFAULT_ARCH, name: str | None = None) -> TargetSpec:
    """The target ``cuda`` (``DEFAULT_ARCH``) or ``cuda:ARCH``, for ``register_target``."""
    if not _ARCH.match(arch):  # a bad arch fails here, not in the middle of a build
        raise BuildError(f"bad CUDA architecture {arch!r}: expected the form sm_80, sm_86, sm_90, sm_90a")
    def describe():
        return {"arch": arch, "path": "tvm-cuda",
                "code": "CUDA C source in kernels.so, compiled when loaded (NVRTC through cuda-bindings, or nvcc "
                        "with TVM_CUDA_COMPILE_MODE=nvcc); kernels.cu is a copy",
                "nvcc_checked": nvcc_check_enabled()}
    return TargetSpec(name or f"cuda:{arch}", lambda: cuda_target(arch), schedule_func, cuda_kernel, open_cuda_device,
                      compile=compile_cuda_module, kind="cuda", describe=describe, source_file=CUDA_SOURCE,
                      availability=cuda_availability, kernel_forms=gpu_forms)


register_target(cuda_spec(DEFAULT_ARCH, "cuda"))
register_family("cuda", cuda_spec)
