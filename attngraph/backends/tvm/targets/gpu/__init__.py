"""What the GPU targets (cuda, vulkan) share: the hand-written SIMT kernels (``kernels.py``: the
flash-style attention, its few-rows form, the register-tiled projection; the attention in every float
type), dlight's schedules for everything else (``dlight.py``), and the few-rows forms of a decode step."""

from __future__ import annotations

from .... import BuildError, DeviceUnavailable
from ...lower import generic_func
from ...plan import FEW_ROWS
from ..base import Target
from ..table import KernelTable, Row
from .dlight import schedule_func
from .kernels import decode_attention, flash_attention, linear, linear_applies


class GPUUnavailable(DeviceUnavailable):
    """A GPU build run where its device (GPU, driver, runtime library) is missing or lacks a
    feature or limit its kernels need."""


class GPUTarget(Target):
    """A GPU target: the hand-written kernels where they apply, dlight's schedules elsewhere.
    ``narrow_bool``: bool masks are stored as int32 (WGSL); ``unroll``: the attention's loops unrolled
    (a GPU driver's compiler unrolls them itself; lavapipe's takes 45 s over the unrolled kernel)."""

    narrow_bool = False
    unroll = True

    def schedule(self, func):
        return schedule_func(func, self.tvm_target)


def _few_rows_projection(spec, dv, target):
    """dlight's schedule of the generic lowering: the hand kernel's 64- or 128-row tile would compute mostly
    clamped rows for a decode step's one row per sequence, on N/64 or N/128 workgroups; dlight's 32 x 64 tile
    wastes less."""
    return target.schedule(generic_func(spec.op, spec.attrs, spec.in_types, spec.out_type, dv))


PROJECTIONS = ("matmul", "linear")

#: What every GPU target has (cuda adds its tensor-core kernels in front).
GPU_KERNELS = KernelTable(
    Row("flash attention, SIMT", ("fused_attention",),
        lambda spec, dv, t: flash_attention(spec, dv, t.tvm_target, narrow_bool=t.narrow_bool, unroll=t.unroll)),
    Row("register-tiled projection, SIMT", PROJECTIONS, lambda spec, dv, t: linear(spec, dv, t.tvm_target),
        dtypes=("float32",), guard=lambda spec, t: linear_applies(spec, t.tvm_target)),
    # the few-rows forms, for a decode step's one row per sequence: a projection a hand kernel serves gets
    # dlight's schedule; the attention gets ``decode_attention`` (the keys dealt out among a workgroup's
    # threads: the flash kernel would walk them all on one thread)
    Row("projection, a few rows: dlight", PROJECTIONS, _few_rows_projection,
        guard=lambda spec, t: t.kernels.serves(spec, t, PROJECTIONS), form=FEW_ROWS),
    Row("attention, a few rows: a workgroup a row", ("fused_attention",),
        lambda spec, dv, t: decode_attention(spec, dv, t.tvm_target, narrow_bool=t.narrow_bool), form=FEW_ROWS),
)
GPUTarget.kernels = GPU_KERNELS


def device_source(executable, kind: str) -> str:
    """The generated device source (``cuda`` C, or ``webgpu`` WGSL) of a compiled executable."""
    module = getattr(executable, "mod", executable)
    for m in module.imports:
        if m.kind == kind:
            return m.inspect_source()
    raise BuildError(f"the compiled module has no {kind} device code (kinds: "
                     f"{', '.join(m.kind for m in module.imports) or 'none'})")
