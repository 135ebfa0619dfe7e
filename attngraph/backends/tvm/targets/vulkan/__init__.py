"""The ``vulkan`` family: any Vulkan driver.  TVM's own Vulkan (SPIR-V) code generator and runtime where
the installed TVM has them; the PyPI wheel has neither, so the kernels compile with TVM's WGSL code
generator (``wgsl.py``) and run on the Vulkan driver through ``wgpu`` (``device.py``).  On a machine
without a GPU, Mesa's lavapipe is a Vulkan driver on the CPU: correct, slow."""

from __future__ import annotations

import os

from .... import DeviceUnavailable
from ..base import RUNTIME_ONLY, compiler_loaded, portable_host
from ..gpu import GPU_KERNELS, GPUTarget
from ..table import ANY_OP, KernelTable, Row
from .wgsl import LIBRARY_NAME, STORAGE_DTYPE, WebGPUModule, compile_webgpu, narrow_kernel, webgpu_target


def spirv_available() -> bool:
    """Whether this TVM has its own Vulkan (SPIR-V) code generator and runtime (the PyPI wheel has not)."""
    import tvm
    try:
        return tvm.get_global_func("target.build.vulkan", allow_missing=True) is not None \
            and bool(tvm.runtime.enabled("vulkan"))
    except Exception:  # noqa: BLE001 - an unknown runtime counts as absent
        return False


def vulkan_path() -> str:
    """Which path builds the vulkan target here: ``spirv`` (TVM's own) or ``wgsl-wgpu``."""
    return "spirv" if spirv_available() else "wgsl-wgpu"


class VulkanTarget(GPUTarget):
    """Vulkan through WGSL and wgpu: the GPU kernels with their loops left as loops (lavapipe's shader
    compiler takes 45 s over the unrolled attention at head dim 64; a GPU driver unrolls them itself),
    bool masks read from int32 storage, and every kernel on int64 or bool narrowed to int32."""

    family = "vulkan"
    library_name = LIBRARY_NAME
    device_code = "WGSL"
    narrow_bool = True
    unroll = False
    half_dtypes = ("float16",)
    half_dtypes_note = "WGSL has no bfloat16 type (float16 runs where the device has shader-f16)"

    def make_tvm_target(self):
        return webgpu_target()

    #: the GPU kernels, then every kernel on int64 or bool narrowed to int32 storage (WGSL has neither)
    kernels = GPU_KERNELS + KernelTable(
        Row("int64 and bool narrowed to int32", ANY_OP, lambda spec, dv, t: narrow_kernel(spec, dv, t.tvm_target),
            guard=lambda spec, t: any(str(ty.dtype) in STORAGE_DTYPE for ty in (*spec.in_types, spec.out_type))))

    def compile(self, mod):
        return compile_webgpu(mod, self.tvm_target)

    def open_device(self, path, device=None):
        from .device import WgpuDevice
        self.check_device(device)
        return WgpuDevice(WebGPUModule.load(path) if path else None)

    def availability(self):
        return _availability("wgsl-wgpu")

    def describe(self):
        return {"path": "wgsl-wgpu", "codegen": "tvm-webgpu (WGSL)", "runtime": "wgpu on the Vulkan driver"}

    def device_source(self, directory, manifest):
        return WebGPUModule.load(os.path.join(directory, manifest["library"])).source()


class SpirvTarget(GPUTarget):
    """Vulkan through TVM's own SPIR-V code generator and runtime (a TVM built with Vulkan)."""

    family = "vulkan"

    def make_tvm_target(self):
        import tvm
        return tvm.target.Target("vulkan", host=portable_host())

    kernels = KernelTable()  # dlight's schedules throughout

    def open_device(self, path, device=None):
        import tvm

        from ...runtime.device import TVMDevice
        self.check_device(device)
        return TVMDevice(tvm.runtime.load_module(path) if path else None, tvm.vulkan(0))

    def availability(self):
        return _availability("spirv")

    def describe(self):
        return {"path": "spirv", "runtime": "tvm-vulkan"}


def _availability(path: str):
    """(compile problem, run problem, note) of the vulkan target here (``attngraph targets``)."""
    import tvm
    compile_problem = None if compiler_loaded() else RUNTIME_ONLY
    if compile_problem is None and path == "wgsl-wgpu" and \
            tvm.get_global_func("target.build.webgpu", allow_missing=True) is None:
        compile_problem = "this TVM has neither a Vulkan (SPIR-V) nor a WebGPU (WGSL) code generator"
    run_problem, note = None, f"path {path}"
    try:
        if path == "spirv":
            if not tvm.vulkan(0).exist:
                run_problem = "TVM's Vulkan runtime finds no Vulkan device"
        else:
            from .device import vulkan_adapter
            info = vulkan_adapter().info
            kind = str(info.get("adapter_type", ""))
            note += f": {info.get('device', '?')} ({kind or 'unknown type'})"
            if "cpu" in kind.lower():
                note += ", a CPU driver (lavapipe): for correctness, not speed"
    except DeviceUnavailable as e:
        run_problem = str(e)
    return compile_problem, run_problem, note


def make_target(option: str | None, name: str):
    """``vulkan``: TVM's SPIR-V path where this TVM has one, else WGSL on wgpu."""
    if option is not None:
        from .... import BuildError
        raise BuildError(f"the vulkan target takes no option (got {name!r})")
    return SpirvTarget(name) if spirv_available() else VulkanTarget(name)
