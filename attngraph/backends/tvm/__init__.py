"""The TVM backend.  Where to look:

- ``plan.py``: which nodes run as kernels, the distinct kernels and their forms;
- ``lower/``: every op as a tensor expression, one table filled per group of ops;
- ``targets/``: one folder per family (``cpu``, ``gpu`` shared by ``cuda`` and ``vulkan``), each a
  ``Target`` with its kernel table, generic schedule, layout passes and device;
- ``build.py``: lowering, compiling and caching a graph's kernels for a target;
- ``runtime/``: the device protocol, the executor, weights binding, host programs as data;
- ``artifact.py``: the build directory; ``tune.py``: MetaSchedule (opt-in); ``cache.py``, ``shapes.py``.
"""

from .. import BuildError
from .build import Kernels, build_kernels, compile_graph
from .plan import KernelSpec, plan_kernels
from .runtime.device import Device, TVMDevice
from .runtime.executor import CompiledModel
from .targets import FAMILIES, Target, get_target

__all__ = ["FAMILIES", "BuildError", "CompiledModel", "Device", "KernelSpec", "Kernels", "TVMDevice", "Target",
           "build_kernels", "compile_graph", "get_target", "plan_kernels"]
