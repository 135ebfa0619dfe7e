"""The TVM backend: lowering to tensor expressions, schedules, build, compile cache, and the
executor that runs a kernel plan over planned buffers (llvm now; the GPU targets plug in beside)."""

from .. import BuildError
from .build import (
           TARGETS,
           Kernels,
           KernelSpec,
           build_kernels,
           compile_graph,
           plan_kernels,
)
from .executor import CompiledModel, Device, TVMDevice

__all__ = [
           "TARGETS",
           "BuildError",
           "CompiledModel",
           "Device",
           "KernelSpec",
           "Kernels",
           "TVMDevice",
           "build_kernels",
           "compile_graph",
           "plan_kernels",
]
