"""The vulkan target's runtime: a ``WebGPUModule`` (``wgsl.py``) run on a Vulkan driver through
``wgpu``, forced onto its Vulkan backend: persistent buffers, pipelines made once per kernel, one
command encoder collecting every dispatch until a result is read back; the host programs run by
``runtime.host_program``.  lavapipe (Mesa's CPU Vulkan driver) is a real Vulkan device, so all of this
runs and is tested on machines without a GPU."""

from __future__ import annotations

import atexit
import logging
import math
import os
import re
import shutil
import tempfile

import numpy as np

from ...runtime import host_program
from ..gpu import GPUUnavailable
from .wgsl import Kernel, WebGPUModule, storage_dtype


class _DropForcedBackend(logging.Filter):
    """wgpu's warning "Forcing backend: Vulkan (6)": what ``_import_wgpu`` asks for, not a problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: let logging report it as it would
            return True
        return not message.startswith("Forcing backend:")


def _private_runtime_dir() -> None:
    """Point ``XDG_RUNTIME_DIR`` at a private temporary directory where it is unset or invalid: the
    Vulkan loader's window-system code (libwayland) otherwise prints "error: XDG_RUNTIME_DIR is invalid
    or not set in the environment." on every device made, though compute needs no display.  Set for
    this process before the driver loads (C's ``getenv`` sees ``os.environ``); removed at exit."""
    current = os.environ.get("XDG_RUNTIME_DIR", "")
    if current.startswith("/") and os.path.isdir(current):
        return
    path = tempfile.mkdtemp(prefix="attngraph-xdg-")  # mode 0700, as the spec asks
    os.environ["XDG_RUNTIME_DIR"] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)


def _import_wgpu():
    """wgpu, forced onto its Vulkan backend (the variable is read when the first adapter is made), without
    the driver's noise on stderr (``_private_runtime_dir``, ``_DropForcedBackend``)."""
    os.environ.setdefault("WGPU_BACKEND_TYPE", "Vulkan")
    _private_runtime_dir()
    try:
        import wgpu
    except ImportError:
        raise GPUUnavailable("the vulkan target runs through wgpu, which is not installed: pip install wgpu") from None
    log = logging.getLogger("wgpu")  # after the import: wgpu makes it of its own logger class
    if not any(isinstance(f, _DropForcedBackend) for f in log.filters):
        log.addFilter(_DropForcedBackend())
    return wgpu


_ADAPTER = {}


def vulkan_adapter():
    """The wgpu adapter on a Vulkan driver (a GPU's, or Mesa's lavapipe on the CPU), made once."""
    if "adapter" not in _ADAPTER:
        wgpu = _import_wgpu()
        try:
            adapter = wgpu.gpu.request_adapter_sync(power_preference="high-performance")
        except Exception as e:  # noqa: BLE001 - wgpu raises various errors for "no adapter"
            raise GPUUnavailable(f"no Vulkan device found by wgpu ({type(e).__name__}: {e}); on a machine "
                                 f"without a GPU install Mesa's lavapipe: apt-get install mesa-vulkan-drivers") from None
        if adapter is None:
            raise GPUUnavailable("no Vulkan device found by wgpu; on a machine without a GPU install Mesa's "
                                 "lavapipe: apt-get install mesa-vulkan-drivers")
        backend = str(adapter.info.get("backend_type", ""))
        if backend and backend.lower() != "vulkan":
            raise GPUUnavailable(f"wgpu chose its {backend} backend, not Vulkan (WGPU_BACKEND_TYPE is "
                                 f"{os.environ.get('WGPU_BACKEND_TYPE')!r})")
        _ADAPTER["adapter"] = adapter
    return _ADAPTER["adapter"]


#: The device limits a run depends on; requested at the adapter's maximum (wgpu's defaults are lower).
_LIMITS = ("max-compute-invocations-per-workgroup", "max-compute-workgroup-size-x", "max-compute-workgroup-size-y",
           "max-compute-workgroup-size-z", "max-compute-workgroup-storage-size", "max-compute-workgroups-per-dimension",
           "max-storage-buffer-binding-size", "max-buffer-size", "max-storage-buffers-per-shader-stage",
           "max-bind-groups")


class WgpuTensor:
    """A tensor on a wgpu device: a shape and a logical dtype over the start of a buffer."""

    def __init__(self, buffer: _Buffer, shape: tuple, dtype: str):
        self.buffer, self.shape, self.dtype = buffer, tuple(int(s) for s in shape), str(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes the tensor occupies in device storage."""
        return math.prod(self.shape) * np.dtype(storage_dtype(self.dtype)).itemsize


class _Buffer:
    """A storage buffer; ``grow`` replaces it (contents dropped) when a view needs more room."""

    def __init__(self, device: WgpuDevice, nbytes: int):
        self.device = device
        self.nbytes = 0
        self.gpu = None
        self.grow(nbytes)

    def grow(self, nbytes: int) -> None:
        nbytes = max(16, -(-int(nbytes) // 16) * 16)  # copies and bindings want multiples of 4; never empty
        if nbytes <= self.nbytes:
            return
        self.device.check_buffer_bytes(nbytes)
        wgpu = self.device.wgpu
        self.gpu = self.device.device.create_buffer(
            size=nbytes, usage=wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_SRC | wgpu.BufferUsage.COPY_DST)
        self.nbytes = nbytes


class _Stream:
    """The process's wgpu device and the command encoder recording its dispatches.  Every
    ``WgpuDevice`` (one per loaded artifact) shares it, so tensors pass between artifacts (a
    generator's entries hand their caches to each other) and work runs in the order it was recorded."""

    def __init__(self, adapter, features, limits):
        self.device = adapter.request_device_sync(required_features=features, required_limits=limits)
        self.encoder = None
        self.uniforms: list = []  # pool; the first ``pending`` are used by the recorded dispatches
        self.pending = 0


def _stream() -> _Stream:
    if "stream" not in _ADAPTER:
        adapter = vulkan_adapter()
        limits = {k: adapter.limits[k] for k in _LIMITS if k in adapter.limits}
        # f16 kernels need the shader-f16 feature, which is requested where the adapter has it.
        features = [f for f in ("shader-f16",) if f in adapter.features]
        _ADAPTER["stream"] = _Stream(adapter, features, limits)
    return _ADAPTER["stream"]


class WgpuDevice:
    """Runs a ``WebGPUModule`` on a Vulkan device through wgpu; the executor's ``Device``.

    Dispatches are recorded into one command encoder and submitted when a result is read
    (``download``) or new data is written (``upload``), so a model run is one submission between
    uploads and readbacks.  Each launch's uniform (its scalars, then packGridDimX) has its own
    buffer within a submission."""

    def __init__(self, module: WebGPUModule | None):
        self.wgpu = _import_wgpu()
        self.module = module or WebGPUModule({}, {})
        adapter = vulkan_adapter()
        self._stream = _stream()
        self.device = self._stream.device
        self.features = set(self.device.features)
        self.limits = dict(self.device.limits)
        info = adapter.info
        self.name = f"vulkan:{info.get('device', '?')} ({info.get('description', '') or info.get('adapter_type', '')})"
        self._pipelines: dict = {}
        self._fence = None  # a 4-byte buffer read to wait for the queue (``synchronize``)
        self._scratch: dict = {}  # (entry, alloc name) -> _Buffer, grown as needed
        for kernel in self.module.kernels.values():
            self.check_kernel(kernel)

    # -- limits ---------------------------------------------------------------------------------

    def check_kernel(self, kernel: Kernel) -> None:
        """A clear error when ``kernel`` needs more than the device has (workgroup size, shared memory)."""
        lim = self.limits
        x, y, z = kernel.workgroup_size
        wanted = {"max-compute-workgroup-size-x": x, "max-compute-workgroup-size-y": y,
                  "max-compute-workgroup-size-z": z, "max-compute-invocations-per-workgroup": x * y * z,
                  "max-compute-workgroup-storage-size": kernel.shared_bytes,
                  "max-storage-buffers-per-shader-stage": len(kernel.buffers)}
        for limit, value in wanted.items():
            if limit in lim and value > lim[limit]:
                raise GPUUnavailable(f"kernel {kernel.name} needs {limit} = {value}, but the Vulkan device "
                                     f"{self.name} allows {lim[limit]}")
        if re.search(r"^\s*enable f16;", kernel.wgsl, re.MULTILINE) and "shader-f16" not in self.features:
            raise GPUUnavailable(f"kernel {kernel.name} computes in float16, but the Vulkan device {self.name} "
                                 f"lacks the shader-f16 feature")

    def check_buffer_bytes(self, nbytes: int, limit: str = "max-buffer-size") -> None:
        """A clear error when a buffer (or a binding: ``max-storage-buffer-binding-size``) is too large."""
        if limit in self.limits and nbytes > self.limits[limit]:
            raise GPUUnavailable(f"a buffer of {nbytes} bytes exceeds {limit} = {self.limits[limit]} of the "
                                 f"Vulkan device {self.name}")

    # -- the Device interface -------------------------------------------------------------------

    def allocate(self, nbytes: int) -> _Buffer:
        return _Buffer(self, nbytes)

    def view(self, base, shape, dtype) -> WgpuTensor:
        buffer = base.buffer if isinstance(base, WgpuTensor) else base
        tensor = WgpuTensor(buffer, shape, dtype)
        if tensor.nbytes > buffer.nbytes:
            # Planned buffers count logical bytes; bool is stored as 4-byte int32.  The executor makes
            # views of its planned buffers before a run writes any value, so growing loses nothing.
            buffer.grow(tensor.nbytes)
        return tensor

    def upload(self, array) -> WgpuTensor:
        array = np.asarray(array)
        stored = self._to_storage(array)
        tensor = WgpuTensor(_Buffer(self, stored.nbytes), array.shape, array.dtype)
        self._flush()  # queued writes land before already recorded dispatches otherwise
        if stored.nbytes:
            self.device.queue.write_buffer(tensor.buffer.gpu, 0, stored.tobytes())
        return tensor

    def download(self, tensor: WgpuTensor) -> np.ndarray:
        self._flush()
        stored = np.dtype(storage_dtype(tensor.dtype))
        if tensor.nbytes == 0:
            return np.zeros(tensor.shape, tensor.dtype)
        size = -(-tensor.nbytes // 4) * 4
        data = self.device.queue.read_buffer(tensor.buffer.gpu, 0, size)
        values = np.frombuffer(data, dtype=stored, count=math.prod(tensor.shape)).reshape(tensor.shape)
        return values.astype(tensor.dtype) if stored != np.dtype(tensor.dtype) else values.copy()

    def has_kernel(self, name: str) -> bool:
        return name in self.module.entries

    def call(self, name: str, args: list) -> None:
        """Run entry ``name``: its buffer arguments as ``WgpuTensor``s, its scalar dims as ints."""
        entry = self.module.entries.get(name)
        if entry is None:
            raise KeyError(f"the WGSL module has no function {name!r}")
        for p, arg in zip(entry.params, args):
            if p["kind"] == "buffer" and not isinstance(arg, WgpuTensor):
                raise TypeError(f"{entry.name}: argument {p['name']} must be a tensor on this device, "
                                f"got {type(arg).__name__}")

        def workspace(alloc: str, shape, dtype):
            if (name, alloc) not in self._scratch:
                self._scratch[(name, alloc)] = _Buffer(self, 0)
            return self.view(self._scratch[(name, alloc)], shape, dtype)
        host_program.run(entry, args, allocate=workspace, launch=self._dispatch,
                         same_dtype=lambda a, b: storage_dtype(a) == storage_dtype(b))

    # -- internals ------------------------------------------------------------------------------

    def _pipeline(self, kernel: Kernel):
        if kernel.name not in self._pipelines:
            wgpu, dev = self.wgpu, self.device
            entries = [{"binding": i, "visibility": wgpu.ShaderStage.COMPUTE,
                        "buffer": {"type": wgpu.BufferBindingType.storage if writes
                                   else wgpu.BufferBindingType.read_only_storage}}
                       for i, (_, _, writes) in enumerate(kernel.buffers)]
            entries.append({"binding": len(kernel.buffers), "visibility": wgpu.ShaderStage.COMPUTE,
                            "buffer": {"type": wgpu.BufferBindingType.uniform}})
            layout = dev.create_bind_group_layout(entries=entries)
            pipeline = dev.create_compute_pipeline(
                layout=dev.create_pipeline_layout(bind_group_layouts=[layout]),
                compute={"module": dev.create_shader_module(code=kernel.wgsl), "entry_point": kernel.name})
            self._pipelines[kernel.name] = (pipeline, layout)
        return self._pipelines[kernel.name]

    def _uniform(self, values: bytes):
        if self._stream.pending == len(self._stream.uniforms):
            self._stream.uniforms.append(self.device.create_buffer(
                size=256, usage=self.wgpu.BufferUsage.UNIFORM | self.wgpu.BufferUsage.COPY_DST))
        buffer = self._stream.uniforms[self._stream.pending]
        self._stream.pending += 1
        self.device.queue.write_buffer(buffer, 0, values)
        return buffer

    def _dispatch(self, launch, grid: list, block: list, tensors: list, pods: list) -> None:
        kernel = self.module.kernels[launch.kernel]
        if min(grid) <= 0:
            return  # an empty tensor: nothing to compute
        limit = self.limits.get("max-compute-workgroups-per-dimension", 65535)
        x, y, z = grid
        if y > limit:
            raise GPUUnavailable(f"kernel {kernel.name} needs {y} workgroups in y; the Vulkan device {self.name} "
                                 f"allows {limit}")
        pack = x
        while x > limit:  # spread x over z: the kernel rebuilds its block index as z * gridDim.x + x
            x, z = -(-x // 2), z * 2
        if z > limit:
            raise GPUUnavailable(f"kernel {kernel.name} needs {pack} workgroups, too many for {self.name}")
        values = []
        for (pname, ptype), value in zip(kernel.pods, pods):
            if ptype == "f32":
                values.append(np.float32(value).tobytes())
            else:
                if not -2**31 <= value < 2**31:
                    raise RuntimeError(f"kernel {kernel.name}: scalar {pname} = {value} does not fit in 32 bits")
                values.append(np.int32(value).tobytes())
        # The guard is `block index > packGridDimX`: passing the last valid index makes it exact
        # when the split pads the grid.
        values.append(np.uint32(pack - 1).tobytes())
        uniform = self._uniform(b"".join(values))
        pipeline, layout = self._pipeline(kernel)
        entries = []
        for i, tensor in enumerate(tensors):
            size = max(4, -(-tensor.nbytes // 4) * 4)  # the tensor, not the whole planned buffer
            self.check_buffer_bytes(size, "max-storage-buffer-binding-size")
            entries.append({"binding": i, "resource": {"buffer": tensor.buffer.gpu, "offset": 0, "size": size}})
        entries.append({"binding": len(launch.buffers), "resource": {"buffer": uniform, "offset": 0, "size": 256}})
        if self._stream.encoder is None:
            self._stream.encoder = self.device.create_command_encoder()
        compute = self._stream.encoder.begin_compute_pass()
        compute.set_pipeline(pipeline)
        compute.set_bind_group(0, self.device.create_bind_group(layout=layout, entries=entries))
        compute.dispatch_workgroups(x, y, z)
        compute.end()

    def _flush(self) -> None:
        if self._stream.encoder is not None:
            self.device.queue.submit([self._stream.encoder.finish()])
            self._stream.encoder = None
        self._stream.pending = 0

    def synchronize(self) -> None:
        """Submit the recorded dispatches and wait until they are done (for timing).  A read of a 4-byte
        buffer waits for every earlier submission (the queue runs in order); wgpu 0.32's
        ``on_submitted_work_done_sync`` fails on its own callback signature."""
        self._flush()
        if self._fence is None:
            self._fence = self.device.create_buffer(size=4, usage=self.wgpu.BufferUsage.COPY_SRC)
        self.device.queue.read_buffer(self._fence, 0, 4)

    def _to_storage(self, array: np.ndarray) -> np.ndarray:
        dtype = storage_dtype(array.dtype)
        if dtype == str(array.dtype):
            return np.ascontiguousarray(array)
        if array.dtype.kind in "iu" and array.size and (array.min() < -2**31 or array.max() >= 2**31):
            raise ValueError(f"an {array.dtype} tensor holds values beyond 32 bits, which the vulkan target "
                             f"stores as int32")
        return np.ascontiguousarray(array.astype(dtype))
