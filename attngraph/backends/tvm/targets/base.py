"""What a compile target is: one object, made once from its name (``family[:option]``), holding how to
compile for it and how to run there.  Each family (``cpu``, ``cuda``, ``vulkan``) subclasses it in its
own folder; the build, the cache, the artifact and the executor serve every target through it alone."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from ... import BuildError
from ....passes import optimize
from ....passes.layout import read_merged_qkv
from .table import KernelTable

#: Why a target cannot compile where TVM's compiler library is not loaded.
RUNTIME_ONLY = "TVM's compiler is not loaded (TVM_USE_RUNTIME_LIB=1): built artifacts run, nothing compiles"


@functools.lru_cache(maxsize=1)
def compiler_loaded() -> bool:
    """Whether TVM's compiler (its LLVM) is loaded: not with ``TVM_USE_RUNTIME_LIB=1``."""
    try:
        import tvm
        tvm.target.codegen.llvm_get_system_cpu()
        return True
    except Exception:  # noqa: BLE001 - AttributeError or a missing global function, by TVM version
        return False


def portable_host():
    """The host code of the GPU targets (argument checks and kernel launches): generic code for this
    machine's architecture, so a GPU artifact runs on a server whose CPU lacks this one's vector
    instruction sets (an AVX-512 build machine, an AVX2 GPU server)."""
    import tvm
    return tvm.target.Target("llvm")


class Target:
    """One compile target.  The compile side: ``tvm_target``, ``kernel`` (the hand-written kernel of a
    kernel spec, from the family's kernel table, or None), ``forms`` (other forms built beside a kernel:
    in place, a few rows, one row), ``schedule`` (the generic schedule of a lowered kernel),
    ``compile`` and ``layout_passes`` (the graph rewrites its kernels read, run by the pass manager).
    The run side: ``open_device``, ``check_manifest``, ``availability``, ``describe``."""

    family = ""
    #: the kernel library's file name inside an artifact and the compile cache
    library_name = "kernels.so"
    #: a file the compile writes beside the library with the generated device source, or None
    source_file: str | None = None
    #: every file the compile writes beside the library, which an artifact keeps with it
    companion_files: tuple = ()
    #: the language of the device code it generates (``--dump-source``), or None
    device_code: str | None = None
    #: devices other than the default that can run this target's builds (``--device``), name -> what it is
    devices: dict = {}
    #: the half-precision types a model may be built in (``compile(dtype=)``), and why not the others
    half_dtypes: tuple = ("float16", "bfloat16")
    half_dtypes_note: str = ""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<target {self.name}>"

    # -- compiling ------------------------------------------------------------------------------

    @functools.cached_property
    def tvm_target(self):
        """The TVM target its kernels compile for (made once)."""
        return self.make_tvm_target()

    def make_tvm_target(self):
        raise NotImplementedError

    #: the hand-written kernels (``table.KernelTable``: a row per kernel); the generic lowering with
    #: ``schedule`` serves every kernel no row takes
    kernels = KernelTable()

    @property
    def kernel_context(self):
        """What the kernel table's builds read besides the kernel: the target itself by default."""
        return self

    def cache_key(self) -> str:
        """What besides its kernels decides this target's compiled module (the compile cache's key): the TVM target."""
        return str(self.tvm_target)

    def kernel(self, spec, dv):
        """The hand-written kernel for ``spec`` (a scheduled PrimFunc), or None: the generic lowering
        with ``schedule`` serves it."""
        return self.kernels.kernel(spec, dv, self.kernel_context)

    def forms(self, spec, dv) -> dict:
        """{suffix: PrimFunc}: other forms of ``spec``'s kernel built beside it (``plan.IN_PLACE``,
        ``plan.FEW_ROWS``, ``plan.ONE_ROW``), called by the executor where they apply."""
        return self.kernels.forms(spec, dv, self.kernel_context)

    def schedule(self, func):
        """``func`` (a generic lowering, ``te.create_prim_func``) scheduled for this target."""
        raise NotImplementedError

    def compile(self, mod):
        """The compiled module of ``mod``'s scheduled PrimFuncs: an object with ``export_library(path)``."""
        import tvm
        return tvm.compile(mod, target=self.tvm_target)

    def layout_passes(self, weight_dtype: str | None = None, quantize: str | None = None) -> dict[str, Callable]:
        """The graph rewrites this target's kernels read, by name, in order (run by the pass manager after
        the optimization level's passes: reported, ``--verify-each``, ``--print-after``).  Every target's
        attention reads q, k and v in place in a merged projection."""
        if weight_dtype not in (None, "float32"):
            raise BuildError(f"weights stored as {weight_dtype} are supported on the llvm target only, not "
                             f"{self.name!r}")
        if quantize is not None:
            raise BuildError(f"quantize {quantize}: quantized projections are built for the llvm target only, not "
                             f"{self.name!r}")
        return {"read-merged-qkv": read_merged_qkv}

    def layout(self, g, weight_dtype: str | None = None, quantize: str | None = None, **options):
        """``g`` in the layouts this target's kernels read: its ``layout_passes`` run by the pass manager
        (``options``: ``verify_each``, ``print_after``, ``disable``)."""
        graph, _ = optimize(g, 0, layout=self.layout_passes(weight_dtype, quantize), **options)
        return graph

    # -- running --------------------------------------------------------------------------------

    def open_device(self, path: str | None, device: str | None = None):
        """The executor ``Device`` running the kernel library at ``path`` (None: no kernels);
        ``DeviceUnavailable`` where it cannot run here.  ``device``: one of ``devices``, or None."""
        raise NotImplementedError

    def check_device(self, device: str | None) -> None:
        if device is not None and device not in self.devices:
            offered = ", ".join(self.devices) or "none but its own"
            raise BuildError(f"device {device!r} cannot run {self.name} builds (devices for {self.name}: {offered})")

    def check_manifest(self, manifest: dict, path: str) -> None:
        """Refuse (``ArtifactError``) an artifact of this target that this machine must not run."""

    def availability(self) -> tuple:
        """(why it cannot compile here or None, why its builds cannot run here or None, a note)."""
        return None, None, ""

    def describe(self) -> dict:
        """What the manifest records about how this target builds (CPU model, architecture, code path)."""
        return {}

    def device_source(self, directory: str, manifest: dict) -> str:
        """The generated device source of the artifact in ``directory`` (``--dump-source``)."""
        if self.source_file is None:
            raise BuildError(f"the {self.name} target keeps no device source")
        with open(os.path.join(directory, self.source_file)) as f:
            return f.read()
