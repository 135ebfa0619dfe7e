"""CUDA builds run on the CPU, where no GPU is: the executor's ``Device`` for a cuda build that runs
the CUDA C++ source TVM generated, compiled with g++ against ``cuda_emu.h`` (each block's threads
are fibers on one OS thread, ``__syncthreads`` a barrier, warp shuffles an exchange among a warp's 32 threads,
``__shared__`` arrays statics: blocks run one at a time), and launches each kernel with the grid,
block and arguments that TVM's host code computes (read from the host functions TVM's pipeline
makes, before they are lowered to the packed-function ABI).  Every buffer a kernel gets is a copy
that ends where an inaccessible page begins (at every second launch of a kernel: that begins where one
ends, and the block's threads run in the reverse order, so that a missing barrier shows whichever thread
should have waited): a read or write past its end (or before its start), which a GPU reports as an illegal memory
access (and which NumPy's heap, or a WGSL driver's robust buffer access, would let pass), stops the
process with the kernel's name.

What it checks: that the kernels' CUDA source, as TVM emits it for the cuda target (unrolled loops,
four-wide vector loads, warp reductions), computes what the graph says.  What it cannot: NVRTC's or
ptxas' code, the GPU's memory model beyond what a correct kernel relies on, speed."""

from __future__ import annotations

import collections
import ctypes
import functools
import hashlib
import mmap
import os
import re
import subprocess
import tempfile

import numpy as np

HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu.h")
_PROTOTYPE = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(([^)]*)\);')


def compile_with_hosts(mod, tgt) -> tuple:
    """``tvm.compile(mod, target=tgt)``, and the host side of each function of ``mod`` as TVM's
    lowering pipeline split it from the device code (by name: ``Bind``s of the values the kernels need
    and ``call_ffi_kernel`` launches), taken from the same compile just before its MakePackedAPI pass."""
    import tvm
    from tvm import tirx
    captured = {}
    original = tirx.transform.MakePackedAPI  # the pipeline looks the pass up when it runs

    @tvm.transform.module_pass(opt_level=0)
    def capture_then_pack(m, _ctx):
        captured["mod"] = m
        return original()(m)

    tirx.transform.MakePackedAPI = lambda: capture_then_pack
    try:
        executable = tvm.compile(mod, target=tgt)
    finally:
        tirx.transform.MakePackedAPI = original
    return executable, {gv.name_hint: f for gv, f in captured["mod"].functions.items()
                        if "tirx.kernel_launch_params" not in (f.attrs or {})}


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


class CudaEmulator:
    """A ``Device`` running cuda kernels here: those of a cuda build of graph ``g`` (as ``for_target``
    left it), or the PrimFuncs ``funcs`` (by name) compiled for TVM target ``tvm_target``."""

    name = "cuda-emu"

    def __init__(self, g=None, target: str = "cuda:sm_90", workdir: str | None = None, edit=None, *,
                 funcs: dict | None = None, tvm_target=None):
        """``edit``: a function applied to the CUDA source first (a test breaks a kernel with it)."""
        import tvm

        from attngraph.backends.tvm.build import lower_kernels
        from attngraph.backends.tvm.gpu import cuda_source
        from attngraph.backends.tvm.targets import get_target
        if funcs is None:
            funcs, _ = lower_kernels(g, target)
        tgt = tvm_target if tvm_target is not None else get_target(target).make_target()
        executable, self.hosts = compile_with_hosts(tvm.IRModule(funcs), tgt)
        self.source = cuda_source(executable)
        if edit is not None:
            self.source = edit(self.source)
        self.lib, self.signatures = emulation_library(self.source, workdir or tempfile.mkdtemp(prefix="cuda-emu-"))
        self.launches = collections.Counter()  # kernel name -> launches

    # -- the Device protocol: NumPy arrays stand for device memory
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
        """Run host function ``name`` on ``args`` (arrays, then ints): its ``Bind``s evaluated, each
        kernel it launches run on the emulator."""
        from tvm.tirx.buffer import BufferType
        f = self.hosts[name]
        env = {}
        for param, arg in zip(f.params, args):
            env[param] = arg
            if isinstance(param.ty, BufferType):  # a tensor: its shape's symbols take the array's sizes
                for dim, size in zip(param.ty.shape, arg.shape):
                    if not _is_const(dim):
                        env[dim] = int(size)
        self._run(f.body, env)

    def _run(self, stmt, env):
        from tvm import tirx
        if isinstance(stmt, tirx.SeqStmt):
            for s in stmt.seq:
                self._run(s, env)
        elif isinstance(stmt, tirx.Bind):
            env[stmt.var] = _evaluate(stmt.value, env)
        elif isinstance(stmt, tirx.DeclBuffer):  # a flat view of a tensor param: the same array
            offset = stmt.buffer.ty.elem_offset
            assert offset is None or _is_const(offset) and offset.value == 0, f"cuda_emu: {stmt}"
            env[stmt.buffer] = _evaluate(stmt.data, env)
        elif isinstance(stmt, tirx.AllocBuffer):  # a global workspace between two kernels
            ty = stmt.buffer.ty
            env[stmt.buffer] = np.empty([int(_evaluate(d, env)) for d in ty.shape], str(ty.dtype))
        elif isinstance(stmt, tirx.AttrStmt):
            self._run(stmt.body, env)
        elif isinstance(stmt, tirx.IfThenElse):
            branch = stmt.then_case if _evaluate(stmt.condition, env) else stmt.else_case
            if branch is not None:
                self._run(branch, env)
        elif isinstance(stmt, tirx.Evaluate) and "call_ffi_kernel" in str(getattr(stmt.value, "op", "")):
            self._launch(stmt.value, env)
        else:
            raise NotImplementedError(f"cuda_emu: host statement {type(stmt).__name__}: {stmt}")

    def _launch(self, call, env):
        name = str(call.args[0].value)
        params = self.signatures[name]
        values = [_evaluate(a, env) for a in call.args[1:]]
        args, extents = values[:len(params)], values[len(params):]
        tags = [str(t) for t in call.attrs.launch_params]
        if len(tags) != len(extents) or any(t.startswith("tirx.use_dyn_shared_memory") for t in tags):
            raise NotImplementedError(f"cuda_emu: launch parameters {tags} of {name}")
        grid, block = [1, 1, 1], [1, 1, 1]
        for tag, value in zip(tags, extents):
            kind, _, axis = tag.partition(".")
            (grid if kind == "blockIdx" else block)["xyz".index(axis)] = int(value)
        arrays = [a for a, (_, pointer) in zip(args, params) if pointer]
        ints = [int(a) for a, (_, pointer) in zip(args, params) if not pointer]
        # At every second launch of a kernel: guard pages before the buffers (else after them), and the
        # threads of a block run last one first (else first one first).
        odd = self.launches[name] % 2
        self.lib.emu_set_order(odd)
        launch(self.lib, name, grid, block, arrays, ints, guard="start" if odd else "end")
        self.launches[name] += 1


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
            raise OSError(ctypes.get_errno(), "cuda_emu: mmap failed")
        _LIBC.mprotect(base, page, 0)  # the guard pages
        _LIBC.mprotect(base + page + span, page, 0)
        at = base + page + (span - padded if where == "end" else 0)
        buffer = (ctypes.c_uint8 * size).from_address(at)
        copy = np.frombuffer(buffer, np.uint8).view(a.dtype).reshape(a.shape) if size else np.empty_like(a)
        copy[...] = a
        shared[(start, size, a.dtype.str, a.shape)] = (copy, (base, span + 2 * page))
        out.append(shared[(start, size, a.dtype.str, a.shape)])
    return out


def _is_const(expr) -> bool:
    from tvm import tirx
    return isinstance(expr, (tirx.IntImm, tirx.FloatImm))


@functools.cache
def _binary_ops() -> dict:
    """TIR's binary expression types and their values on Python ints and floats (C's truncating
    ``Div``/``Mod`` on ints; ``FloorDiv``/``FloorMod`` as Python's)."""
    from tvm import tirx
    return {tirx.Add: lambda a, b: a + b, tirx.Sub: lambda a, b: a - b, tirx.Mul: lambda a, b: a * b,
            tirx.FloorDiv: lambda a, b: a // b, tirx.FloorMod: lambda a, b: a % b,
            tirx.Div: lambda a, b: int(a / b) if isinstance(a, int) and isinstance(b, int) else a / b,
            tirx.Mod: lambda a, b: a - b * int(a / b), tirx.Min: min, tirx.Max: max,
            tirx.LT: lambda a, b: a < b, tirx.LE: lambda a, b: a <= b, tirx.GT: lambda a, b: a > b,
            tirx.GE: lambda a, b: a >= b, tirx.EQ: lambda a, b: a == b, tirx.NE: lambda a, b: a != b,
            tirx.And: lambda a, b: a and b, tirx.Or: lambda a, b: a or b}


def _evaluate(e, env):
    """A host-side TIR expression's value: Python ints and floats, or the array a handle stands for."""
    from tvm import tirx
    if isinstance(e, (tirx.IntImm, tirx.FloatImm)):
        return e.value
    if isinstance(e, tirx.Var):
        return env[e]
    if isinstance(e, tirx.Cast):
        v = _evaluate(e.value, env)
        return int(v) if "int" in str(e.ty) else float(v)
    fn = _binary_ops().get(type(e))
    if fn is not None:
        return fn(_evaluate(e.a, env), _evaluate(e.b, env))
    if isinstance(e, tirx.Not):
        return not _evaluate(e.a, env)
    if getattr(getattr(e, "op", None), "name", None) == "tirx.buffer_data":  # a tensor param's pointer
        return env[e.args[0]]
    if isinstance(e, tirx.Select):
        return _evaluate(e.true_value if _evaluate(e.condition, env) else e.false_value, env)
    raise NotImplementedError(f"cuda_emu: host expression {type(e).__name__}: {e}")
