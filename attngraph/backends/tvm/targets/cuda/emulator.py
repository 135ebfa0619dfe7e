"""CUDA builds run on the CPU, where no GPU is: the executor's ``Device`` for a cuda build that runs
the CUDA C++ source TVM generated, compiled with g++ against ``emu.h`` (each block's threads
are fibers on one OS thread, ``__syncthreads`` a barrier, warp shuffles an exchange among a warp's 32 threads,
``__shared__`` arrays statics: blocks run one at a time), and launches each kernel with the grid,
block and arguments that TVM's host code computes (the build's host programs, ``runtime.host_program``,
as the vulkan target runs its shaders by).  Every buffer a kernel gets is a copy
that ends where an inaccessible page begins (at every second launch of a kernel: that begins where one
ends, and the block's threads run in the reverse order, so that a missing barrier shows whichever thread
should have waited): a read or write past its end (or before its start), which a GPU reports as an illegal memory
access (and which NumPy's heap, or a WGSL driver's robust buffer access, would let pass), stops the
process with the kernel's name.

What it checks: that the kernels' CUDA source, as TVM emits it for the cuda target (unrolled loops,
four-wide vector loads, warp reductions, tensor cores through ``nvcuda::wmma`` and through inline PTX
``mma.sync`` and ``ldmatrix``, each statement of which is rewritten into a call of ``emu.h``'s warp-collective
``emu_mma_m16n8k16`` or ``emu_ldmatrix`` in the PTX ISA's fragment layouts; any other inline PTX is refused by
name), computes what the graph says.  What it cannot: NVRTC's or
ptxas' code, the GPU's memory model beyond what a correct kernel relies on, speed."""

from __future__ import annotations

import collections
import ctypes
import hashlib
import json
import mmap
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np

from .... import DeviceUnavailable
from ...runtime import host_program
from ...runtime.host_program import Entry

HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "emu.h")
_PROTOTYPE = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\);')


def emulation_library(cuda_source: str, workdir: str) -> tuple[ctypes.CDLL, dict]:
    """``cuda_source`` compiled for this CPU with a launcher ``emu_NAME`` per kernel; and each
    kernel's parameters as (C type, is pointer)."""
    signatures = {}
    for name, params in _PROTOTYPE.findall(cuda_source):
        parsed = []
        for p in params.split(","):
            words = p.replace("__restrict__", "").split()
            ctype = " ".join(words[:-1])
            parsed.append((ctype, ctype.endswith("*")))
        signatures[name] = parsed
    body = cuda_source[cuda_source.index('extern "C"'):]  # the header replaces TVM's CUDA preamble
    body = re.sub(r"__shared__\s+alignas\((\d+)\)", r"alignas(\1) static", body)
    body = re.sub(r"extern __shared__ __align__\((\d+)\) (\w+) (\w+)\[\];",
                  r"alignas(\1) static \2 \3[EMU_DYN_SHMEM_BYTES / sizeof(\2)];", body)
    body = _ptx_calls(body)
    launchers = []
    for name, params in signatures.items():
        args, n_ptr, n_int = [], 0, 0
        for ctype, pointer in params:
            if pointer:
                args.append(f"({ctype})ptrs[{n_ptr}]")
                n_ptr += 1
            else:
                args.append(f"({ctype})ints[{n_int}]")
                n_int += 1
        launchers.append(f'extern "C" void emu_{name}(const unsigned* g, const unsigned* b, void** ptrs, '
                         f"const long long* ints) {{\n  emu_run_grid(\"{name}\", dim3{{g[0], g[1], g[2]}}, "
                         f"dim3{{b[0], b[1], b[2]}}, [&] {{ {name}({', '.join(args)}); }});\n}}\n")
    text = f'#include "{HEADER}"\n' + body + "\n" + "".join(launchers)
    key = hashlib.sha256((text + open(HEADER).read()).encode()).hexdigest()[:16]
    src, lib = os.path.join(workdir, f"emu_{key}.cpp"), os.path.join(workdir, f"emu_{key}.so")
    if not os.path.exists(lib):
        with open(src, "w") as f:
            f.write(text)
        subprocess.run(["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-w", "-o", lib, src],
                       check=True, capture_output=True, text=True)
    return ctypes.CDLL(lib), signatures


_ASM = re.compile(r'__asm__ __volatile__\(\s*"([^"]*)"\s*"[^"]*"\s*:(.*?)\);', re.S)
_MMA = re.compile(r"mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.(f16|bf16)\.\1\.f32$")
_LDMATRIX = re.compile(r"ldmatrix\.sync\.aligned\.m8n8\.x([124])(\.trans)?\.shared\.b16$")
#: TVM's codegen takes a shared-memory address for PTX as a 32-bit offset; the emulator keeps the pointer
_SHARED_ADDRESS = re.compile(r"unsigned int (\w+) = __cvta_generic_to_shared\(")
_OPERAND = re.compile(r'\s*"=?[a-z]"\((.*)\)\s*$', re.S)


def _split_top(text: str, sep: str) -> list:
    """``text`` split at each ``sep`` outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _ptx_calls(body: str) -> str:
    """``body`` with each inline PTX ``mma.sync`` and ``ldmatrix`` statement (as TVM's codegen writes them)
    replaced by a call of ``emu.h``'s ``emu_mma_m16n8k16`` or ``emu_ldmatrix``; any other inline PTX is refused,
    naming the instruction."""
    def call(m):
        instruction = m.group(1).strip()
        outs, ins = (_split_top(part, ",") for part in _split_top(m.group(2), ":"))
        outs, ins = ([_OPERAND.match(o).group(1) for o in group] for group in (outs, ins))
        load = _LDMATRIX.match(instruction)
        if load is not None:
            n, trans = int(load.group(1)), "true" if load.group(2) else "false"
            return (f"{{ unsigned emu_r[{n}]; emu_ldmatrix<{n}, {trans}>(emu_r, {ins[0]}); "
                    + " ".join(f"{o} = emu_r[{i}];" for i, o in enumerate(outs)) + " }")
        kind = _MMA.match(instruction)
        if kind is None:
            raise DeviceUnavailable(f"the CUDA emulator does not implement the PTX instruction {instruction!r}")
        element = "nv_bfloat16" if kind.group(1) == "bf16" else "half"
        return (f"{{ const unsigned emu_a[4] = {{{', '.join(ins[:4])}}}; const unsigned emu_b[2] = {{{', '.join(ins[4:6])}}}; "
                f"const float emu_c[4] = {{{', '.join(ins[6:10])}}}; float emu_d[4]; "
                f"emu_mma_m16n8k16<{element}>(emu_d, emu_a, emu_b, emu_c); "
                + " ".join(f"{o} = emu_d[{i}];" for i, o in enumerate(outs)) + " }")
    return _ASM.sub(call, _SHARED_ADDRESS.sub(r"const void* \1 = (const void*)(", body))


class CudaEmulator:
    """A ``Device`` running a cuda build's kernels on this CPU: the build's CUDA source (``source``) and
    host programs (``hosts``: {function: ``host_program.Entry``}); NumPy arrays stand for device memory.
    ``launches`` counts each kernel's launches."""

    name = "cuda-emulator"

    def __init__(self, source: str, hosts: dict, workdir: str | None = None, edit=None):
        """``edit``: a function applied to the CUDA source first (a test breaks a kernel with it)."""
        if shutil.which("g++") is None:
            raise DeviceUnavailable("the CUDA source emulator compiles the build's CUDA C with g++, which is not "
                                    "installed (Debian: apt-get install g++)")
        self.source = edit(source) if edit is not None else source
        self.hosts = dict(hosts)
        self.lib, self.signatures = emulation_library(self.source, workdir or _workdir())
        self.launches = collections.Counter()  # kernel name -> launches

    @classmethod
    def from_files(cls, source_path: str, launches_path: str, **kwargs) -> "CudaEmulator":
        """The emulator of a cuda build from its source and its host programs (``kernels.cu``,
        ``kernels.launch.json``: beside its library, in its artifact)."""
        try:
            with open(source_path) as f:
                source = f.read()
            with open(launches_path) as f:
                hosts = {name: Entry.from_json(e) for name, e in json.load(f).items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DeviceUnavailable(f"cannot emulate this build: it needs {source_path} and {launches_path} "
                                    f"({type(e).__name__}: {e}); rebuild it with attngraph build --target cuda") from None
        return cls(source, hosts, **kwargs)

    @classmethod
    def from_funcs(cls, funcs: dict, target="cuda:sm_90", **kwargs) -> "CudaEmulator":
        """The emulator of PrimFuncs ``funcs`` (by name) compiled for ``target`` (a name or a ``Target``)."""
        import tvm

        from .. import get_target
        library = get_target(target).compile(tvm.IRModule(funcs))
        return cls(library.source, library.hosts, **kwargs)

    # -- the Device protocol
    def allocate(self, nbytes):
        return np.empty(max(int(nbytes), 1), np.uint8)

    def view(self, base, shape, dtype):
        count = int(np.prod(shape, dtype=np.int64))
        return base.reshape(-1).view(np.uint8)[:count * np.dtype(dtype).itemsize].view(dtype).reshape(shape)

    def upload(self, array):
        return np.array(array, order="C", copy=True)

    def download(self, tensor):
        return np.array(tensor, copy=True)

    def has_kernel(self, name):
        return name in self.hosts

    def synchronize(self):
        pass

    def call(self, name, args):
        """Run host program ``name`` on ``args`` (arrays, then ints): each kernel it launches on the emulator."""
        host_program.run(self.hosts[name], args, allocate=lambda _, shape, dtype: np.empty(shape, dtype),
                         launch=self._launch)

    def _launch(self, item, grid, block, arrays, pods):
        params = self.signatures[item.kernel]
        if [p for _, p in params] != [True] * len(arrays) + [False] * len(pods):
            raise RuntimeError(f"cuda emulator: kernel {item.kernel} takes {params}, launched with {len(arrays)} "
                               f"buffers and {len(pods)} scalars")
        # At every second launch of a kernel: guard pages before the buffers (else after them), and the
        # threads of a block run last one first (else first one first).
        odd = self.launches[item.kernel] % 2
        self.lib.emu_set_order(odd)
        launch(self.lib, item.kernel, grid, block, list(arrays), [int(v) for v in pods], guard="start" if odd else "end")
        self.launches[item.kernel] += 1


def _workdir() -> str:
    """Where compiled emulation libraries are kept (under the compile cache; a temporary folder without it)."""
    from ...cache import cache_root
    root = cache_root()
    if root is None:
        return tempfile.mkdtemp(prefix="cuda-emu-")
    path = os.path.join(root, "emulator")
    os.makedirs(path, exist_ok=True)
    return path


def launch(lib, name: str, grid, block, arrays: list, ints=(), guard: str | None = "end") -> None:
    """Run kernel ``name`` of emulation library ``lib`` on ``arrays`` (its pointer parameters, in
    order) and ``ints``.  ``guard="end"``: each array is run from a copy that ends where an inaccessible
    page begins, so a read or write past its end stops the process with the kernel's name (a GPU's
    illegal memory access), where NumPy's heap would have let it pass; ``"start"``: a copy that begins
    where such a page ends (an access before its start)."""
    copies = _guarded(arrays, guard) if guard else [(a, None) for a in arrays]
    try:
        getattr(lib, f"emu_{name}")((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block),
                                    (ctypes.c_void_p * max(len(arrays), 1))(*[c.ctypes.data for c, _ in copies]),
                                    (ctypes.c_longlong * max(len(ints), 1))(*ints))
    finally:
        unmapped = set()
        for (copy, region), array in zip(copies, arrays):
            if region is not None and region not in unmapped:  # one copy back per shared copy
                if array.flags.writeable:
                    array[...] = copy
                _LIBC.munmap(*region)
                unmapped.add(region)


_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_LIBC.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _guarded(arrays: list, where: str = "end") -> list:
    """(copy, mapped region) per array, between two PROT_NONE pages: the copy ends 0-15 bytes before
    the second (``where="end"``; 16: the alignment of a four-wide load) or begins right after the first
    (``"start"``).  Arrays that share memory share a copy (an in-place update writes through one and
    reads through another); arrays that overlap otherwise run unguarded."""
    page = mmap.PAGESIZE
    spans = [(a.__array_interface__["data"][0], a.nbytes) for a in arrays]
    out, shared = [], {}
    for a, (start, size) in zip(arrays, spans):
        if (start, size, a.dtype.str, a.shape) in shared:
            out.append(shared[(start, size, a.dtype.str, a.shape)])
            continue
        if any(s < start + size and start < s + n and (s, n) != (start, size) for s, n in spans):
            out.append((a, None))
            continue
        padded = -(-size // 16) * 16
        span = -(-padded // page) * page
        base = _LIBC.mmap(None, span + 2 * page, 3, 0x22, -1, 0)  # read/write, private and anonymous
        if base in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "cuda emulator: mmap failed")
        _LIBC.mprotect(base, page, 0)  # the guard pages
        _LIBC.mprotect(base + page + span, page, 0)
        at = base + page + (span - padded if where == "end" else 0)
        buffer = (ctypes.c_uint8 * size).from_address(at)
        copy = np.frombuffer(buffer, np.uint8).view(a.dtype).reshape(a.shape) if size else np.empty_like(a)
        copy[...] = a
        shared[(start, size, a.dtype.str, a.shape)] = (copy, (base, span + 2 * page))
        out.append(shared[(start, size, a.dtype.str, a.shape)])
    return out
