"""Host programs as data: what TVM's host code does around a GPU kernel library (the dims it reads off
the arguments, the values it computes from them, the workspaces it allocates, every kernel launch with
its grid, block and scalar arguments), taken from the same compile as the kernels and stored as JSON.

The vulkan target's wgpu device runs its WGSL shaders by these tables (TVM has no WebGPU runtime), and
the CUDA source emulator runs a cuda build's kernels by them, so one evaluator serves both:
``capture`` reads them from a compile (the IR right after ``tirx.SplitHostDevice``), ``run`` executes
one entry on a device's tensors, calling back the device for each workspace and each launch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ... import BuildError

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
    raise BuildError(f"cannot store the launch expression {expr} ({kind}) in a launch table")


def _truncdiv(a: int, b: int) -> int:
    """TIR's ``Div`` on integers: truncates toward zero (C's), not toward minus infinity (Python's)."""
    return int(a / b) if (a < 0) != (b < 0) else a // b


_OPERATORS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "//": lambda a, b: a // b,
              "%": lambda a, b: a % b, "/": _truncdiv, "mod": lambda a, b: a - b * _truncdiv(a, b), "min": min,
              "max": max}


def evaluate(tree, env: dict) -> int:
    """The value of a tree from ``expr_to_json`` with the names bound in ``env``."""
    if isinstance(tree, int):
        return tree
    if isinstance(tree, str):
        try:
            return env[tree]
        except KeyError:
            raise RuntimeError(f"launch table: no value for {tree!r} (known: {', '.join(sorted(env))})") from None
    fn = _OPERATORS.get(tree[0])
    if fn is None:
        raise RuntimeError(f"launch table: unknown operator {tree[0]!r}")
    return fn(evaluate(tree[1], env), evaluate(tree[2], env))


@dataclass
class Launch:
    """One launch of a kernel by an entry function."""
    kernel: str
    buffers: list  # the entry's buffer names, in the kernel's parameter order
    pods: list  # expression trees: the kernel's scalar parameters, after its buffers
    grid: list  # [x, y, z] blocks (workgroups) as expression trees
    block: list  # [x, y, z] threads (static)


@dataclass
class Entry:
    """A PrimFunc as the host program runs it."""
    name: str
    params: list  # [{"name", "kind": "buffer"|"scalar", "dtype", "shape": [tree]}] in call order
    allocs: list  # [{"name", "dtype", "shape": [tree]}]: intermediate buffers the entry needs
    lets: list  # [[name, tree]] evaluated in order before the launches
    launches: list = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "Entry":
        return cls(**{**obj, "launches": [Launch(**launch) for launch in obj["launches"]]})


def _walk(node, cls, fn) -> None:
    import tvm_ffi

    def visit(n):
        fn(n)
        return True
    tvm_ffi.structural_walk(node, (cls, visit), order="pre")


#: the launch parameter of a kernel's dynamic shared memory (bytes), and the most a launch may ask: sm_90's
#: 227 KiB per block, what the CUDA emulator gives every block (``emu.h``: EMU_DYN_SHMEM_BYTES)
DYNAMIC_SHARED = "tirx.use_dyn_shared_memory"
MAX_DYNAMIC_SHARED = 227 * 1024


def _is_buffer(arg) -> bool:
    return getattr(getattr(arg, "op", None), "name", "") == "tirx.buffer_data"


def _entry(name: str, func) -> Entry:
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
        tags = [str(t) for t in call.attrs.launch_params]
        args, extents = list(call.args[1:len(call.args) - len(tags)]), list(call.args[len(call.args) - len(tags):])
        nbuf = sum(map(_is_buffer, args))
        if not all(map(_is_buffer, args[:nbuf])):
            raise BuildError(f"kernel {kname}: its buffer arguments do not all come before its scalars")
        buffers = [a.args[0].name for a in args[:nbuf]]
        unknown = [b for b in buffers if b not in known]
        if unknown:
            raise BuildError(f"kernel {kname} reads buffers {unknown} that {name} neither takes nor allocates "
                             f"(buffer names must be unique within a PrimFunc)")
        values = dict(zip(tags, extents))
        if any(t not in ("blockIdx.x", "blockIdx.y", "blockIdx.z", "threadIdx.x", "threadIdx.y", "threadIdx.z",
                         DYNAMIC_SHARED) for t in tags):
            raise BuildError(f"kernel {kname}: launch parameters {tags} are not supported")
        shared = values.get(DYNAMIC_SHARED)
        if shared is not None and not (isinstance(shared, tirx.IntImm) and shared.value <= MAX_DYNAMIC_SHARED):
            raise BuildError(f"kernel {kname}: dynamic shared memory of {shared} bytes; the launches hold up to "
                             f"{MAX_DYNAMIC_SHARED} (sm_90's most per block), a static size")
        grid = [expr_to_json(values.get(t, 1)) for t in ("blockIdx.x", "blockIdx.y", "blockIdx.z")]
        block = [values.get(t, 1) for t in ("threadIdx.x", "threadIdx.y", "threadIdx.z")]
        if not all(isinstance(b, int) or isinstance(b, tirx.IntImm) for b in block):
            raise BuildError(f"kernel {kname}: a block size that is not static ({block})")
        block = [int(b.value) if isinstance(b, tirx.IntImm) else b for b in block]
        entry.launches.append(Launch(kname, buffers, [expr_to_json(e) for e in args[nbuf:]], grid, block))
    if not entry.launches:
        raise BuildError(f"{name} compiled without a device kernel (unscheduled for GPU?)")
    return entry


def capture(mod, target) -> tuple:
    """``tvm.compile(mod, target=target)`` and, from that same compile, each function's host program:
    (executable, {function name: Entry}).  (Options change the kernels: the tables must come from
    the compile that made the kernels.)"""
    import tvm
    from tvm import tirx
    captured = {}

    @tvm.instrument.pass_instrument
    class CaptureSplit:
        def run_after_pass(self, m, info):
            if info.name == "tirx.SplitHostDevice":
                captured["mod"] = m

    with tvm.transform.PassContext(instruments=[CaptureSplit()]):
        executable = tvm.compile(mod, target=target)
    split = captured["mod"]
    entries = {}
    for gv, f in split.functions_items():
        if isinstance(f, tirx.PrimFunc) and "tirx.is_global_func" not in (f.attrs or {}):
            name = str(f.attrs["global_symbol"]) if f.attrs and "global_symbol" in f.attrs else gv.name_hint
            entries[name] = _entry(name, f)
    return executable, entries


def run(entry: Entry, args: list, *, allocate: Callable, launch: Callable, same_dtype: Callable = None) -> None:
    """Execute ``entry`` on ``args`` (tensors with ``shape`` and ``dtype`` for its buffers, ints for its
    scalars): bind the dims, evaluate its values, get each workspace from ``allocate(name, shape, dtype)``,
    and for each launch call ``launch(launch, grid, block, buffers, pods)`` with the grid, the block,
    the tensors and the scalar values.  ``same_dtype(arg dtype, param dtype)``: whether a tensor's dtype
    fits a parameter (default: equal)."""
    same_dtype = same_dtype or (lambda a, b: str(a) == str(b))
    if len(args) != len(entry.params):
        raise TypeError(f"{entry.name} takes {len(entry.params)} arguments, got {len(args)}")
    env, bound = {}, {}
    for p, arg in zip(entry.params, args):
        if p["kind"] == "scalar":
            env[p["name"]] = int(arg)
            continue
        if not hasattr(arg, "shape"):
            raise TypeError(f"{entry.name}: argument {p['name']} must be a tensor, got {type(arg).__name__}")
        if len(arg.shape) != len(p["shape"]):
            raise ValueError(f"{entry.name}: argument {p['name']} has rank {len(arg.shape)}, expected {len(p['shape'])}")
        if not same_dtype(arg.dtype, p["dtype"]):
            raise TypeError(f"{entry.name}: argument {p['name']} has dtype {arg.dtype}, expected {p['dtype']}")
        for d, size in zip(p["shape"], arg.shape):
            if isinstance(d, str):
                env.setdefault(d, int(size))
        bound[p["name"]] = arg
    for p in entry.params:  # compound dims (b*s, s+1) are checked once every dim is known
        if p["kind"] == "buffer":
            want = tuple(evaluate(d, env) for d in p["shape"])
            if want != tuple(bound[p["name"]].shape):
                raise ValueError(f"{entry.name}: argument {p['name']} has shape {tuple(bound[p['name']].shape)}, "
                                 f"expected {want} (dims {env})")
    for var, tree in entry.lets:
        env[var] = evaluate(tree, env)
    for alloc in entry.allocs:
        bound[alloc["name"]] = allocate(alloc["name"], tuple(evaluate(d, env) for d in alloc["shape"]), alloc["dtype"])
    for item in entry.launches:
        launch(item, [evaluate(g, env) for g in item.grid], list(item.block), [bound[b] for b in item.buffers],
               [evaluate(p, env) for p in item.pods])
