"""What the GPU targets (cuda, vulkan) share: the hand-written SIMT kernels (``kernels.py``: the
flash-style attention, its few-rows form, the register-tiled projection; the attention in every float
type), dlight's schedules for everything else (``dlight.py``), and the few-rows forms of a decode step."""

from __future__ import annotations

from .... import BuildError, DeviceUnavailable
from ...lower import generic_func
from ...plan import FEW_ROWS
from ..base import Target
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

    def kernel(self, spec, dv):
        return (flash_attention(spec, dv, self.tvm_target, narrow_bool=self.narrow_bool, unroll=self.unroll)
                or linear(spec, dv, self.tvm_target))

    def forms(self, spec, dv):
        """The ``FEW_ROWS`` forms, for a decode step's one row per sequence.  A projection that the
        hand-written kernel serves gets dlight's schedule of the generic lowering (the hand kernel's 64- or
        128-row tile would compute mostly clamped rows on N/64 or N/128 workgroups; dlight's 32 x 64 tile
        wastes less); the attention gets ``decode_attention`` (the keys dealt out among a workgroup's
        threads: the flash kernel would walk them all on one thread)."""
        if self.hand_projection(spec):
            return {FEW_ROWS: self.schedule(generic_func(spec.op, spec.attrs, spec.in_types, spec.out_type, dv))}
        attention = decode_attention(spec, dv, self.tvm_target, narrow_bool=self.narrow_bool)
        return {FEW_ROWS: attention} if attention is not None else {}

    def hand_projection(self, spec) -> bool:
        """Whether a hand-written kernel serves the projection ``spec`` (its few-rows form is then dlight's)."""
        return linear_applies(spec, self.tvm_target)

    def schedule(self, func):
        return schedule_func(func, self.tvm_target)


def device_source(executable, kind: str) -> str:
    """The generated device source (``cuda`` C, or ``webgpu`` WGSL) of a compiled executable."""
    module = getattr(executable, "mod", executable)
    for m in module.imports:
        if m.kind == kind:
            return m.inspect_source()
    raise BuildError(f"the compiled module has no {kind} device code (kinds: "
                     f"{', '.join(m.kind for m in module.imports) or 'none'})")
