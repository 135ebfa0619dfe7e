"""TVM's rule-based GPU schedules (dlight) for the kernels without a hand-written one: a workgroup per
row for the norms and softmax, shared-memory tiles for a matmul, one thread per element for the rest.
Two traps this module guards against (TVM_NOTES 3.1): dlight mutates the IRModule it is given, so every
call schedules its own copy; and a PrimFunc left without thread bindings compiles for a GPU target
*without error* as host code that would dereference device pointers, so every function must end up
with a device kernel."""

from __future__ import annotations

from .... import BuildError


def default_rules():
    """dlight's default GPU rules, in the order the Relax GPU pipeline uses them (first match wins)."""
    from tvm.s_tir import dlight as dl
    return [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]


def _is_func(value) -> bool:
    from tvm import tirx
    return isinstance(value, tirx.PrimFunc)


def has_thread_binding(func) -> bool:
    """Whether ``func`` binds any loop to a GPU thread or block axis (it then lowers to a device kernel)."""
    import tvm_ffi
    from tvm import tirx
    found = []

    def visit(node):
        if node.kind == tirx.ForKind.THREAD_BINDING:
            found.append(node)
        return True

    tvm_ffi.structural_walk(func.body, (tirx.For, visit), order="pre")
    if found:
        return True

    def visit_attr(node):
        if node.attr_key == "thread_extent":
            found.append(node)
        return True

    tvm_ffi.structural_walk(func.body, (tirx.AttrStmt, visit_attr), order="pre")
    return bool(found)


def schedule_module(mod, target, rules=None):
    """A copy of ``mod`` (unscheduled PrimFuncs, e.g. from ``te.create_prim_func``) with dlight's GPU
    schedules for ``target``.  Functions already marked ``tirx.is_scheduled`` are kept as they are.
    Raises ``BuildError`` naming every function that got no device kernel."""
    import tvm
    from tvm.s_tir import dlight as dl
    fresh = tvm.IRModule(dict(mod.functions_items()))  # dlight schedules in place
    with target:
        scheduled = dl.ApplyDefaultSchedule(*(rules or default_rules()))(fresh)
    require_device_kernels(scheduled)
    return scheduled


def schedule_func(func, target):
    """One PrimFunc with dlight's GPU schedule for ``target``.  Where the default rules fail on it (seen:
    a reduction reading a broadcast operand, ``add_rms_norm`` with a residual shared by a batch), dlight's
    catch-all rule alone: one thread per output element, reductions serial, slower but correct."""
    import tvm
    from tvm.s_tir import dlight as dl
    func = inline_widening(func)
    try:
        mod = schedule_module(tvm.IRModule({"main": func}), target)
    except Exception:  # noqa: BLE001 - a rule's ScheduleError, or a function left without threads
        mod = schedule_module(tvm.IRModule({"main": func}), target, [dl.gpu.Fallback()])
    return mod["main"]


def inline_widening(func):
    """``func`` with its stages that read a half-precision operand into float32 inlined into their readers
    (``lower.is_widening``): a matmul of float16 operands then reads them as such, and dlight's matmul rule
    puts it on tensor cores (WMMA fragments, float32 accumulators) on cuda at sm_70 and later."""
    from tvm import s_tir

    from ...lower import is_widening
    sch = s_tir.Schedule(func)
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if is_widening(sch.get(block).name_hint):
            sch.compute_inline(block)
    return sch.mod["main"]


def require_device_kernels(mod) -> None:
    """Raise ``BuildError`` unless every PrimFunc of ``mod`` binds loops to GPU threads: an unbound
    function would compile without error into host code reading device memory."""
    unbound = sorted(gv.name_hint for gv, f in mod.functions_items() if _is_func(f) and not has_thread_binding(f))
    if unbound:
        raise BuildError(f"no GPU schedule for {', '.join(unbound)}: the function has no thread bindings "
                         f"(schedule it, or let dlight's Fallback rule handle it)")
