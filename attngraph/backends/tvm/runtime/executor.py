"""The executor: runs a compiled graph's kernel plan over buffers placed by the memory plan.

The plan is a list of steps in execution order: upload an input, make a view (a reshape: the same
bytes with a new shape), or call a kernel by name on its operands' buffers and its result's buffer.
Intermediate values live in a few device buffers that ``passes.plan_memory`` assigns by liveness
(a buffer is reused once every value in it is dead); the buffers persist across calls and grow to
the largest sizes seen.  Parameters, constants and weights-only values (``W*scale``,
``concat(Wq, Wk, Wv)``) are computed once by the reference interpreter when the weights are bound,
and uploaded as constant buffers.

Everything device-specific goes through the ``Device`` protocol (``device.py``): TVM's CPU and CUDA
runtimes, the wgpu device of the vulkan target and the CUDA source emulator run the same plan.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np

from ....inputs import Binder, InputError, bind_dims, is_device_tensor
from ....ir import Graph, Node
from ....ir import ops as O
from ....ir.ops import IndexOutOfRange
from ....passes.memory import VIEW_OPS, MemoryPlan, in_place_candidates, plan_memory, weights_only
from ....weights import check_params
from ... import KernelCallError
from ..plan import FEW_ROWS, FEW_ROWS_MAX, IN_PLACE, ONE_ROW, tile_rows
from ..shapes import scalar_dims
from .bind import bind_constants, precomputed_nodes
from .device import Device, TVMDevice


@functools.cache
def _call_errors() -> tuple:
    """What a kernel call raises when its runtime refuses the arguments: TVM's errors (in TVM's FFI, the
    built-in ``ValueError`` and ``TypeError``; ``tvm.TVMError`` where the installed TVM has it)."""
    errors = [ValueError, TypeError]
    try:
        import tvm
        errors += [e for e in (getattr(tvm, "TVMError", None), getattr(getattr(tvm, "error", None), "TVMError", None))
                   if isinstance(e, type) and issubclass(e, BaseException)]
    except ImportError:
        pass
    return tuple(dict.fromkeys(errors))


def kernel_call_error(graph: Graph, nid: int, kernel: str, error: BaseException) -> KernelCallError:
    """``error``, raised by the runtime calling ``kernel`` for node ``nid``, as a ``KernelCallError`` naming both."""
    what = " ".join(str(error).split()) or type(error).__name__
    return KernelCallError(f"kernel {kernel} failed on {graph.describe(nid)}: {what} (the compiled kernel does not "
                           f"fit the node: a damaged artifact or a compiler bug)")


@dataclass
class KernelTime:
    """One kernel call's median time and its floating-point operations (0 where not counted)."""
    node: str
    op: str
    kernel: str
    seconds: float
    flops: int

    @property
    def gflops(self) -> float:
        return self.flops / self.seconds / 1e9 if self.seconds > 0 else 0.0


def flops(op: str, attrs: dict, in_shapes: list[tuple], out_shape: tuple) -> int:
    """The floating-point work of one call of ``op`` (``OpDef.flops``: contractions and attention; 0 for
    the memory-bound rest)."""
    fn = O.get(op).flops
    return int(fn(attrs, in_shapes, out_shape)) if fn is not None else 0


def _nbytes(ty, dims) -> int:
    return int(np.prod(ty.concrete(dims), dtype=np.int64)) * np.dtype(ty.dtype).itemsize


@dataclass
class Step:
    """One step of the plan: ``kind`` is "input", "view" or "kernel"."""
    kind: str
    node: int
    kernel: str | None = None
    operands: tuple = ()
    scalars: tuple = ()  # dims passed as int arguments after the output


@dataclass
class Frame:
    """The plan's steps at one set of dims, ready to run.  Each kernel call's argument list is built once, with
    the planned buffers' views, the constants and the dim arguments in place; a call fills in only the values it
    gives (its inputs, in-place caches, outputs with memory of their own, and views of these) at the positions
    ``pending`` names, and puts the planned ones back after.  Kept this way, a call's Python between two
    kernels is a loop step: between the kernels of a decode step, which stream the weights through the caches,
    the executor's own work ran at a third of its speed."""
    plan: MemoryPlan
    calls: list  # [(kernel name, arguments, node, check or None)] in order; check(arguments, inputs) before the call
    dynamic: list  # [(kind, node, its Node, operands, shape)]: the steps whose value a call may give
    pending: dict  # node -> [(call, argument position)] where a value the call gives goes
    static: dict  # node -> its tensor where no call gives one (a planned buffer's view, a constant)


class CompiledModel:
    """A compiled graph with its weights bound: call it with NumPy inputs, get NumPy outputs.

    ``model(inputs)`` checks the inputs against the signature (a clear error on a wrong name,
    shape or dtype), runs the plan, and returns the outputs by name.  ``model.memory(**dims)`` is
    the memory plan at those dims; ``model.last_peak_bytes`` the planned peak of the last call.
    One call at a time: the intermediate buffers are shared between calls (not thread-safe)."""

    def __init__(self, graph: Graph, params: Mapping[str, np.ndarray], device: Device, symbol_of: Mapping[int, str],
                 *, target: str = "llvm", variants: Mapping[str, list] | None = None):
        check_params(graph, params)
        if not hasattr(device, "call"):  # a TVM module (or None: nothing to compile)
            device = TVMDevice(device)
        self.graph, self.device, self.target = graph, device, target
        self.symbol_of = dict(symbol_of)
        # kernel -> [(dims, name)]: static variants (tuned at those dims) called instead when a run's dims match
        self.variants = {k: [(dict(d), name) for d, name in v] for k, v in (variants or {}).items()}
        self.params = dict(params)
        self.order = graph.topo_order()
        self._nodes = {nid: graph.node(nid) for nid in self.order}
        self.signature = graph.input_types()
        self._bind = Binder(self.signature)
        self.steps = self._plan_steps()
        self._kernel_nodes = {s.node for s in self.steps if s.kind == "kernel"}
        wanted = {s.kernel for s in self.steps if s.kind == "kernel"}
        wanted |= {name for k in wanted for _, name in self.variants.get(k, ())}
        missing = sorted(k for k in wanted if not device.has_kernel(k))
        if missing:
            raise RuntimeError(f"the compiled module lacks kernels {', '.join(missing)}")
        # update_slice steps that write into their cache input (the caller's tensor) instead of a copy
        candidates = in_place_candidates(graph)
        self.in_place = {s.node for s in self.steps if s.kind == "kernel" and s.node in candidates
                         and device.has_kernel(s.kernel + IN_PLACE)}
        # kernels with a form for few rows (a decode step's), called where the output has at most FEW_ROWS_MAX
        self.few_rows = {s.kernel for s in self.steps if s.kind == "kernel" and device.has_kernel(s.kernel + FEW_ROWS)}
        # ... and for exactly one row
        self.one_row = {s.kernel for s in self.steps if s.kind == "kernel" and device.has_kernel(s.kernel + ONE_ROW)}
        #: how it was built, where known: the ``build.Kernels`` of a compile, the manifest of a loaded
        #: artifact, the model's name, the optimization level and the passes' report, where its weights came from
        self.kernels = self.manifest = self.model_name = self.opt_level = self.report = self.weights_from = None
        self.precomputed = precomputed_nodes(graph, self.order)
        self.constants = {nid: device.upload(v) for nid, v in bind_constants(graph, self.precomputed, self.params).items()}
        self._frames: OrderedDict = OrderedDict()  # dims -> Frame, most recent last
        self._buffers: list = []
        self._buffer_bytes: list[int] = []
        self.last_peak_bytes = 0
        #: outputs computed into memory of their own, never into a planned buffer (``outputs_apart``)
        self.apart: set[int] = set()
        self._call_errors = _call_errors()

    # -- construction -------------------------------------------------------------------------

    def _plan_steps(self) -> list[Step]:
        g = self.graph
        constant = weights_only(g)
        steps = []
        for nid in self.order:
            n = g.node(nid)
            if nid in constant or n.op in ("param", "const"):
                continue
            if n.op == "input":
                steps.append(Step("input", nid))
            elif n.op in VIEW_OPS:
                steps.append(Step("view", nid, operands=tuple(g.operands(nid))))
            elif nid in self.symbol_of:
                types = [g.node(o).type for o in g.operands(nid)] + [n.type]
                steps.append(Step("kernel", nid, self.symbol_of[nid], tuple(g.operands(nid)), scalar_dims(types)))
            else:
                raise RuntimeError(f"no kernel was compiled for {g.describe(n.id)}")
        return steps

    # -- memory -------------------------------------------------------------------------------

    def memory(self, **dims) -> MemoryPlan:
        """The memory plan of a run with these symbolic dims (e.g. ``batch=1, seq=128``)."""
        return plan_memory(self.graph, dims, self.order, self.in_place | self.apart)

    def put(self, array, dtype: str):
        """``array`` on the device as an input of type ``dtype`` (a value to hand to calls, as ``keep`` gives)."""
        from ....ir.types import numpy_dtype
        return self.device.upload(np.asarray(array, dtype=numpy_dtype(dtype)))

    def get(self, tensor) -> np.ndarray:
        """A device tensor of this model's on the host."""
        return self.device.download(tensor)

    def outputs_apart(self, names: Collection[str]) -> None:
        """Compute the outputs ``names`` into memory of their own on every call (the tensors a call's ``into``
        gives, else new ones) and plan no buffer for them: a training step's new parameters and optimizer
        state, kept on the device and written into the previous step's, would otherwise also hold planned
        buffers as large as themselves."""
        by_name = dict(self.graph.outputs)
        unknown = sorted(set(names) - set(by_name))
        if unknown:
            raise KeyError(f"no output {', '.join(unknown)} in {self.graph.name}")
        self.apart = {by_name[n] for n in names if by_name[n] in self.symbol_of and by_name[n] not in self.in_place}
        self._frames.clear()

    def _frame(self, dims: dict) -> Frame:
        """The plan's steps at ``dims``, ready to run (see ``Frame``); reused across calls."""
        key = tuple(sorted(dims.items()))
        if key in self._frames:
            self._frames.move_to_end(key)
            return self._frames[key]
        plan = self.memory(**dims)
        grown = False
        for b, nbytes in enumerate(plan.buffer_bytes):
            if b == len(self._buffers):
                self._buffers.append(None)
                self._buffer_bytes.append(0)
            if self._buffer_bytes[b] < nbytes:
                self._buffers[b] = self.device.allocate(nbytes)
                self._buffer_bytes[b] = nbytes
                grown = True
        if grown:
            self._frames.clear()  # their views point into the buffers just replaced
        g, nodes, device = self.graph, self._nodes, self.device
        outputs = {o for _, o in g.outputs}
        static = dict(self.constants)  # node -> its tensor wherever no call gives it one
        given = set()  # the nodes a call may give a value of its own (see Frame)
        calls, pending, dynamic = [], {}, []
        for step in self.steps:
            nid, n = step.node, nodes[step.node]
            shape = n.type.concrete(dims)
            if step.kind == "input":
                given.add(nid)
                dynamic.append((step.kind, nid, n, step.operands, shape))
            elif step.kind == "view":
                base = step.operands[0]
                if base in given:  # of a value a call gives: made per call (and where its base is planned, once too)
                    given.add(nid)
                    dynamic.append((step.kind, nid, n, step.operands, shape))
                if base in static:
                    static[nid] = device.view(static[base], shape, n.type.dtype)
            else:
                if nid in self.in_place:  # its output is its cache operand, given per call
                    name = step.kernel + IN_PLACE
                else:
                    name = self._kernel_name(step, n, dims)
                    if nid not in self.apart:
                        static[nid] = device.view(self._buffers[plan.buffer_of[nid]], shape, n.type.dtype)
                static_kernel = name != step.kernel and not name.endswith((IN_PLACE, FEW_ROWS, ONE_ROW))
                if nid in self.in_place or nid in outputs:
                    given.add(nid)
                    dynamic.append((step.kind, nid, n, step.operands, shape))
                args = [static.get(o) for o in step.operands] + [static.get(nid)]
                args += [] if static_kernel else [dims[d] for d in step.scalars]
                for i, o in enumerate(step.operands + (nid,)):
                    if o in given:
                        pending.setdefault(o, []).append((len(calls), i))
                check = None
                if n.op == "gather":
                    check = functools.partial(self._check_indices, n)
                elif n.op == "update_slice":
                    check = functools.partial(self._check_offset, n, step.operands[2])
                calls.append((name, args, nid, check))
        frame = Frame(plan, calls, dynamic, pending, static)
        self._frames[key] = frame
        while len(self._frames) > 8:
            self._frames.popitem(last=False)
        return frame

    def _kernel_name(self, step: Step, n: Node, dims: dict) -> str:
        """The kernel a step calls at ``dims``: a variant tuned at these dims, else the form for one row or few
        rows where the kernel has one, else the kernel."""
        name = next((name for d, name in self.variants.get(step.kernel, ())
                     if all(dims.get(k) == v for k, v in d.items())), step.kernel)
        if name == step.kernel and step.kernel in self.few_rows | self.one_row:
            rows = tile_rows(n.op, n.attrs, n.type.concrete(dims))
            if rows == 1 and step.kernel in self.one_row:
                return step.kernel + ONE_ROW
            if rows <= FEW_ROWS_MAX and step.kernel in self.few_rows:
                return step.kernel + FEW_ROWS
        return name

    def kernels_at(self, **dims) -> dict[int, str]:
        """The kernel each kernel step calls at these dims (a tuned variant, a form, or the kernel), by node."""
        return {nid: name for name, _, nid, _ in self._frame(dims).calls}

    # -- running ------------------------------------------------------------------------------

    def __call__(self, inputs: Mapping, *, observe: Callable[[Node, np.ndarray], None] | None = None,
                 times: dict | None = None, keep: Collection[str] = (), into: Mapping | None = None) -> dict:
        """Run on ``inputs`` ({name: array}); returns the outputs by name, as NumPy arrays except those
        named in ``keep``, which stay device tensors (fresh ones, never reused by a later call; or the
        device tensors ``into`` gives by output name, which the call writes: a training step's state,
        double-buffered, allocates nothing per step).

        An input may be a device tensor (from an earlier call's ``keep``): it is used where it is,
        without a copy.  A cache input that an ``update_slice`` updates in place (``in_place``)
        is donated: the call writes the new entries into it and returns that same tensor.
        ``observe(node, value)`` sees every kernel's result (a download per kernel: for verification,
        not for speed); ``times``, if given, collects each kernel call's seconds by node."""
        g = self.graph
        dims = self._bind(inputs)
        frame = self._frame(dims)
        self.last_peak_bytes = frame.plan.peak_bytes
        keep = set(keep)
        unknown = keep - {name for name, _ in g.outputs}
        if unknown:
            raise KeyError(f"keep names no output of {g.name}: {', '.join(sorted(unknown))}")
        # Kept outputs computed into planned buffers get memory of their own instead (in-place
        # caches and inputs passed through are returned as they are).
        fresh = {o for name, o in g.outputs if name in keep and o not in self.in_place and g.node(o).op != "input"}
        fresh |= self.apart
        into_tensors = {}  # output node -> the caller's tensor it is computed into
        for name, o in g.outputs:
            tensor = (into or {}).get(name)
            if tensor is not None and o in fresh and o in self._kernel_nodes and o not in into_tensors:
                want = g.node(o).type
                if tuple(tensor.shape) != want.concrete(dims) or str(tensor.dtype) != want.dtype:
                    raise InputError(f"into[{name!r}] is {tuple(tensor.shape)} {tensor.dtype}, but the output is "
                                     f"{want.concrete(dims)} {want.dtype}")
                if any(tensor is v for v in inputs.values()):
                    raise InputError(f"into[{name!r}] is also an input of this call")
                into_tensors[o] = tensor
        # The values this call gives (its inputs, in-place caches, outputs with memory of their own, and
        # views of them), all before the first kernel: the kernel loop below then only calls.
        device = self.device
        env = {}
        for kind, nid, n, operands, shape in frame.dynamic:
            if kind == "input":
                value = inputs[n.name]
                if is_device_tensor(value):
                    if str(value.dtype) != n.type.dtype:
                        raise InputError(f"input {n.name!r} is a device tensor of {value.dtype}, expected {n.type.dtype}")
                else:
                    value = np.asarray(value)
                    if value.dtype != np.dtype(n.type.dtype):
                        value = value.astype(n.type.dtype)
                    value = device.upload(value)
                env[nid] = value
            elif kind == "view":
                base = operands[0]
                if base in env:
                    env[nid] = device.view(env[base], shape, n.type.dtype)
            elif nid in self.in_place:
                env[nid] = env[operands[0]]
            elif nid in fresh:
                env[nid] = into_tensors[nid] if nid in into_tensors else \
                    device.view(device.allocate(_nbytes(n.type, dims)), shape, n.type.dtype)
                fresh.discard(nid)
        calls, static = frame.calls, frame.static
        for nid, value in env.items():
            for c, i in frame.pending.get(nid, ()):
                calls[c][1][i] = value
        try:
            self._run(calls, inputs, observe, times)
        finally:  # the frame keeps no tensor of this call's
            for nid in env:
                for c, i in frame.pending.get(nid, ()):
                    calls[c][1][i] = static.get(nid)
        result = {}
        for name, o in g.outputs:
            value = env[o] if o in env else static[o]
            if name not in keep:
                value = device.download(value)
            elif o in fresh:  # a view of a planned buffer: copied out
                value = device.upload(device.download(value))
            result[name] = value
        return result

    def _run(self, calls: list, inputs: Mapping, observe, times) -> None:
        device = self.device
        for name, args, nid, check in calls:
            if check is not None:
                check(args, inputs)
            try:
                if times is None:
                    device.call(name, args)
                else:  # each call alone, also on a device that runs kernels asynchronously
                    device.synchronize()
                    start = time.perf_counter()
                    device.call(name, args)
                    device.synchronize()
                    times.setdefault(nid, []).append(time.perf_counter() - start)
            except self._call_errors as e:  # TVM refused the arguments: name the kernel and the node
                raise kernel_call_error(self.graph, nid, name, e) from None
            if observe is not None:
                observe(self._nodes[nid], device.download(args[len(self.graph.operands(nid))]))

    def profile(self, inputs: Mapping[str, np.ndarray], repeat: int = 3) -> list[KernelTime]:
        """Per kernel call: its median wall time over ``repeat`` runs and its floating-point work.
        Each call is timed on its own (the device synchronized before and after it, which on a GPU adds
        the launch and the wait to every kernel): it shows where the time goes; whole-model calls give
        the end-to-end figures."""
        g = self.graph
        times: dict[int, list[float]] = {}
        dims = bind_dims(g.input_types(), inputs)
        # the outputs apart go into the same tensors every run, as a training step's do (no first touches)
        into = {name: self.device.view(self.device.allocate(_nbytes(g.node(o).type, dims)),
                                       g.node(o).type.concrete(dims), g.node(o).type.dtype)
                for name, o in g.outputs if o in self.apart}
        for _ in range(repeat):
            self(inputs, times=times, into=into)
        out = []
        for step in self.steps:
            if step.kind == "kernel":
                n = g.node(step.node)
                shapes = [g.node(o).type.concrete(dims) for o in step.operands]
                out.append(KernelTime(n.name, n.op, step.kernel, float(np.median(times[step.node])),
                                      flops(n.op, n.attrs, shapes, n.type.concrete(dims))))
        return out

    def run_kernel(self, nid: int, operands: list[np.ndarray], dims: Mapping[str, int]) -> np.ndarray:
        """Node ``nid``'s kernel alone on ``operands`` (cast to the operands' dtypes): to tell a wrong
        kernel from error carried in by its inputs."""
        g = self.graph
        step = next(s for s in self.steps if s.node == nid and s.kind == "kernel")
        n = g.node(nid)
        args = [self.device.upload(np.asarray(v).astype(g.node(o).type.dtype)) for o, v in zip(step.operands, operands)]
        out = self.device.upload(np.empty(n.type.concrete(dims), n.type.dtype))
        try:
            self.device.call(step.kernel, args + [out] + [dims[d] for d in step.scalars])
        except self._call_errors as e:
            raise kernel_call_error(g, nid, step.kernel, e) from None
        return self.device.download(out)

    def _check_indices(self, n: Node, args: list, inputs) -> None:
        # On the host before the call: an out-of-range id must never read past the table.
        rows, values = args[0].shape[0], self.device.download(args[1])
        if values.size and (values.min() < 0 or values.max() >= rows):
            bad = values[(values < 0) | (values >= rows)].ravel()[0]
            raise IndexOutOfRange(f"{self.graph.describe(n.id)}: index {bad} is out of range for a table of {rows} rows")

    def _check_offset(self, n: Node, offset_node: int, args: list, inputs) -> None:
        cache, value, offset = args[:3]
        axis = n.attrs["axis"] % len(cache.shape)
        given = inputs.get(self.graph.node(offset_node).name) if offset_node in self.graph.inputs else None
        # An input given on the host is read there; a computed offset is downloaded (a scalar).
        start = int(given) if isinstance(given, (int, np.integer, np.ndarray)) else int(self.device.download(offset))
        if start < 0 or start + value.shape[axis] > cache.shape[axis]:
            raise IndexOutOfRange(f"{self.graph.describe(n.id)}: writing {value.shape[axis]} entries at offset "
                                  f"{start} overflows a cache of {cache.shape[axis]}")

    @property
    def kernel_count(self) -> int:
        """Kernel calls per run."""
        return sum(1 for s in self.steps if s.kind == "kernel")

    @property
    def constant_bytes(self) -> int:
        """Bytes of parameters and precomputed weights-only values held by the executor."""
        return int(sum(np.prod(t.shape, dtype=np.int64) * np.dtype(t.dtype).itemsize for t in self.constants.values()))
