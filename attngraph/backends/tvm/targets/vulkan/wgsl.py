"""The vulkan target's code through WGSL: TVM's WebGPU code generator compiles the kernels, and
``compile_webgpu`` stores, from that same compile, each kernel's WGSL and the host program TVM would
have run around it (``runtime.host_program``): a ``WebGPUModule``, plain JSON, which an artifact
stores and which runs without TVM (``device.py``: wgpu on the Vulkan driver).

WGSL has no 64-bit integers and no bool storage: int64 and bool tensors are stored on the device as
int32 (``STORAGE_DTYPE``); ``narrow_kernel`` lowers the kernels that touch them accordingly, and the
device converts on upload and download.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

from .... import BuildError
from ...runtime.host_program import Entry, capture
from ..gpu import device_source
from ..gpu.dlight import default_rules, require_device_kernels, schedule_func, schedule_module

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
                "entries": [e.to_json() for e in self.entries.values()]}

    @classmethod
    def from_json(cls, obj: dict) -> WebGPUModule:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ValueError(f"not a WGSL kernel library of format {FORMAT}")
        kernels = {k["name"]: Kernel(**k) for k in obj["kernels"]}
        entries = {e["name"]: Entry.from_json(e) for e in obj["entries"]}
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


def webgpu_target():
    """The TVM target of the WGSL code generator (defaults: 256 threads, 32 KiB shared memory)."""
    import tvm

    from ..base import portable_host
    return tvm.target.Target("webgpu", host=portable_host())


def _check_launches(entry: Entry, kernels: dict[str, Kernel]) -> None:
    """What a WGSL dispatch needs of each launch: the kernel's scalars and workgroup size, no ``blockIdx.z``."""
    for launch in entry.launches:
        kernel = kernels[launch.kernel]
        if len(launch.buffers) != len(kernel.buffers) or len(launch.pods) != len(kernel.pods):
            raise BuildError(f"kernel {kernel.name}: {len(launch.buffers)} buffers and {len(launch.pods)} scalars "
                             f"launched, its WGSL binds {len(kernel.buffers)} and {len(kernel.pods)}")
        if launch.grid[2] != 1:
            raise BuildError(f"kernel {kernel.name} uses blockIdx.z, which WGSL dispatch reserves for large grids")
        if launch.block != kernel.workgroup_size:
            raise BuildError(f"kernel {kernel.name}: launch block {launch.block} differs from its @workgroup_size "
                             f"{kernel.workgroup_size}")


def compile_webgpu(mod, target=None, *, schedule: bool = False) -> WebGPUModule:
    """Compile ``mod`` (GPU-scheduled PrimFuncs; ``schedule=True`` applies dlight first) for the
    ``webgpu`` target: the WGSL of every kernel and every function's launch table."""
    target = target or webgpu_target()
    if schedule:
        mod = schedule_module(mod, target, default_rules())
    else:
        require_device_kernels(mod)
    executable, entries = capture(mod, target)
    sources = {name: _fix_wgsl(text) for name, text in _split_wgsl(device_source(executable, "webgpu")).items()}
    kernels = {name: _parse_kernel(name, text) for name, text in sources.items()}
    for entry in entries.values():
        _check_launches(entry, kernels)
    return WebGPUModule(kernels, entries)


def _narrow_attrs(attrs: dict) -> dict:
    """``attrs`` with every int64 dtype they name (a ``cast``'s, a ``fused_elementwise`` step's) int32, as the
    values are inside a narrowed kernel."""
    def narrowed(value):
        if value == "int64":
            return "int32"
        if isinstance(value, tuple):
            return tuple(narrowed(v) for v in value)
        return value
    return {k: narrowed(v) if k in ("dtype", "program") else v for k, v in attrs.items()}


def narrow_kernel(spec, dv, target):
    """A kernel whose operands or result are int64 or bool, lowered for int32 storage and GPU-scheduled;
    None for every other kernel (the generic path serves it).  WGSL has no 64-bit integers at all, so int64 values are int32 inside
    the kernel as well (ids, positions and offsets: the device refuses values beyond 32 bits on
    upload); bool values are read from and written to int32 storage through casts that are inlined
    into the kernel (a separate cast would be a bool intermediate buffer, which WGSL cannot store)."""
    from tvm import s_tir, te

    from ...lower import lower
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
    out = lower(spec.op, _narrow_attrs(spec.attrs), logical, narrow(spec.out_type), dv, name="out_logical")
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
