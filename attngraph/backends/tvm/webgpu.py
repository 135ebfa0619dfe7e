"""The ``vulkan`` target through WGSL: TVM's WebGPU code generator, dispatched on a Vulkan driver by
``wgpu`` (forced to its Vulkan backend).  The PyPI TVM wheel has no SPIR-V code generator and no
WebGPU runtime, so this module is both halves of the missing runtime:

- ``compile_webgpu`` compiles an IRModule of PrimFuncs for the ``webgpu`` target and, from the same
  compile, reads each kernel's WGSL and the host program TVM would have run (the IR right after
  ``tirx.SplitHostDevice``): per entry function its parameters, the intermediate buffers it
  allocates, and its kernel launches with dispatch sizes and scalar arguments as small expression
  trees over the symbolic dims.  The result (``WebGPUModule``) is plain JSON: an artifact stores
  it, and running it needs neither TVM's compiler nor TVM at all.
- ``WgpuDevice`` runs such a module: persistent buffers, pipelines made once per kernel, one
  command encoder collecting every dispatch until a result is read back.  It implements the
  executor's ``Device`` interface.

WGSL has no 64-bit integers and no bool storage: int64 and bool tensors are stored on the device as
int32 (``STORAGE_DTYPE``); ``narrow_kernel`` lowers the kernels that touch them accordingly, and the
device converts on upload and download.  lavapipe (Mesa's CPU Vulkan driver) is a real Vulkan
device, so all of this runs and is tested on machines without a GPU.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field

import numpy as np

from .. import BuildError, DeviceUnavailable
from .gpu import (
    GPUUnavailable,
    default_rules,
    gpu_forms,
    require_device_kernels,
    schedule_func,
    webgpu_target,
)
from .targets import TargetSpec, portable_host, register_target

#: The file a vulkan (WGSL) build's kernels are stored in, inside an artifact or the compile cache.
LIBRARY_NAME = "kernels.wgsl.json"
FORMAT = 1
#: How a logical dtype is stored in WGSL storage buffers (WGSL has no i64 and no bool arrays).
STORAGE_DTYPE = {"int64": "int32", "bool": "int32"}
_WGSL_TYPES = {"f32": "float32", "f16": "float16", "i32": "int32", "u32": "uint32"}


def storage_dtype(dtype: str) -> str:
    """The dtype a tensor of ``dtype`` has in device memory."""
    dtype = str(dtype)
    if dtype == "float64":
        raise BuildError("the vulkan (WGSL) target has no float64: build in float32")
    return STORAGE_DTYPE.get(dtype, dtype)


# -- expressions over the symbolic dims ---------------------------------------------------------

_BINARY = {"Add": "+", "Sub": "-", "Mul": "*", "FloorDiv": "//", "FloorMod": "%", "Div": "/", "Mod": "mod",
           "Min": "min", "Max": "max"}


def expr_to_json(expr):
    """A TIR integer expression as a JSON tree: an int, a dim name (str), or ``[op, a, b]`` with op
    one of + - * // % / mod min max.  Raises ``BuildError`` on anything else."""
    from tvm import tirx
    if isinstance(expr, int):
        return expr
    if isinstance(expr, tirx.IntImm):
        return int(expr.value)
    if isinstance(expr, tirx.Var):
        return expr.name
    kind = type(expr).__name__
    if kind in _BINARY:
        return [_BINARY[kind], expr_to_json(expr.a), expr_to_json(expr.b)]
    if kind == "Cast" and str(expr.ty).startswith(("int", "uint")):
        return expr_to_json(expr.value)  # sizes fit in 32 bits: checked when the values are written
    raise BuildError(f"cannot store the launch expression {expr} ({kind}) in a WGSL launch table")


def evaluate(tree, env: dict) -> int:
    """The value of a tree from ``expr_to_json`` with the names bound in ``env``."""
    if isinstance(tree, int):
        return tree
    if isinstance(tree, str):
        try:
            return env[tree]
        except KeyError:
            raise RuntimeError(f"launch table: no value for {tree!r} (known: {', '.join(sorted(env))})") from None
    op, a, b = tree[0], evaluate(tree[1], env), evaluate(tree[2], env)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "//":
        return a // b
    if op == "%":
        return a % b
    if op == "/":  # TIR Div on integers truncates toward zero
        return int(a / b) if (a < 0) != (b < 0) else a // b
    if op == "mod":
        return a - b * (int(a / b) if (a < 0) != (b < 0) else a // b)
    if op == "min":
        return min(a, b)
    if op == "max":
        return max(a, b)
    raise RuntimeError(f"launch table: unknown operator {op!r}")


# -- the compiled module ------------------------------------------------------------------------


@dataclass
class Kernel:
    """One WGSL compute shader and what its bind group holds."""
    name: str
    wgsl: str
    buffers: list  # [[name, storage dtype, writes?]] in binding order (TVM sorts them by name)
    pods: list  # [[name, wgsl scalar type]]: the uniform's fields before packGridDimX
    workgroup_size: list  # [x, y, z]
    shared_bytes: int  # var<workgroup> storage


@dataclass
class Launch:
    """One dispatch of a kernel by an entry function."""
    kernel: str
    buffers: list  # the entry's buffer names bound to the kernel's bindings, in binding order
    pods: list  # expression trees, one per kernel pod
    grid: list  # [x, y, z] workgroup counts as expression trees
    block: list  # [x, y, z] threads (static)


@dataclass
class Entry:
    """A PrimFunc as the host program runs it."""
    name: str
    params: list  # [{"name", "kind": "buffer"|"scalar", "dtype", "shape": [tree]}] in call order
    allocs: list  # [{"name", "dtype", "shape": [tree]}]: intermediate buffers the entry needs
    lets: list  # [[name, tree]] evaluated in order before the launches
    launches: list = field(default_factory=list)


class WebGPUModule:
    """Compiled WGSL kernels and the launch table of every entry function (JSON-serializable)."""

    def __init__(self, kernels: dict[str, Kernel], entries: dict[str, Entry], path: str = "wgsl-wgpu"):
        self.kernels, self.entries, self.path = kernels, entries, path

    def implements_function(self, name: str) -> bool:
        return name in self.entries

    def source(self) -> str:
        """Every kernel's WGSL, each under a ``// kernel NAME`` header (``--dump-source``)."""
        return "\n".join(f"// kernel {k.name}\n{k.wgsl}" for k in self.kernels.values())

    def to_json(self) -> dict:
        return {"format": FORMAT, "path": self.path,
                "kernels": [asdict(k) for k in self.kernels.values()],
                "entries": [asdict(e) for e in self.entries.values()]}

    @classmethod
    def from_json(cls, obj: dict) -> WebGPUModule:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ValueError(f"not a WGSL kernel library of format {FORMAT}")
        kernels = {k["name"]: Kernel(**k) for k in obj["kernels"]}
        entries = {e["name"]: Entry(**{**e, "launches": [Launch(**launch) for launch in e["launches"]]})
                   for e in obj["entries"]}
        return cls(kernels, entries, obj.get("path", "wgsl-wgpu"))

    def export_library(self, path: str) -> None:
        """Write the module to ``path`` (one JSON file: the WGSL sources and the launch tables)."""
        with open(path, "w") as f:
            json.dump(self.to_json(), f)

    @classmethod
    def load(cls, path: str) -> WebGPUModule:
        """Read a module written by ``export_library``; a clear error on anything else."""
        try:
            with open(path) as f:
                return cls.from_json(json.load(f))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a usable WGSL kernel library ({type(e).__name__}: {e})") from None


# -- compiling ----------------------------------------------------------------------------------

_BINDING = re.compile(r"@group\(0\) @binding\((\d+)\) var<storage, (read|read_write)> (\w+) : array<(\w+)>;")
_WORKGROUP = re.compile(r"@workgroup_size\((\d+), (\d+), (\d+)\)")
_SHARED = re.compile(r"var<workgroup> \w+ : array<(\w+), (\d+)>;")
_SECTION = re.compile(r"^// Function: (\S+)\n//-+\n", re.MULTILINE)


def _split_wgsl(source: str) -> dict[str, str]:
    """{kernel name: its self-contained WGSL module} from the webgpu module's concatenated source
    (each kernel sits under a ``// Function: NAME`` header, printed twice)."""
    parts = _SECTION.split(source)
    out: dict[str, str] = {}
    for name, text in zip(parts[1::2], parts[2::2]):
        out[name] = out.get(name, "") + text
    return {k: v.strip() + "\n" for k, v in out.items()}


_NONFINITE = {"inff": ("tvm_inf", "0x7f800000u"), "nanf": ("tvm_nan", "0x7fc00000u")}


def _fix_wgsl(wgsl: str) -> str:
    """TVM's WGSL printer writes infinity and NaN as the C literals ``inff`` / ``nanf``, which WGSL
    lacks (and a WGSL constant expression may not evaluate to either): they become calls of small
    functions that build the value at run time from its bits (a masked attention score is -inf)."""
    for literal, (fn, bits) in _NONFINITE.items():
        pattern = re.compile(rf"\b{literal}\b")
        if pattern.search(wgsl):
            wgsl = pattern.sub(f"{fn}()", wgsl)
            wgsl += f"\nfn {fn}() -> f32 {{\n  var bits = {bits};\n  return bitcast<f32>(bits);\n}}\n"
    return wgsl


def _parse_kernel(name: str, wgsl: str) -> Kernel:
    buffers = [[m[3].removesuffix("_ptr"), _WGSL_TYPES.get(m[4], m[4]), m[2] == "read_write"]
               for m in sorted(_BINDING.finditer(wgsl), key=lambda m: int(m[1]))]
    struct = re.search(r"struct PODArgs \{(.*?)\}", wgsl, re.DOTALL)
    fields = re.findall(r"(\w+): (\w+)", struct[1]) if struct else []
    if not fields or fields[-1][0] != "packGridDimX":
        raise BuildError(f"kernel {name}: unexpected WGSL uniform layout (no trailing packGridDimX)")
    if wgsl.count("packGridDimX") != 2:  # the struct field and the block-range guard, nothing else
        raise BuildError(f"kernel {name}: packGridDimX is used beyond the block-range guard")
    size = _WORKGROUP.search(wgsl)
    if size is None:
        raise BuildError(f"kernel {name}: no @workgroup_size in its WGSL")
    itemsize = {"f32": 4, "i32": 4, "u32": 4, "f16": 2}
    shared = sum(itemsize.get(t, 4) * int(n) for t, n in _SHARED.findall(wgsl))
    for _, dtype, _ in buffers:
        if dtype not in _WGSL_TYPES.values():
            raise BuildError(f"kernel {name}: WGSL storage of element type {dtype} cannot be run "
                             f"(int64 and bool tensors must be stored as int32: see narrow_kernel)")
    return Kernel(name, wgsl, buffers, [list(f) for f in fields[:-1]], [int(v) for v in size.groups()], shared)


def _walk(node, cls, fn) -> None:
    import tvm_ffi

    def visit(n):
        fn(n)
        return True
    tvm_ffi.structural_walk(node, (cls, visit), order="pre")


def _entry(name: str, func, kernels: dict[str, Kernel]) -> Entry:
    """The launch table of one host entry function (the IR right after SplitHostDevice)."""
    import tvm
    from tvm import tirx
    params = []
    for p in func.params:
        ty = p.ty
        if hasattr(ty, "shape") and hasattr(ty, "dtype"):
            params.append({"name": p.name, "kind": "buffer", "dtype": str(ty.dtype),
                           "shape": [expr_to_json(d) for d in ty.shape]})
        else:
            params.append({"name": p.name, "kind": "scalar", "dtype": str(ty), "shape": []})
    allocs, lets, calls = [], [], []
    _walk(func.body, tirx.AllocBuffer, lambda n: allocs.append(
        {"name": n.buffer.name, "dtype": str(n.buffer.dtype), "shape": [expr_to_json(d) for d in n.buffer.shape]}))
    _walk(func.body, tirx.Bind, lambda n: lets.append([n.var.name, expr_to_json(n.value)]))
    _walk(func.body, tvm.ir.Call, lambda n: calls.append(n)
          if getattr(n.op, "name", "") == "tirx.call_ffi_kernel" else None)
    entry = Entry(name, params, allocs, lets)
    known = {p["name"] for p in params} | {a["name"] for a in allocs}
    for call in calls:
        kname = str(call.args[0].value)
        kernel = kernels[kname]
        nbuf, npod = len(kernel.buffers), len(kernel.pods)
        operands = list(call.args[1:])
        tags = [str(t) for t in call.attrs.launch_params]
        if len(operands) != nbuf + npod + len(tags):
            raise BuildError(f"kernel {kname}: {len(operands)} launch operands, expected {nbuf} buffers, "
                             f"{npod} scalars and {len(tags)} launch sizes")
        buffers = [op.args[0].name for op in operands[:nbuf]]
        unknown = [b for b in buffers if b not in known]
        if unknown:
            raise BuildError(f"kernel {kname} reads buffers {unknown} that {name} neither takes nor allocates "
                             f"(buffer names must be unique within a PrimFunc)")
        values = dict(zip(tags, operands[nbuf + npod:]))
        if "blockIdx.z" in values:
            raise BuildError(f"kernel {kname} uses blockIdx.z, which WGSL dispatch reserves for large grids")
        extent = [values.get(t, 1) for t in ("blockIdx.x", "blockIdx.y", "blockIdx.z")]
        block = [values.get(t, 1) for t in ("threadIdx.x", "threadIdx.y", "threadIdx.z")]
        block = [int(b.value) if isinstance(b, tirx.IntImm) else b for b in block]
        if block != kernel.workgroup_size:
            raise BuildError(f"kernel {kname}: launch block {block} differs from its @workgroup_size "
                             f"{kernel.workgroup_size}")
        entry.launches.append(Launch(kname, buffers, [expr_to_json(e) for e in operands[nbuf:nbuf + npod]],
                                     [expr_to_json(e) for e in extent], block))
    if not entry.launches:
        raise BuildError(f"{name} compiled without a device kernel (unscheduled for GPU?)")
    return entry


def compile_webgpu(mod, target=None, *, schedule: bool = False) -> WebGPUModule:
    """Compile ``mod`` (GPU-scheduled PrimFuncs; ``schedule=True`` applies dlight first) for the
    ``webgpu`` target: the WGSL of every kernel and every function's launch table."""
    import tvm
    from tvm import tirx
    target = target or webgpu_target()
    if schedule:
        from .gpu import schedule_module
        mod = schedule_module(mod, target, default_rules())
    else:
        require_device_kernels(mod)
    captured = {}

    @tvm.instrument.pass_instrument
    class CaptureSplit:
        def run_after_pass(self, m, info):
            if info.name == "tirx.SplitHostDevice":
                captured["mod"] = m

    # The launch table must come from the same compile as the WGSL: options change the kernels.
    with tvm.transform.PassContext(instruments=[CaptureSplit()]):
        executable = tvm.compile(mod, target=target)
    from .gpu import device_source
    sources = {name: _fix_wgsl(text) for name, text in _split_wgsl(device_source(executable, "webgpu")).items()}
    kernels = {name: _parse_kernel(name, text) for name, text in sources.items()}
    split = captured["mod"]
    device_funcs = {gv.name_hint: f for gv, f in split.functions_items()
                    if isinstance(f, tirx.PrimFunc) and "tirx.is_global_func" in (f.attrs or {})}
    entries = {}
    for gv, f in split.functions_items():
        if isinstance(f, tirx.PrimFunc) and gv.name_hint not in device_funcs:
            name = str(f.attrs["global_symbol"]) if f.attrs and "global_symbol" in f.attrs else gv.name_hint
            entries[name] = _entry(name, f, kernels)
    return WebGPUModule(kernels, entries)


# -- narrowing int64 and bool storage ------------------------------------------------------------


def narrow_kernel(spec, dv, target):
    """The ``TargetSpec.hand_kernel`` hook of the vulkan target: a kernel whose operands or result
    are int64 or bool, lowered for int32 storage, GPU-scheduled; None for every other kernel (the
    generic path serves it).  WGSL has no 64-bit integers at all, so int64 values are int32 inside
    the kernel as well (ids, positions and offsets: the device refuses values beyond 32 bits on
    upload); bool values are read from and written to int32 storage through casts that are inlined
    into the kernel (a separate cast would be a bool intermediate buffer, which WGSL cannot store)."""
    from tvm import s_tir, te

    from .lowering import lower
    types = list(spec.in_types) + [spec.out_type]
    if all(str(t.dtype) not in STORAGE_DTYPE for t in types):
        return None

    def narrow(t):
        return t.with_dtype("int32") if t.dtype == "int64" else t

    stored = [te.placeholder(dv.shape(t.shape), storage_dtype(t.dtype), name=f"in{i}")
              for i, t in enumerate(spec.in_types)]
    def cast(tensor, dtype, name):  # fcompute takes positional indices only: no default arguments
        return te.compute(tensor.shape, lambda *i: tensor(*i).astype(dtype), name=name)

    logical = [s if s.dtype == narrow(t).dtype else cast(s, t.dtype, f"in{n}_logical")
               for n, (s, t) in enumerate(zip(stored, spec.in_types))]
    casts = [t.op.name for t, s in zip(logical, stored) if t is not s]
    out = lower(spec.op, spec.attrs, logical, narrow(spec.out_type), dv, name="out_logical")
    dtype = storage_dtype(spec.out_type.dtype)
    if out.dtype != dtype:
        out = cast(out, dtype, "out")
        casts.append("out_logical")
    sch = s_tir.Schedule(te.create_prim_func(stored + [out]))
    for name in casts:
        block = sch.get_sblock(name)
        try:
            sch.compute_inline(block)
        except Exception:  # noqa: BLE001 - a reduction result: fold the cast into its consumer instead
            sch.reverse_compute_inline(sch.get_sblock("out"))
    return schedule_func(sch.mod["main"], target)


def wgsl_kernel(spec, dv, target):
    """The ``TargetSpec.hand_kernel`` hook of the vulkan target (WGSL path): the flash-style fused
    attention (``gpu_kernels``, bool masks read from int32 storage) and the register-tiled projection,
    else ``narrow_kernel``."""
    from .gpu_kernels import flash_attention, linear
    return (flash_attention(spec, dv, target, narrow_bool=True, unroll=False) or linear(spec, dv, target)
            or narrow_kernel(spec, dv, target))


# -- running on wgpu ----------------------------------------------------------------------------


def _import_wgpu():
    """wgpu, forced onto its Vulkan backend (the variable is read when the first adapter is made)."""
    os.environ.setdefault("WGPU_BACKEND_TYPE", "Vulkan")
    try:
        import wgpu
    except ImportError:
        raise GPUUnavailable("the vulkan target runs through wgpu, which is not installed: pip install wgpu") from None
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
        if len(args) != len(entry.params):
            raise TypeError(f"{name} takes {len(entry.params)} arguments, got {len(args)}")
        env, bound = self._bind(entry, args)
        for var, tree in entry.lets:
            env[var] = evaluate(tree, env)
        for alloc in entry.allocs:
            shape = tuple(evaluate(d, env) for d in alloc["shape"])
            key = (name, alloc["name"])
            if key not in self._scratch:
                self._scratch[key] = _Buffer(self, 0)
            bound[alloc["name"]] = self.view(self._scratch[key], shape, alloc["dtype"])
        for launch in entry.launches:
            self._dispatch(launch, env, bound)

    # -- internals ------------------------------------------------------------------------------

    def _bind(self, entry: Entry, args: list) -> tuple[dict, dict]:
        """(dim values, {buffer name: tensor}) from a call's arguments, checking shapes and dtypes."""
        env, bound = {}, {}
        for p, arg in zip(entry.params, args):
            if p["kind"] == "scalar":
                env[p["name"]] = int(arg)
                continue
            if not isinstance(arg, WgpuTensor):
                raise TypeError(f"{entry.name}: argument {p['name']} must be a tensor on this device, "
                                f"got {type(arg).__name__}")
            if len(arg.shape) != len(p["shape"]):
                raise ValueError(f"{entry.name}: argument {p['name']} has rank {len(arg.shape)}, "
                                 f"expected {len(p['shape'])}")
            if storage_dtype(arg.dtype) != storage_dtype(p["dtype"]):
                raise TypeError(f"{entry.name}: argument {p['name']} has dtype {arg.dtype}, expected {p['dtype']}")
            for d, size in zip(p["shape"], arg.shape):
                if isinstance(d, str):
                    env.setdefault(d, size)
            bound[p["name"]] = arg
        for p in entry.params:  # compound dims (b*s, s+1) are checked once every dim is known
            if p["kind"] == "buffer":
                want = tuple(evaluate(d, env) for d in p["shape"])
                if want != bound[p["name"]].shape:
                    raise ValueError(f"{entry.name}: argument {p['name']} has shape {bound[p['name']].shape}, "
                                     f"expected {want} (dims {env})")
        return env, bound

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

    def _dispatch(self, launch: Launch, env: dict, bound: dict) -> None:
        kernel = self.module.kernels[launch.kernel]
        grid = [evaluate(g, env) for g in launch.grid]
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
        pods = []
        for (pname, ptype), tree in zip(kernel.pods, launch.pods):
            value = evaluate(tree, env)
            if ptype == "f32":
                pods.append(np.float32(value).tobytes())
            else:
                if not -2**31 <= value < 2**31:
                    raise RuntimeError(f"kernel {kernel.name}: scalar {pname} = {value} does not fit in 32 bits")
                pods.append(np.int32(value).tobytes())
        # The guard is `block index > packGridDimX`: passing the last valid index makes it exact
        # when the split pads the grid.
        pods.append(np.uint32(pack - 1).tobytes())
        uniform = self._uniform(b"".join(pods))
        pipeline, layout = self._pipeline(kernel)
        entries = []
        for i, bname in enumerate(launch.buffers):
            tensor = bound[bname]
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


# -- the vulkan target ---------------------------------------------------------------------------


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


def vulkan_availability():
    """(compile problem, run problem, note) of the vulkan target here (``attngraph targets``)."""
    import tvm
    path = vulkan_path()
    from .targets import RUNTIME_ONLY, compiler_loaded
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
            info = vulkan_adapter().info
            kind = str(info.get("adapter_type", ""))
            note += f": {info.get('device', '?')} ({kind or 'unknown type'})"
            if "cpu" in kind.lower():
                note += ", a CPU driver (lavapipe): for correctness, not speed"
    except DeviceUnavailable as e:
        run_problem = str(e)
    return compile_problem, run_problem, note


def open_wgsl_device(path: str | None) -> WgpuDevice:
    """The executor device for a WGSL kernel library (``TargetSpec.open_device``)."""
    return WgpuDevice(WebGPUModule.load(path) if path else None)


def _open_spirv_device(path: str | None):
    import tvm

    from .executor import TVMDevice
    return TVMDevice(tvm.runtime.load_module(path) if path else None, tvm.vulkan(0))


def vulkan_spec() -> TargetSpec:
    """The ``vulkan`` target: TVM's SPIR-V code generator where this TVM has one, else WGSL on wgpu."""
    if spirv_available():
        import tvm
        return TargetSpec("vulkan", lambda: tvm.target.Target("vulkan", host=portable_host()), schedule_func, None,
                          _open_spirv_device, describe=lambda: {"path": "spirv", "runtime": "tvm-vulkan"},
                          availability=vulkan_availability)
    return TargetSpec("vulkan", webgpu_target, schedule_func, wgsl_kernel, open_wgsl_device,
                      compile=lambda mod, target: compile_webgpu(mod, target), library_name=LIBRARY_NAME,
                      kind="webgpu", describe=_describe_wgsl, availability=vulkan_availability, kernel_forms=gpu_forms)


def _describe_wgsl() -> dict:
    return {"path": "wgsl-wgpu", "codegen": "tvm-webgpu (WGSL)", "runtime": "wgpu on the Vulkan driver"}


register_target(vulkan_spec())
