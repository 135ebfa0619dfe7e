"""GPU targets: CUDA (compiled here, run where an NVIDIA GPU is) and WebGPU (the WGSL code
generator that the ``vulkan`` target runs through wgpu, see ``webgpu.py``).

Every kernel gets TVM's rule-based default GPU schedules (dlight): a matmul gets shared-memory tiles,
a softmax or layer norm one workgroup per row with a tree reduction, anything else the fallback rule
(one thread per output element).  Two traps this module guards against (TVM_NOTES 3.1):

- dlight mutates the IRModule it is given, so every target schedules its own copy;
- a PrimFunc left without thread bindings compiles for a GPU target *without error* as host code
  that would dereference device pointers, so every function must end up with a device kernel.

CUDA: ``tvm.compile`` stores CUDA C source, compiled when the module is loaded on the GPU machine
(NVRTC through ``cuda-bindings``, or nvcc with ``TVM_CUDA_COMPILE_MODE=nvcc``).  ``check_cuda_source``
compiles that source with nvcc here, so a build for a GPU is known to compile before it ships.
"""

from __future__ import annotations

import os
import re
import shutil

from .. import BuildError
from .targets import TargetSpec, llvm_target, register_target

#: The CUDA architecture a plain ``cuda`` target builds for (A100; runs on H100 as well).
DEFAULT_ARCH = "sm_80"
_ARCH = re.compile(r"^sm_\d{2,3}[af]?$")


class GPUUnavailable(RuntimeError):
    """A GPU artifact opened where its device (GPU, driver, runtime library) is missing."""


def cuda_target(arch: str = DEFAULT_ARCH):
    """The TVM target for NVIDIA GPUs of ``arch`` (``sm_80``, ``sm_90``, ...), host code for this CPU."""
    import tvm
    if not _ARCH.match(arch):
        raise BuildError(f"bad CUDA architecture {arch!r}: expected the form sm_80, sm_86, sm_90, sm_90a")
    # A plain Target("cuda") silently means sm_50 when no GPU is present to ask.
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host=llvm_target())


def webgpu_target():
    """The TVM target of the WGSL code generator (defaults: 256 threads, 32 KiB shared memory)."""
    import tvm
    return tvm.target.Target("webgpu", host=llvm_target())


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
    """The ``__global__`` kernel names in CUDA source, in order."""
    return re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', source)


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


def cuda_spec(arch: str = DEFAULT_ARCH) -> TargetSpec:
    """The ``cuda`` target for ``arch``, for ``register_target`` (``--arch`` registers its own)."""
    cuda_target(arch)  # a bad arch fails here, not in the middle of a build
    return TargetSpec("cuda", lambda: cuda_target(arch), schedule_func, None, open_cuda_device)


register_target(cuda_spec())
