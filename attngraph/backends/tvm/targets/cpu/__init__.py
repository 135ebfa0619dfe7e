"""The ``llvm`` family: this CPU (``llvm``) or another CPU model (``llvm:CPU``).

The kernels (``kernels.py``, the table of hand-scheduled kernels; ``attention.py``; ``schedule.py``,
the generic schedule) follow the vector instruction set (``tiles.py``); the layout pass packs the
projection weights in column panels (``layout.py``, over the target's own ops in ``ops.py``);
``half.py`` makes a float16 or bfloat16 kernel of each float32 one; ``isa.py`` says which instruction sets a CPU
has."""

from __future__ import annotations

import dataclasses
import functools

from .... import ArtifactError, BuildError, DeviceUnavailable
from ..base import RUNTIME_ONLY, Target, compiler_loaded
from . import isa, tile_tuning
from .layout import gate_projections, pack_weights
from .tiles import BF16_GROUP, PANEL_WIDTH, cpu_tiles

#: The dtypes projection weights may be stored in (``weight_dtype``); None keeps the graph's.
WEIGHT_DTYPES = ("float32", "float16")
#: What the projections may be quantized to (``quantize``): int8 weights per column, activations per row
QUANTIZE = ("int8",)


class LLVMTarget(Target):
    """The CPU: ``llvm`` builds for this machine's CPU model with its real instruction sets, ``llvm:CPU``
    for CPU model CPU as LLVM names it (``x86-64-v3``: any AVX2 machine, ``x86-64-v4``: AVX-512,
    ``haswell``, ``znver4``, ...): an artifact to deploy elsewhere, refused where this CPU lacks its sets."""

    family = "llvm"

    def __init__(self, cpu: str | None = None, name: str | None = None):
        super().__init__(name or ("llvm" if cpu is None else f"llvm:{cpu}"))
        self.cpu = cpu

    def make_tvm_target(self):
        return isa.llvm_target(self.cpu)

    @functools.cached_property
    def tiles(self):
        """The register tiles: the table's for this instruction set, with those ``attngraph tune-tiles`` measured on
        this CPU over them (for this CPU's builds only)."""
        tiles = cpu_tiles(self.tvm_target)
        return tile_tuning.apply(tiles, tile_tuning.measured()) if self.cpu is None else tiles

    # The kernel table and the schedules import TVM's compiler: when a build asks for them, not when an
    # artifact of this target loads (with TVM's runtime alone).
    @functools.cached_property
    def kernels(self):
        from .kernels import KERNELS
        return KERNELS

    @property
    def kernel_context(self):
        return self.tiles  # the register tiles of this CPU's vector instruction set

    def cache_key(self) -> str:  # the tiles too: ``attngraph tune-tiles`` changes the kernels of later builds
        return f"{super().cache_key()};tiles={self.tiles}"

    # A kernel over float16 or bfloat16 storage is the float32 kernel's twin, retyped (``half.py``), where a row
    # serves only float32; the kernels that move bfloat16 as it is (and the generic schedule) run serially
    # over it (``scalar_bfloat16``).
    def kernel(self, spec, dv):
        from .half import serve
        from .schedule import scalar_bfloat16
        table = super()
        return serve(lambda s: scalar_bfloat16(table.kernel(s, dv)), spec)

    def forms(self, spec, dv):
        from .half import serve_forms
        from .schedule import scalar_bfloat16
        table = super()
        return serve_forms(lambda s: {k: scalar_bfloat16(f) for k, f in table.forms(s, dv).items()}, spec)

    def schedule(self, func):
        from .schedule import scalar_bfloat16, schedule_generic
        return scalar_bfloat16(schedule_generic(func))

    def layout_passes(self, weight_dtype=None, quantize=None):
        if weight_dtype not in (None, *WEIGHT_DTYPES):
            raise BuildError(f"weight dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
        if quantize not in (None, *QUANTIZE):
            raise BuildError(f"quantize {quantize!r}: the llvm target quantizes to {', '.join(QUANTIZE)}")
        if quantize and weight_dtype not in (None, "float32"):
            raise BuildError(f"quantize {quantize} stores the weights quantized: weight dtype {weight_dtype} does not "
                             f"apply")
        dtype = None if weight_dtype == "float32" else weight_dtype
        groups = {"bfloat16": BF16_GROUP} if self.tiles.bf16_dot else {}  # the CPU's dot products' operands
        int8_group = {}
        if self.tiles.int8_dot:
            from .dot import INT8_INSTRUCTIONS  # (TVM's compiler: not needed to load and run an artifact)
            int8_group = {"int8_group": INT8_INSTRUCTIONS[self.tiles.int8_instruction].group}
        passes = {"pack-weights": lambda g: pack_weights(g, PANEL_WIDTH, dtype, groups, quantize, **int8_group),
                  "gate-projections": lambda g: gate_projections(g, PANEL_WIDTH)}
        return {**passes, **super().layout_passes()}

    def open_device(self, path, device=None):
        import tvm

        from ...runtime.device import TVMDevice
        self.check_device(device)
        if self.cpu is not None and compiler_loaded():  # without it, the artifact's manifest was checked when it loaded
            missing = isa.missing_here(self.cpu)
            if missing:
                raise DeviceUnavailable(f"kernels built for CPU {self.cpu} (target llvm:{self.cpu}) use instructions "
                                        f"this CPU lacks: {', '.join(missing)}; build with --target llvm to run them here")
        if compiler_loaded() and self.tiles.amx:  # this process's build (an artifact's manifest says: check_manifest)
            _tile_state()
        return TVMDevice(tvm.runtime.load_module(path) if path else None, tvm.cpu())

    def check_manifest(self, manifest, path):
        info = manifest.get("target_info") or {}
        missing = isa.missing_cpu_features(info if isinstance(info, dict) else {})
        if missing:  # its kernels would stop on an illegal instruction
            raise ArtifactError(f"artifact {path!r} was compiled for CPU {info.get('cpu')!r}, whose instructions "
                                f"{', '.join(missing)} this CPU lacks; rebuild it on this machine "
                                f"(attngraph build MODEL --target llvm -o DIR)")
        tiles = info.get("tiles") if isinstance(info, dict) else None
        if isinstance(tiles, dict) and tiles.get("amx"):
            _tile_state()

    def availability(self):
        if not compiler_loaded():
            whose = "their" if self.cpu is None else f"{self.cpu}'s"
            return RUNTIME_ONLY, None, f"built artifacts run if this CPU has {whose} instruction sets"
        if self.cpu is None:
            info = self.describe()
            model = f"LLVM's {info['cpu']}" + (f" {','.join(info['mattr'])} (per /proc/cpuinfo)" if info["mattr"] else "")
            tuned = " (tiles measured here: attngraph tune-tiles)" if tile_tuning.measured() else ""
            return None, None, (f"this CPU: {isa.summary(info['features'])}; {model}; {info['kernels']} kernels"
                                f"{self._dot_note()}{tuned}")
        missing = isa.missing_here(self.cpu)
        return None, f"this CPU lacks {self.cpu}'s {', '.join(missing)}" if missing else None, \
            f"CPU {self.cpu} ({self.tiles.isa} kernels{self._dot_note()})"

    def _dot_note(self) -> str:
        """The dot-product kernels this CPU's builds take (``tiles``): "" where none."""
        notes = []
        if self.tiles.amx:
            notes.append("bfloat16 projections on AMX tiles (ATTNGRAPH_AMX=1: not yet run on a CPU with AMX)")
        elif self.tiles.bf16_dot:
            notes.append("bfloat16 projections on vdpbf16ps")
        if self.tiles.int8_dot:
            notes.append(f"int8 on {self.tiles.int8_instruction}")
        return "".join(f", {n}" for n in notes)

    def describe(self):
        t = self.tvm_target
        mattr = [str(a) for a in t.attrs.get("mattr", ())]
        return {"cpu": str(t.mcpu), "mattr": mattr, "features": sorted(isa.isa_features(str(t.mcpu), tuple(mattr))),
                "kernels": self.tiles.isa, "tiles": dataclasses.asdict(self.tiles)}


def _tile_state() -> None:
    """AMX kernels run only in a process Linux granted the tile state (``isa.request_amx``)."""
    if not isa.request_amx():
        raise DeviceUnavailable("this process was refused AMX state (arch_prctl ARCH_REQ_XCOMP_PERM: Linux 5.16 or "
                                "later grants it), which the AMX kernels need; build without ATTNGRAPH_AMX=1")


def make_target(option: str | None, name: str) -> LLVMTarget:
    """``llvm``, or ``llvm:CPU``: an unknown CPU name is a ``BuildError``."""
    if option is not None and compiler_loaded():
        import tvm
        if not tvm.target.codegen.llvm_is_valid_cpu(option, tvm.target.codegen.llvm_get_system_triple()):
            raise BuildError(f"unknown CPU {option!r} in target 'llvm:{option}': LLVM names CPUs like x86-64-v3 (any "
                             f"AVX2 machine), x86-64-v4 (AVX-512), haswell, skylake-avx512, znver4; plain 'llvm' "
                             f"builds for this CPU")
    return LLVMTarget(option, name)
