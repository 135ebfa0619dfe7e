"""The generic CPU schedule, what every kernel without a hand-written one gets, and the scheduling
helpers the hand-written kernels share.

Simple but not naive: stages that only move or combine elements are inlined into their readers;
every remaining stage runs its outer loops in parallel (fused into one parallel loop) and its
innermost output axis vectorized when that axis has a static extent.  A matmul-like reduction
(the reduced axis is not the output's last axis) moves the reduction outside the last output axis,
so the inner loop is a vectorizable row update instead of a dot product; so does a sum over the
leading axes into a vector (a bias's gradient), split by columns across the threads.
"""

from __future__ import annotations

from tvm import s_tir, tirx

#: IterVar types of a block's iterators (tvm/tirx/expr.h).
SPATIAL, REDUCE = 0, 2
#: Inner-loop width on AVX2: 8 float32 lanes; a wider static axis is split so LLVM keeps it in registers.
LANES = 8
#: Columns a thread sums when a reduction over the leading axes is split by columns (a multiple of LANES).
COLUMN_CHUNK = 64


def schedule_generic(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` (from ``te.create_prim_func``) with the generic CPU schedule applied."""
    sch = s_tir.Schedule(func)
    _inline_injective(sch)
    for block in _stages(sch):
        _schedule_stage(sch, block)
    return sch.mod["main"]


def _stages(sch):
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _inline_injective(sch) -> None:
    """Inline every intermediate elementwise/layout stage into its readers (recomputing an index
    shuffle or an exp is cheaper than a round trip through memory)."""
    stages = _stages(sch)
    for block in stages[:-1]:
        if is_reduction(sch, block):
            continue
        try:
            sch.compute_inline(block)
        except Exception:  # noqa: BLE001, S110 - not inlinable (e.g. read by a reduction's init): stays a stage
            pass


def _static(sch, loop) -> int | None:
    extent = sch.get(loop).extent
    return extent.value if isinstance(extent, tirx.IntImm) else None


def _schedule_stage(sch, block) -> None:
    iters = sch.get(block).iter_vars
    loops = sch.get_loops(block)
    spatial = [lp for lp, v in zip(loops, iters) if v.iter_type == SPATIAL]
    reduce_ = [lp for lp, v in zip(loops, iters) if v.iter_type == REDUCE]
    if not spatial:
        return  # a scalar result: nothing to spread
    inner = spatial[-1]
    outer = spatial[:-1]
    last_var = [v for v in iters if v.iter_type == SPATIAL][-1].var
    if reduce_ and _static(sch, inner) and (len(spatial) >= 2 or _reads_along(sch, block, last_var)):
        # matmul-like: (..., i, j, k) -> (..., i, k, j): the inner loop updates a row of outputs.
        sch.reorder(*reduce_, inner)
        extent = _static(sch, inner)
        if all(_static(sch, lp) == 1 for lp in outer) and extent >= 2 * COLUMN_CHUNK:
            # a sum over the leading axes (a bias's gradient, x summed over batch and sequence into (1, 1, n)):
            # nothing outer to spread, so the columns are, in chunks, each thread streaming every row's chunk
            chunk, inner = sch.split(inner, [None, COLUMN_CHUNK])
            sch.reorder(chunk, *reduce_)
            outer = [chunk]
    elif reduce_:
        outer, inner = spatial, None  # reduction over the last axis: rows in parallel, reduce inside
    if outer:
        par = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(par)
    elif inner is not None and _static(sch, inner) is None:
        sch.parallel(inner)  # a single symbolic axis: parallel, not vectorizable
        inner = None
    if inner is not None and _static(sch, inner):
        extent = _static(sch, inner)
        if extent > LANES and extent % LANES == 0:
            _, inner = sch.split(inner, [None, LANES])
        if extent <= LANES or extent % LANES == 0:
            sch.vectorize(inner)
    if reduce_ and inner is not None:
        # After vectorize: decompose_reduction refuses loops not yet scheduled the way it expects.
        init = sch.decompose_reduction(block, reduce_[0])
        init_inner = sch.get_loops(init)[-1]
        if _static(sch, init_inner) and _static(sch, init_inner) <= LANES:
            sch.vectorize(init_inner)


def _reads_along(sch, block, var) -> bool:
    """Whether ``block`` reads some buffer with ``var`` as its last index (a sum over the leading axes into
    a vector: the inner loop over ``var`` then streams rows)."""
    for region in sch.get(block).reads:
        last = region.region[-1] if len(region.region) else None
        if last is not None and isinstance(last.min, tirx.Var) and last.min.same_as(var):
            return True
    return False


# -- helpers of the hand-written kernels ------------------------------------------------------

def has_block(sch, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:  # noqa: BLE001 - get_sblock raises a generic error for a missing block
        return False


def is_reduction(sch, block) -> bool:
    return any(v.iter_type == REDUCE for v in sch.get(block).iter_vars)


def split_row_reduction(sch, block, lanes: int = 8):
    """A row sum or max over a static extent as ``lanes`` interleaved partial results (rfactor):
    a vector of independent accumulators instead of one serial dependency chain (float adds are
    not reassociated by the compiler, so a plain reduction loop runs at one add per latency)."""
    r = sch.get_loops(block)[-1]
    extent = sch.get(r).extent
    if isinstance(extent, tirx.IntImm) and extent.value % lanes == 0 and extent.value > lanes:
        _, ri = sch.split(r, [None, lanes])
        sch.rfactor(ri, factor_axis=0)


def vectorize_static(sch, loop):
    """Vectorize ``loop`` when its extent is static (TVM cannot vectorize a symbolic extent for x86;
    LLVM's own loop vectorizer still sees those loops).  A long loop is vectorized in chunks of 16
    (or 8, 4) lanes: one vector of 37000 lanes (a vocabulary row) does not compile."""
    extent = sch.get(loop).extent
    if not isinstance(extent, tirx.IntImm):
        return
    if extent.value <= 64:
        sch.vectorize(loop)
        return
    lanes = next((n for n in (16, 8, 4) if extent.value % n == 0), None)
    if lanes is not None:
        sch.vectorize(sch.split(loop, [None, lanes])[1])


def vectorize_weighted_sum(sch, block):
    """P @ V for one query row: loop the keys outside, vectorize over the head dim inside."""
    d, r = sch.get_loops(block)[-2:]
    sch.reorder(r, d)
    vectorize_static(sch, d)
    init = sch.decompose_reduction(block, r)  # after vectorize, or the schedule rejects it
    vectorize_static(sch, sch.get_loops(init)[-1])


def scalar_bfloat16(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """``func`` with its vectorized loops made serial where they move bfloat16 as it is (a copy, a gather, a
    broadcast: a store of a bfloat16 value that is not rounded from float32).  TVM's llvm lowering keeps bfloat16 as
    16-bit integers and rejects such a vector ("dtype mismatch on BufferStore"), while vectors widened to float32 or
    rounded from it compile (every computing kernel's: ``lower.lower``, ``half.py``).  LLVM may still vectorize the
    serial loops itself."""
    if func is None or not any(str(getattr(p.ty, "dtype", "")) == "bfloat16" for p in func.params):
        return func
    import tvm_ffi
    moves = [0]  # bfloat16 moved as it is, in the stores visited so far

    def is_bfloat16(e) -> bool:
        return str(e.ty.dtype).startswith("bfloat16")

    def store(node, mutator):
        # rounded from float32 arithmetic; a bfloat16 widened and rounded back folds into a move
        v = node.value
        rounded = isinstance(v, tirx.Cast) and not is_bfloat16(v.value) and not (
            isinstance(v.value, tirx.Cast) and is_bfloat16(v.value.value))
        if str(node.buffer.ty.dtype) == "bfloat16" and not rounded:
            moves[0] += 1
        return mutator.default_mutate(node)

    def visit(loop, mutator):
        before = moves[0]
        loop = mutator.default_mutate(loop)
        if loop.kind != tirx.ForKind.VECTORIZED or moves[0] == before:
            return loop
        return tirx.For(loop.loop_var, loop.min, loop.extent, tirx.ForKind.SERIAL, loop.body, loop.thread_binding,
                        loop.annotations)
    return tvm_ffi.structural_mutate(func, ((tirx.BufferStore, store), (tirx.For, visit)))


# Largest packed weight panel kept on the worker's stack; larger ones go to the heap.
MAX_STACK_PANEL_BYTES = 256 * 1024


def zeroed(sch, block, loop) -> None:
    """``block``'s reduction split into its accumulators' zeroing, placed before ``loop`` (the reduction's outer
    loop), and the update; the zeroing's innermost loop vectorized (decompose last: it needs the update's loops
    already scheduled)."""
    init = sch.decompose_reduction(block, loop)
    sch.vectorize(sch.get_loops(init)[-1])


def i64(v: int):
    """``v`` as an int64 constant (the kernels index in int64, like the graph's dims)."""
    return tirx.IntImm("int64", v)


def positions(lead):
    """The number of positions of leading dims ``lead`` (their product: the flattened M of a kernel)."""
    m = lead[0]
    for d in lead[1:]:
        m = m * d
    return m


def unravel(m, dims) -> tuple:
    """Row-major index tuple of the flat index ``m`` over ``dims``."""
    idx = []
    for d in reversed(dims[1:]):
        idx.append(m % d)
        m = m // d
    idx.append(m)
    return tuple(reversed(idx))


def read_index(sch, block, name: str) -> int:
    """Position of buffer ``name`` among the reads of ``block``."""
    return [r.source.name for r in sch.get(block).reads].index(name)


def register_tiles(sch, rows: int, columns: int):
    """Block ``out`` in tiles of ``rows`` x ``columns``, column tiles outermost (the loop to run in parallel),
    each tile's accumulator ``acc`` computed in registers at its tile; returns the column tile loop, the row
    tile loop, the loop over a tile's columns and the accumulator block."""
    m, n = sch.get_loops(sch.get_sblock("out"))
    mo, mi = sch.split(m, [None, rows])
    no, ni = sch.split(n, [None, columns])
    sch.reorder(no, mo, mi, ni)
    ab = sch.get_sblock("acc")
    sch.compute_at(ab, mo)
    sch.set_scope(ab, 0, "local")
    return no, mo, ni, ab
