"""Whether a call fits in memory: the bytes it needs at its dims (inputs, intermediates, outputs) against
the memory available, checked before anything is allocated, so that sizes too large for this machine are
one clear error instead of NumPy's ``ArrayMemoryError`` or C++'s ``std::bad_alloc`` halfway through.

The figures are Python integers (no int64 overflow at absurd dims) and estimates: the planner's peak of a
compiled model's buffers, or for the interpreter the peak of the values it holds at once."""

from __future__ import annotations

import os
from typing import Mapping

from .inputs import InputError

#: The largest size a dim may have (an index into it must fit an int64).
MAX_DIM = 2**63 - 1


class NotEnoughMemory(InputError):
    """A call whose inputs, intermediates and outputs would not fit in the memory available."""


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
        return int(text) if text.isdigit() else None
    except (OSError, ValueError):
        return None


def _stat(path: str, keys: tuple) -> int:
    """The first of ``keys`` in a cgroup's ``memory.stat`` (0 where absent), as ``docker stats`` reads it."""
    try:
        with open(path) as f:
            fields = dict(line.split()[:2] for line in f if len(line.split()) >= 2)
    except OSError:
        return 0
    for key in keys:
        if fields.get(key, "").isdigit():
            return int(fields[key])
    return 0


def available_bytes() -> int | None:
    """The memory this process may still allocate: MemAvailable from /proc/meminfo (else the free physical
    pages from ``os.sysconf``), lowered to the cgroup's limit less its usage where a container sets one;
    None where nothing says."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            try:
                avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                avail = None
    for limit_file, usage_file, stat_file in (
            ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
             "/sys/fs/cgroup/memory/memory.stat")):
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 2**60:
            usage -= _stat(stat_file, ("inactive_file", "total_inactive_file"))  # page cache the kernel reclaims
            room = max(limit - usage, 0)
            avail = room if avail is None else min(avail, room)
    return avail


def human(nbytes: int) -> str:
    """``nbytes`` in decimal units: ``3.2 TB``, ``21.3 GB``, ``512 B``."""
    value = float(nbytes)
    for unit in ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB"):
        if value < 1000 or unit == "ZB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def check_dims(dims: Mapping[str, int]) -> None:
    """Every dim at least 1 and at most ``MAX_DIM``: an ``InputError`` naming the first that is not."""
    for name, value in dims.items():
        if not isinstance(value, int):
            continue
        if value < 1:
            raise InputError(f"{name}={value}: a dim must be at least 1")
        if value > MAX_DIM:
            raise InputError(f"{name}={value}: a dim must be at most 2^63 - 1 ({MAX_DIM})")


def dims_text(dims: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in dims.items())


def check_fits(parts: Mapping[str, int], what: str, error: type[Exception] = NotEnoughMemory,
               hint: str = "") -> None:
    """Raise ``error`` when the sum of ``parts`` (name -> bytes) exceeds the memory available:
    "WHAT: this call needs about 3.2 TB (inputs 1.6 TB, intermediates ...), 21.3 GB is available"."""
    need = sum(parts.values())
    avail = available_bytes()
    if avail is None or need <= avail:
        return
    detail = ", ".join(f"{k} {human(v)}" for k, v in parts.items() if v)
    raise error(f"{what}: this call needs about {human(need)} ({detail}), {human(avail)} is available"
                + (f"; {hint}" if hint else ""))


def _bytes(ty, dims: Mapping[str, int], float_bytes: int | None = None) -> int:
    from .ir.types import numpy_dtype
    n = 1
    for d in ty.concrete(dims):
        n *= int(d)
    if float_bytes and ty.is_float:
        return n * float_bytes
    return n * numpy_dtype(ty.dtype).itemsize


def graph_bytes(graph, dims: Mapping[str, int], *, compiled=None, float_bytes: int | None = None,
                planned: bool = False) -> dict[str, int]:
    """The bytes a run of ``graph`` at ``dims`` needs: ``inputs``, ``intermediates`` and ``outputs``.

    ``compiled`` (a ``CompiledModel``): its memory plan's peak; ``planned``: the memory planner run on
    ``graph`` (a model about to be compiled); else the interpreter's peak of the values it holds at once
    (each float value in ``float_bytes``, the interpreter's precision), outputs apart."""
    from .passes.memory import SOURCE_OPS, VIEW_OPS
    inputs = sum(_bytes(t, dims, float_bytes) for t in graph.input_types().values())
    outputs = sum(_bytes(t, dims, float_bytes) for t in graph.output_types().values())
    out_nodes = {o for _, o in graph.outputs}
    order = graph.topo_order()
    pos = {nid: i for i, nid in enumerate(order)}
    owner: dict[int, int] = {}
    life: dict[int, list[int]] = {}
    size: dict[int, int] = {}
    for nid in order:
        n = graph.node(nid)
        if n.op in SOURCE_OPS or nid in out_nodes:
            continue
        last = max((pos[u] for u in graph.users(nid)), default=pos[nid])
        if n.op in VIEW_OPS and graph.operands(nid)[0] in owner:  # shares its operand's memory
            owner[nid] = owner[graph.operands(nid)[0]]
            life[owner[nid]][1] = max(life[owner[nid]][1], last)
        else:
            owner[nid] = nid
            life[nid] = [pos[nid], last]
            size[nid] = _bytes(n.type, dims, float_bytes)
    naive = sum(size.values())
    if (compiled is not None or planned) and naive < 2**62:  # the planner's int64 sizes cannot overflow
        plan = compiled.memory(**dims) if compiled is not None else None
        if plan is None:
            from .passes.memory import plan_memory
            plan = plan_memory(graph, dims)
        intermediates = plan.peak_bytes
    else:  # the interpreter: the most bytes alive at once
        delta: dict[int, int] = {}
        for v, (start, end) in life.items():
            delta[start] = delta.get(start, 0) + size[v]
            delta[end + 1] = delta.get(end + 1, 0) - size[v]
        alive = intermediates = 0
        for p in sorted(delta):
            alive += delta[p]
            intermediates = max(intermediates, alive)
    return {"inputs": inputs, "intermediates": intermediates, "outputs": outputs}


def check_run(graph, dims: Mapping[str, int], *, compiled=None, float_bytes: int | None = None,
              planned: bool = False, inputs_held: bool = False, hint: str = "") -> dict[str, int]:
    """A ``NotEnoughMemory`` error unless a run of ``graph`` at ``dims`` fits in the memory available (see
    ``graph_bytes``); ``inputs_held``: the inputs exist already (not counted); ``hint`` ends the message.
    Returns the figures."""
    check_dims(dims)
    parts = graph_bytes(graph, dims, compiled=compiled, float_bytes=float_bytes, planned=planned)
    if inputs_held:
        parts = {**parts, "inputs": 0}
    check_fits(parts, dims_text(dims), hint=hint)
    return parts


__all__ = ["NotEnoughMemory", "available_bytes", "human", "check_dims", "check_fits", "graph_bytes", "check_run"]
