"""The ``cuda`` family: NVIDIA GPUs of an architecture (``cuda``: sm_80; ``cuda:sm_90``).

``tvm.compile`` stores CUDA C source, compiled when the module is loaded on the GPU machine (NVRTC
through ``cuda-bindings``, or nvcc with ``TVM_CUDA_COMPILE_MODE=nvcc``); where nvcc is here, every
build's source is compiled to PTX as a check (``nvcc.py``).  The build needs no GPU (a machine without
one gets a compile-only model that says why it cannot run).  Beside the library a build keeps the
source (``kernels.cu``) and its host programs (``kernels.launch.json``), from which the CUDA source
emulator (``emulator.py``, ``--device emulator``) runs it on this CPU.  A model in float16 or bfloat16 gets
its attention and projections on tensor cores (``tensor_cores.py``: PTX ``mma.sync``, sm_80 on)."""

from __future__ import annotations

import json
import os
import re

from .... import BuildError
from ...runtime import host_program
from ..base import RUNTIME_ONLY, compiler_loaded, portable_host
from ..gpu import GPU_KERNELS, PROJECTIONS, GPUTarget, GPUUnavailable, device_source
from ..gpu.dlight import require_device_kernels
from ..table import KernelTable, Row
from .nvcc import check_cuda_source, find_nvcc, kernel_names, nvcc_check_enabled
from .tensor_cores import mma_attention, mma_linear, mma_linear_applies

#: The CUDA architecture a plain ``cuda`` target builds for (A100; runs on H100 as well).
DEFAULT_ARCH = "sm_80"
_ARCH = re.compile(r"^sm_\d{2,3}[af]?$")
#: The CUDA source and the host programs a cuda build writes beside its library (and into the artifact).
CUDA_SOURCE = "kernels.cu"
LAUNCHES = "kernels.launch.json"


def cuda_target(arch: str = DEFAULT_ARCH):
    """The TVM target for NVIDIA GPUs of ``arch`` (``sm_80``, ``sm_90``, ...), host code for any CPU of this
    architecture.  A plain Target("cuda") silently means sm_50 when no GPU is present to ask."""
    import tvm
    if not _ARCH.match(arch):
        raise BuildError(f"bad CUDA architecture {arch!r}: expected the form sm_80, sm_86, sm_90, sm_90a")
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host=portable_host())


def cuda_source(executable) -> str:
    """The CUDA C source of a module compiled for a ``cuda`` target."""
    return device_source(executable, "cuda")


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


class CudaLibrary:
    """A module compiled for CUDA: ``export_library`` writes the TVM library (host code and the
    embedded CUDA source, compiled on the GPU machine when loaded), and beside it the source and the
    host programs (what the emulator runs)."""

    def __init__(self, executable, source: str, hosts: dict):
        self.executable, self.source, self.hosts = executable, source, hosts

    def export_library(self, path: str) -> None:
        self.executable.export_library(path)
        with open(os.path.join(os.path.dirname(path), CUDA_SOURCE), "w") as f:
            f.write(self.source)
        with open(os.path.join(os.path.dirname(path), LAUNCHES), "w") as f:
            json.dump({name: entry.to_json() for name, entry in self.hosts.items()}, f)


class CudaTarget(GPUTarget):
    """An NVIDIA GPU architecture: the flash-style attention (on tensor cores in float16 and bfloat16) and the
    register-tiled projection by hand, dlight's schedules for the rest; the build checked with nvcc where it
    is installed."""

    family = "cuda"
    source_file = CUDA_SOURCE
    companion_files = (CUDA_SOURCE, LAUNCHES)
    device_code = "CUDA C"
    devices = {"emulator": "the CUDA source emulator: the build's CUDA C on this CPU, with guard pages around "
                           "every buffer (no GPU needed; slow)"}

    def __init__(self, arch: str, name: str):
        super().__init__(name)
        self.arch = arch

    def make_tvm_target(self):
        return cuda_target(self.arch)

    #: float16 and bfloat16 attention and projections on tensor cores (``tensor_cores``, sm_80 on), in front
    #: of the kernels every GPU target has
    kernels = KernelTable(
        Row("attention on tensor cores", ("fused_attention",), lambda spec, dv, t: mma_attention(spec, dv, t.tvm_target),
            dtypes=("float16", "bfloat16")),
        Row("projection on tensor cores", PROJECTIONS, lambda spec, dv, t: mma_linear(spec, dv, t.tvm_target),
            dtypes=("float16", "bfloat16"), guard=lambda spec, t: mma_linear_applies(spec, t.tvm_target)),
    ) + GPU_KERNELS

    def compile(self, mod):
        """``tvm.compile``, the host programs of the same compile, and where nvcc is present the generated
        source compiled to PTX for the target's arch: a build known to compile."""
        require_device_kernels(mod)
        executable, hosts = host_program.capture(mod, self.tvm_target)
        source = cuda_source(executable)
        if nvcc_check_enabled():
            check_cuda_source(source, self.arch)
        return CudaLibrary(executable, source, hosts)

    def open_device(self, path, device=None):
        self.check_device(device)
        if device == "emulator":
            from .emulator import CudaEmulator
            if path is None:
                return CudaEmulator("", {})
            folder = os.path.dirname(path)
            return CudaEmulator.from_files(os.path.join(folder, CUDA_SOURCE), os.path.join(folder, LAUNCHES))
        import tvm

        from ...runtime.device import TVMDevice
        problem = cuda_runtime_problem()
        if problem:
            raise GPUUnavailable(f"cannot run a CUDA build here: {problem} (--device emulator runs it on this CPU, "
                                 f"slowly)")
        return TVMDevice(tvm.runtime.load_module(path) if path else None, tvm.cuda(0))

    def availability(self):
        import tvm
        compile_problem = None if compiler_loaded() else RUNTIME_ONLY
        if compile_problem is None and tvm.get_global_func("target.build.cuda", allow_missing=True) is None:
            compile_problem = "this TVM has no CUDA code generator (target.build.cuda)"
        nvcc = find_nvcc()
        note = (f"nvcc {nvcc}: every build's CUDA source is compiled to PTX as a check" if nvcc else
                "no nvcc: builds are not checked by compiling their CUDA source here")
        return compile_problem, cuda_runtime_problem(), note

    def describe(self):
        return {"arch": self.arch, "path": "tvm-cuda",
                "code": "CUDA C source in kernels.so, compiled when loaded (NVRTC through cuda-bindings, or nvcc "
                        "with TVM_CUDA_COMPILE_MODE=nvcc); kernels.cu is a copy",
                "nvcc_checked": nvcc_check_enabled()}


def make_target(option: str | None, name: str) -> CudaTarget:
    """``cuda`` (``DEFAULT_ARCH``) or ``cuda:ARCH``: a bad architecture fails here, not in a build."""
    arch = option or DEFAULT_ARCH
    if not _ARCH.match(arch):
        raise BuildError(f"bad CUDA architecture {arch!r}: expected the form sm_80, sm_86, sm_90, sm_90a")
    return CudaTarget(arch, name)


__all__ = ["CUDA_SOURCE", "DEFAULT_ARCH", "LAUNCHES", "CudaTarget", "check_cuda_source", "cuda_runtime_problem",
           "cuda_source", "cuda_target", "find_nvcc", "kernel_names", "make_target"]
