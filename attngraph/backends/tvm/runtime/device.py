"""What the executor runs kernels on: the ``Device`` protocol, TVM's runtime devices (``TVMDevice``:
CPU, CUDA), and the stand-in for a build that cannot run here (``CompileOnlyDevice``).  The vulkan
target's wgpu device and the CUDA source emulator implement the same protocol in their folders."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ... import DeviceUnavailable


class Device(Protocol):
    """What the executor needs from a device.  Buffers and tensors are opaque handles."""

    name: str

    def allocate(self, nbytes: int):
        """A new buffer of ``nbytes`` bytes (contents undefined)."""

    def view(self, base, shape: tuple, dtype: str):
        """A tensor of ``shape`` and ``dtype`` over the first bytes of ``base`` (a buffer or a tensor)."""

    def upload(self, array: np.ndarray):
        """A new tensor holding a copy of ``array``."""

    def download(self, tensor) -> np.ndarray:
        """A NumPy copy of ``tensor``."""

    def has_kernel(self, name: str) -> bool:
        """Whether the compiled module has a kernel called ``name``."""

    def call(self, name: str, args: list) -> None:
        """Run kernel ``name`` on ``args``: operand tensors in order, the output tensor, then as ints
        the dims no buffer shape gives (``shapes.scalar_dims``; usually none)."""

    def synchronize(self) -> None:
        """Wait until every kernel called so far has finished (a GPU runs them asynchronously)."""


class TVMDevice:
    """A TVM runtime device (``tvm.cpu()``, ``tvm.cuda()``) running the functions of a loaded module."""

    def __init__(self, module, device=None):
        import tvm
        self.module = module
        self.device = device if device is not None else tvm.cpu()
        self.name = str(self.device)
        self._funcs: dict = {}

    def allocate(self, nbytes: int):
        import tvm
        return tvm.runtime.empty((max(int(nbytes), 1),), "uint8", self.device)

    def view(self, base, shape, dtype):
        return base._create_view(tuple(int(s) for s in shape), dtype)

    def upload(self, array):
        import tvm
        return tvm.runtime.tensor(np.require(array, requirements="C"), self.device)  # keeps 0-d arrays 0-d

    def download(self, tensor):
        return tensor.numpy()

    def has_kernel(self, name):
        return self.module is not None and self.module.implements_function(name)

    def call(self, name, args):
        func = self._funcs.get(name)
        if func is None:
            func = self._funcs[name] = self.module[name]
        func(*args)

    def synchronize(self):
        self.device.sync()


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


class _Placeholder:
    def __init__(self, shape: tuple, dtype: str):
        self.shape, self.dtype = shape, dtype


def open_or_compile_only(target, path: str | None, kernels, device: str | None = None):
    """``target.open_device(path, device)``, or where the device is missing here a ``CompileOnlyDevice``
    (building needs no device; running does, and then says why it cannot)."""
    try:
        return target.open_device(path, device)
    except DeviceUnavailable as e:
        return CompileOnlyDevice(str(e), kernels)
