"""The TVM backend: lowering to tensor expressions, schedules, build, compile cache, and the
executor that runs a kernel plan over planned buffers (llvm here; a GPU target registers itself
with ``register_target``)."""

from .. import BuildError
from .build import Kernels, KernelSpec, build_kernels, compile_graph, plan_kernels
from .executor import CompiledModel, Device, TVMDevice
from .targets import TARGETS, TargetSpec, get_target, register_target

__all__ = ["TARGETS", "BuildError", "CompiledModel", "Device", "KernelSpec", "Kernels", "TVMDevice", "TargetSpec",
           "build_kernels", "compile_graph", "get_target", "plan_kernels", "register_target"]
