"""The llvm target's kernel table (``KERNELS``): the hand-scheduled kernel of each op that has one, and the
other forms built beside a kernel, one row each.  Row ops (``OpDef.rows``) get the row-wise schedule by that
property, so a new norm needs no row here.

Each kernel is a complete, scheduled ``tvm.tirx.PrimFunc`` whose parameters are the operands in order,
then the output, with shapes ``dim_vars.shape(t.shape)``; ``None`` means "use the generic lowering".
Symbolic dims (batch, seq) are never split by a factor that must divide them: tiles over a symbolic
extent are computed in full on clamped reads (row ``min(m, M - 1)``, always a valid address) into a
register tile, and only the write back is predicated, so the inner loops have no branches.

Kernels (float32 and float64; a float16 or bfloat16 kernel is its float32 twin retyped, ``half.py``):
- ``matmul`` with a 2-D right operand and fused ``linear``: x (..., K) @ W (K, N), leading dims flattened
  to one symbolic M; bias and activation applied in the write back (an epilogue inside the kernel).
- batched ``matmul`` (attention's Q K^T and P V when not fused): output rows in parallel, each a
  sum over K of a[k] * b[k, :], vectorized along N.
- ``linear_packed``: the same over weights packed in column panels when the weights are bound; in bfloat16 on
  a CPU with bfloat16 dot products, over panels of K pairs, one ``vdpbf16ps`` per pair (``dot.py``);
  ``swiglu_packed`` (SwiGLU's gate and value in one projection): both halves' products in one register tile,
  ``silu(gate) * value`` in the write back.
- ``weight_grad`` (x^T g over the positions: a projection's weight gradient): register tiles of the static
  output, a loop over the positions of rank-1 updates from two contiguous rows.
- ``scatter_add`` (an embedding's gradient): a loop over the positions adding rows, column strips in parallel.
- ``softmax``, ``log_softmax``, ``scaled_masked_softmax``, ``layer_norm``, ``add_layer_norm``, and
  ``cross_entropy`` (one loss per row): the generic tensor expression scheduled row by row (``rowwise``):
  rows in parallel, every intermediate computed for one row at a time, row sums over a static extent in 8
  vector lanes, float32 ``exp`` as a vectorizable polynomial.
- ``fused_attention``: blocks of query rows against register-tiled key chunks (``attention.py``; in bfloat16 on a
  CPU with bfloat16 dot products, Q K^T and P V on ``vdpbf16ps``, the decode form widening as other halves do); its
  backward's ops (``attention_lse``, ``attention_grad_q``, ``attention_grad_kv``): blocks of rows against
  every column, nothing of (batch, heads, q_len, k_len) kept (``attention.py``).
- ``update_slice`` in place (``write_slice``), for caches the executor donates.
"""

from __future__ import annotations

from tvm import s_tir, te, tirx

from .....ir import TensorType
from .....ir.types import HALF_DTYPES
from ...lower import lower
from ...lower.elementwise import ACTIVATIONS
from ...plan import FEW_ROWS, IN_PLACE, ONE_ROW
from ...shapes import DimVars
from ..table import ROW_OPS, KernelTable, Row
from .amx import BLOCK as AMX_BLOCK
from .amx import STEP as AMX_STEP
from .amx import dense_amx
from .attention import attention, attention_backward
from .dot import INT8_INSTRUCTIONS, dense_bf16, dense_int8, weight_grad_bf16
from .fastmath import fast_math
from .half import READ_AS_STORED
from .schedule import (MAX_STACK_PANEL_BYTES, has_block, i64, is_reduction, positions, read_index, register_tiles,
                       split_row_reduction, unravel, vectorize_static, vectorize_weighted_sum, zeroed)
from .tiles import BF16_GROUP, PANEL_WIDTH, TILE_M, TILE_N

FLOATS = ("float32", "float64")


def _static(shape) -> bool:
    return all(isinstance(v, int) for v in shape)


def _same_float(spec, tiles=None) -> bool:
    """A float kernel over operands of its own type (the projections over packed panels may read narrower panels,
    and x in a half type: ``half.READ_AS_STORED``)."""
    t = spec.in_types
    narrower = spec.op in READ_AS_STORED
    return (t[0].dtype == spec.out_type.dtype or narrower and str(t[0].dtype) in HALF_DTYPES) \
        and (len(t) < 2 or t[1].dtype == spec.out_type.dtype or narrower)


def _on_last_axis(spec, tiles=None) -> bool:
    return (_same_float(spec) and spec.out_type.rank >= 2
            and spec.attrs.get("axis", -1) in (-1, spec.out_type.rank - 1))


def _dense_linear(spec, dv, tiles):
    return dense(list(spec.in_types), spec.out_type, dv, bias=len(spec.in_types) == 3,
                 activation=spec.attrs.get("activation", "none"))


def _attention(block_of, dot: bool = False):
    def build(spec, dv, tiles):
        return attention(spec.attrs, list(spec.in_types), spec.out_type, dv, block=block_of(tiles),
                         lanes=tiles.attention[1], dot=dot)
    return build


def _is_bf16_attention(spec, tiles) -> bool:
    """bfloat16 q, k, v and output on a CPU with bfloat16 dot products, q and k's head dim even (at least two pairs)
    and v's a multiple of the instruction's 16 lanes."""
    q, v = spec.in_types[0], spec.in_types[2]
    d, dv = q.shape[-1], v.shape[-1]
    return (tiles.bf16_dot is not None and tiles.attention[1] % PANEL_WIDTH == 0
            and all(str(t.dtype) == "bfloat16" for t in (*spec.in_types[:3], spec.out_type))
            and isinstance(d, int) and d % BF16_GROUP == 0 and d > BF16_GROUP
            and isinstance(dv, int) and dv % PANEL_WIDTH == 0)


def _swiglu(spec, dv, tile: tuple) -> tirx.PrimFunc:
    """``swiglu_packed`` as the gated dense kernel, its register tile holding as many accumulators as ``tile``'s
    (rows, columns) does for a plain projection: half the columns, else half the rows."""
    rows, columns = tile
    tile = (rows, columns // 2) if columns >= 2 * TILE_N else (max(1, rows // 2), columns)
    return dense(list(spec.in_types), spec.out_type, dv, bias=len(spec.in_types) == 3, activation="none",
                 packed=True, tile_m=tile[0], tile_n=tile[1], gated=True, gate_half=spec.attrs["gate"])


def _bf16_dot(form: int):
    """The bfloat16 dot-product projection (``dot.py``) with the tile of ``form`` (0 main, 1 a few rows, 2 one row)."""
    def build(spec, dv, tiles):
        return dense_bf16(list(spec.in_types), spec.out_type, dv, bias=len(spec.in_types) == 3,
                          activation=spec.attrs.get("activation", "none"), tile=tiles.bf16_dot[form])
    return build


def _is_bf16_dot(spec, tiles) -> bool:
    """bfloat16 x (..., K) @ panels of K pairs (``pack_panels(interleave=2)``) or a plain (K, N) weight, K even and at
    least 4, on a CPU with bfloat16 dot products."""
    x, w = spec.in_types[0], spec.in_types[1]
    pairs = w.rank == 4 and w.shape[2:] == (PANEL_WIDTH, BF16_GROUP) and w.shape[1] > 1
    plain = _is_dense(spec.in_types) and w.shape[0] % BF16_GROUP == 0 and w.shape[0] > BF16_GROUP
    return (tiles.bf16_dot is not None and x.rank >= 2 and (pairs or plain)
            and all(str(t.dtype) == "bfloat16" for t in (*spec.in_types, spec.out_type)))


def _is_amx(spec, tiles) -> bool:
    """A bfloat16 projection over pair panels whose K and N are multiples of 32, where the AMX kernel is on."""
    w = spec.in_types[1]
    return (tiles.amx and _is_bf16_dot(spec, tiles) and w.rank == 4 and w.shape[1] * BF16_GROUP % AMX_STEP == 0
            and spec.out_type.shape[-1] % AMX_BLOCK == 0)


def _int8_dot(form: int):
    """The int8 projection on the CPU's integer dot products (``dot.dense_int8``) with the tile of ``form`` (0 main,
    1 a few rows, 2 one row)."""
    def build(spec, dv, tiles):
        return dense_int8(list(spec.in_types), spec.out_type, dv, bias=len(spec.in_types) == 4,
                          activation=spec.attrs.get("activation", "none"), tile=tiles.int8_dot[form],
                          dot=INT8_INSTRUCTIONS[tiles.int8_instruction])
    return build


def _is_int8_dot(spec, tiles) -> bool:
    """``linear_int8`` over panels in the layout of the CPU's instruction (``tiles.int8_instruction``), x with
    leading dims and at least two groups of K (one: the generic lowering)."""
    w = spec.in_types[1]
    return tiles.int8_dot is not None and spec.in_types[0].rank >= 2 and w.shape[1] > 1 \
        and w.shape[3] == INT8_INSTRUCTIONS[tiles.int8_instruction].group


def _is_gated(spec, tiles=None) -> bool:
    """``swiglu_packed`` over panels of PANEL_WIDTH whose halves are whole panels each."""
    return _same_float(spec) and _is_packed_dense(spec.in_types) and spec.attrs["n"] % PANEL_WIDTH == 0


#: The llvm target's hand-scheduled kernels (``table.KernelTable``; ``ctx`` is the CPU's ``tiles``), asked in
#: this order.
KERNELS = KernelTable(
    Row("embedding gradient: rows added per position", ("scatter_add",),
        lambda spec, dv, tiles: scatter_rows(list(spec.in_types), spec.out_type, dv),
        guard=lambda spec, tiles: spec.out_type.rank == 2 and _static(spec.out_type.shape)),
    Row("transpose of the last two axes in blocks", ("transpose",),
        lambda spec, dv, tiles: transpose_blocks(list(spec.in_types), spec.out_type, dv),
        guard=lambda spec, tiles: _swaps_last_two(spec.attrs["perm"]) and _static(spec.out_type.shape[-2:])),
    Row("cross entropy row by row", ("cross_entropy",),
        lambda spec, dv, tiles: rowwise(spec.op, spec.attrs, list(spec.in_types), spec.out_type, dv, reduces_row=True),
        dtypes=FLOATS, guard=lambda spec, tiles: spec.out_type.rank >= 1
        and spec.in_types[0].dtype == spec.out_type.dtype),  # (scores, integer targets)
    Row("bfloat16 projection by a 2-D weight on bfloat16 dot products", ("matmul", "linear"), _bf16_dot(0),
        dtypes=("bfloat16",), guard=_is_bf16_dot),
    Row("projection by a 2-D weight", ("matmul",),
        lambda spec, dv, tiles: dense(list(spec.in_types), spec.out_type, dv, bias=False, activation="none"),
        dtypes=FLOATS, guard=lambda spec, tiles: _same_float(spec) and _is_dense(spec.in_types)),
    Row("batched matmul", ("matmul",),
        lambda spec, dv, tiles: batched_matmul(list(spec.in_types), spec.out_type, dv),
        dtypes=FLOATS, guard=lambda spec, tiles: _same_float(spec) and min(t.rank for t in spec.in_types) >= 2),
    Row("bfloat16 weight gradient on bfloat16 dot products", ("weight_grad",),
        lambda spec, dv, tiles: weight_grad_bf16(list(spec.in_types), spec.out_type, dv, tiles.bf16_dot[0]),
        dtypes=("bfloat16",), guard=lambda spec, tiles: tiles.bf16_dot is not None and _static(spec.out_type.shape)
        and all(str(t.dtype) == "bfloat16" for t in spec.in_types)),
    Row("weight gradient", ("weight_grad",),
        lambda spec, dv, tiles: weight_grad(list(spec.in_types), spec.out_type, dv, tiles.weight_grad),
        dtypes=FLOATS, guard=lambda spec, tiles: _same_float(spec) and _static(spec.out_type.shape)),
    Row("projection with bias and activation", ("linear",), _dense_linear,
        dtypes=FLOATS, guard=lambda spec, tiles: _same_float(spec) and _is_dense(spec.in_types)),
    Row("bfloat16 projection on AMX tiles (opt-in: not yet run on a CPU with AMX)", ("linear_packed",),
        lambda spec, dv, tiles: dense_amx(list(spec.in_types), spec.out_type, dv, bias=len(spec.in_types) == 3,
                                          activation=spec.attrs.get("activation", "none")),
        dtypes=("bfloat16",), guard=_is_amx),
    Row("bfloat16 projection on the CPU's bfloat16 dot products", ("linear_packed",), _bf16_dot(0),
        dtypes=("bfloat16",), guard=_is_bf16_dot),
    Row("int8 projection on the CPU's integer dot products", ("linear_int8",), _int8_dot(0),
        dtypes=("float32",), guard=_is_int8_dot),
    Row("projection over packed weight panels", ("linear_packed",),
        lambda spec, dv, tiles: _packed_linear(spec.attrs, list(spec.in_types), spec.out_type, dv, tiles.dense,
                                               prefetch=tiles.prefetch),
        dtypes=FLOATS, guard=lambda spec, tiles: _same_float(spec) and _is_packed_dense(spec.in_types)),
    Row("projection with SwiGLU's gate in the write back", ("swiglu_packed",),
        lambda spec, dv, tiles: _swiglu(spec, dv, tiles.dense), dtypes=FLOATS, guard=_is_gated),
    Row("bfloat16 attention on bfloat16 dot products: blocks of query rows", ("fused_attention",),
        _attention(lambda tiles: tiles.attention[0], dot=True), dtypes=("bfloat16",), guard=_is_bf16_attention),
    Row("attention: blocks of query rows", ("fused_attention",), _attention(lambda tiles: tiles.attention[0]),
        dtypes=FLOATS, guard=_same_float),
    Row("attention backward: blocks of rows", ("attention_lse", "attention_grad_q", "attention_grad_kv"),
        lambda spec, dv, tiles: attention_backward(spec.op, spec.attrs, list(spec.in_types), spec.out_type, dv,
                                                   block=tiles.attention[0], lanes=tiles.attention[1]),
        dtypes=FLOATS, guard=_same_float),
    Row("row ops row by row", ROW_OPS,
        lambda spec, dv, tiles: rowwise(spec.op, spec.attrs, list(spec.in_types), spec.out_type, dv),
        dtypes=FLOATS, guard=_on_last_axis),
    # other forms, built beside the kernel and picked per call by the executor
    Row("cache update in place", ("update_slice",),
        lambda spec, dv, tiles: write_slice(list(spec.in_types), spec.out_type, spec.attrs["axis"], dv), form=IN_PLACE),
    Row("attention: one query row at a time", ("fused_attention",), _attention(lambda tiles: 1),
        dtypes=FLOATS, form=FEW_ROWS),
    Row("bfloat16 projection on dot products: a few rows", ("linear_packed",), _bf16_dot(1),
        dtypes=("bfloat16",), guard=_is_bf16_dot, form=FEW_ROWS),
    Row("projection: a few rows", ("linear_packed",),
        lambda spec, dv, tiles: _packed_linear(spec.attrs, list(spec.in_types), spec.out_type, dv, tiles.few_rows),
        dtypes=FLOATS, guard=lambda spec, tiles: _is_packed_dense(spec.in_types), form=FEW_ROWS),
    Row("bfloat16 projection on dot products: one row", ("linear_packed",), _bf16_dot(2),
        dtypes=("bfloat16",), guard=_is_bf16_dot, form=ONE_ROW),
    Row("int8 projection on integer dot products: a few rows", ("linear_int8",), _int8_dot(1),
        dtypes=("float32",), guard=_is_int8_dot, form=FEW_ROWS),
    Row("int8 projection on integer dot products: one row", ("linear_int8",), _int8_dot(2),
        dtypes=("float32",), guard=lambda spec, tiles: _is_int8_dot(spec, tiles) and bool(tiles.int8_dot[2]),
        form=ONE_ROW),
    Row("projection: one row", ("linear_packed",),
        lambda spec, dv, tiles: _packed_linear(spec.attrs, list(spec.in_types), spec.out_type, dv, tiles.one_row),
        dtypes=FLOATS, guard=lambda spec, tiles: bool(tiles.one_row) and _is_packed_dense(spec.in_types),
        form=ONE_ROW),
    Row("gated projection: a few rows", ("swiglu_packed",), lambda spec, dv, tiles: _swiglu(spec, dv, tiles.few_rows),
        dtypes=FLOATS, guard=_is_gated, form=FEW_ROWS),
    Row("gated projection: one row", ("swiglu_packed",), lambda spec, dv, tiles: _swiglu(spec, dv, tiles.one_row),
        dtypes=FLOATS, guard=lambda spec, tiles: bool(tiles.one_row) and _is_gated(spec), form=ONE_ROW),
)


def _is_dense(in_types) -> bool:
    """x (..., K) @ W (K, N) with a static K and N and at least one leading dim in x."""
    x, w = in_types[0], in_types[1]
    return (w.rank == 2 and x.rank >= 2 and isinstance(w.shape[0], int) and isinstance(w.shape[1], int)
            and x.shape[-1] == w.shape[0])


def _is_packed_dense(in_types) -> bool:
    """x (..., K) @ W in panels of PANEL_WIDTH (``pack_panels``), x with at least one leading dim."""
    return in_types[1].rank == 3 and in_types[1].shape[2] == PANEL_WIDTH and in_types[0].rank >= 2


def _packed_linear(attrs: dict, in_types, out_type: TensorType, dim_vars: DimVars, tile: tuple,
                   prefetch: bool = False) -> tirx.PrimFunc:
    """``linear_packed`` as the dense kernel over its packed panels with a ``tile`` (rows, columns) register tile."""
    return dense(in_types, out_type, dim_vars, bias=len(in_types) == 3, activation=attrs.get("activation", "none"),
                 packed=True, tile_m=tile[0], tile_n=tile[1], prefetch=prefetch)



def dense(in_types, out_type: TensorType, dim_vars: DimVars, *, bias: bool, activation: str,
          packed: bool = False, tile_m: int = TILE_M, tile_n: int = TILE_N, prefetch: bool = False,
          gated: bool = False, gate_half: int = 0) -> tirx.PrimFunc:
    """activation(x @ W [+ b]) for x (..., K) and W (K, N), leading dims of x flattened into M.

    Loop nest: N panels of TILE_N columns in parallel; in each, the K x TILE_N panel of W is packed
    contiguous once, then every TILE_M-row block of x runs a K loop of rank-1 updates into a register
    tile, and the write back applies bias and activation.  M is symbolic: it is padded up to a
    multiple of TILE_M with clamped reads (see the module docstring); N need not divide TILE_N either.
    ``packed``: W comes already in panels (``linear_packed``: (ceil(N/TILE_N), K, TILE_N), packed once
    when the weights are bound), so nothing is packed per call; then the register tile may be
    ``tile_m`` x ``tile_n`` (several panels side by side: the few-rows variant is 1 x 64).
    ``prefetch`` (packed, K a multiple of ``PREFETCH_EVERY``): each row block also prefetches a stretch of the
    next column tile's weights (``_prefetch_next_tile``), so the worker's next tile does not start on
    weights cold from memory.
    ``gated`` (``swiglu_packed``, packed, N a whole number of panels): W has 2N columns in two halves, the gate's
    the first or (``gate_half=1``) the second; the register tile holds both halves' products for its N columns
    (``tile_m`` x 2 x ``tile_n``), and the write back is ``silu(gate) * value``.
    """
    assert packed or tile_n == TILE_N, "per-call packing makes panels of the tile's width"
    assert not gated or (packed and activation == "none"), "the gate reads packed panels, no other activation"
    x_t, w_t = in_types[0], in_types[1]
    dtype = out_type.dtype
    lead = dim_vars.shape(x_t.shape[:-1])
    K, N = (w_t.shape[1], out_type.shape[-1]) if packed else w_t.shape
    M = positions(lead)
    panels = (N + TILE_N - 1) // TILE_N  # gated: of each half
    n_pad = (N + tile_n - 1) // tile_n * tile_n  # whole register tiles; reads past the last panel are clamped
    m_pad = M + (tile_m - 1)  # room for the last, partial row tile
    # Flat 2-D views for the compute; the parameters get their N-D shapes back at the end.
    X = xs = te.placeholder((M, i64(K)), x_t.dtype, name="in0")
    if x_t.dtype != dtype:  # half-precision x (float16, bfloat16): widened once, a pass over it before the products,
        xs = te.compute((M, i64(K)), lambda m, kk: X[m, kk].astype(dtype), name="x_wide")  # rather than at each use
    halves = 2 if gated else 1
    B = te.placeholder((i64(halves * N),), dtype, name="in2") if bias else None
    # Narrower panels (float16, bfloat16) read by many rows are widened once per column tile, into a float32 copy
    # of the tile's panels, rather than at each use (float16's conversion would compete with the FMAs).
    widen_once = packed and w_t.dtype != dtype and tile_m > 1
    if packed:
        W = panel = te.placeholder((i64(halves * panels), i64(K), i64(TILE_N)), w_t.dtype, name="in1")
        if widen_once:
            panel = te.compute(W.shape, lambda p, kk, c: W[p, kk, c].astype(dtype), name="widened")
    else:
        W = te.placeholder((i64(K), i64(N)), dtype, name="in1")
        panel = te.compute((i64(panels), i64(K), i64(TILE_N)),
                           lambda p, k, c: W[k, tirx.min(p * TILE_N + c, i64(N - 1))], name="packed")
    k = te.reduce_axis((0, i64(K)), name="k")
    if n_pad > panels * TILE_N:
        def w_at(n):  # float16 panels are widened in the register (vcvtph2ps)
            return panel[tirx.min(n // TILE_N, i64(panels - 1)), k, n % TILE_N].astype(dtype)
    else:
        def w_at(n):
            return panel[n // TILE_N, k, n % TILE_N].astype(dtype)
    if gated:  # half h of column n: panel h * panels + n // TILE_N
        def w_half(h, n):
            return panel[h * i64(panels) + tirx.min(n // TILE_N, i64(panels - 1)), k, n % TILE_N].astype(dtype)
        acc = te.compute((m_pad, i64(2), i64(n_pad)),
                         lambda m, h, n: te.sum(xs[tirx.min(m, M - 1), k] * w_half(h, n), axis=k), name="acc")
    else:
        acc = te.compute((m_pad, i64(n_pad)), lambda m, n: te.sum(xs[tirx.min(m, M - 1), k] * w_at(n), axis=k),
                         name="acc")
    act = ACTIVATIONS[activation]
    if gated:
        def half(m, h, n):
            return acc[m, h, n] + B[h * i64(N) + n] if bias else acc[m, h, n]

        def gate(m, n):
            g = half(m, gate_half, n)
            return g * tirx.sigmoid(g) * half(m, 1 - gate_half, n)
        out = te.compute((M, i64(N)), gate, name="out")
    elif bias:
        out = te.compute((M, i64(N)), lambda m, n: act(acc[m, n] + B[n]), name="out")
    else:
        out = te.compute((M, i64(N)), lambda m, n: act(acc[m, n]), name="out")
    f = te.create_prim_func([X, W] + ([B] if bias else []) + [out])

    sch = s_tir.Schedule(f)
    no, mo, ni, ab = register_tiles(sch, tile_m, tile_n)
    ob = sch.get_sblock("out")
    if gated:  # the halves' loop beside the rows', both unrolled: every accumulator in a register
        loops = sch.get_loops(ab)
        am, ah, an, ak = loops[-4:] if tile_m > 1 else (None, *loops[-3:])
        sch.reorder(ak, *([am] if am is not None else []), ah, an)
        for loop in (am, ah):
            if loop is not None:
                sch.unroll(loop)
        prefetch = False
    elif tile_m > 1:
        am, an, ak = sch.get_loops(ab)[-3:]
        sch.reorder(ak, am, an)
        sch.unroll(am)
        if prefetch and packed and not widen_once and K % PREFETCH_EVERY == 0:
            ak, aki = sch.split(ak, [None, PREFETCH_EVERY])
            sch.unroll(aki)
        else:
            prefetch = False
    else:  # compute_at dropped the row loop of extent 1
        an, ak = sch.get_loops(ab)[-2:]
        sch.reorder(ak, an)
    if tile_n > TILE_N:  # one vector loop per panel, the panels unrolled
        ap, an = sch.split(an, [None, TILE_N])
        sch.unroll(ap)
    sch.vectorize(an)
    if not packed or widen_once:
        pb = sch.get_sblock("packed" if not packed else "widened")
        sch.compute_at(pb, no)
        sch.vectorize(sch.get_loops(pb)[-1])
        itemsize = 8 if dtype == "float64" else 4
        if halves * K * tile_n * itemsize <= MAX_STACK_PANEL_BYTES:
            # One column tile's panels per worker iteration, on its stack: no per-call heap buffer of K x N.
            sch.set_scope(pb, 0, "local")
    sch.vectorize(ni)
    sch.parallel(no)
    zeroed(sch, ab, ak)
    reads_x = sch.get_sblock("acc_update")
    if xs is not X and tile_m <= 2:  # a decode step's few rows: widened at each use (no pass over 1-8 rows)
        sch.compute_inline(sch.get_sblock("x_wide"))
    elif xs is not X:
        reads_x = sch.get_sblock("x_wide")
        rows, cols = sch.get_loops(reads_x)
        sch.parallel(rows)
        if K % TILE_N == 0:
            sch.vectorize(sch.split(cols, [None, TILE_N])[1])
    if len(lead) > 1:
        # Give x and the output their N-D shapes (dims shared with the graph's other kernels).
        sch.transform_layout(ob, ("write", 0), lambda m, n: unravel(m, lead) + (n,))
        sch.transform_layout(reads_x, ("read", read_index(sch, reads_x, "in0")), lambda m, k: unravel(m, lead) + (k,))
    func = sch.mod["main"]
    if prefetch:
        ub = sch.get_sblock("acc_update")
        w = sch.get(ub).reads[read_index(sch, ub, "in1")].source
        loop_vars = [sch.get(lp).loop_var for lp in (no, mo, ak)]
        func = _prefetch_next_tile(func, w, *loop_vars, K=K, panels=panels, tile_panels=tile_n // TILE_N)
    return fast_math(func) if dtype == "float32" else func


#: k steps between two prefetches of the dense kernel (``_prefetch_next_tile``): the K loop is unrolled by as much.
PREFETCH_EVERY = 8


def _prefetch_next_tile(func, w, tile, block, k_outer, *, K: int, panels: int, tile_panels: int):
    """``func`` (the packed dense kernel, reading the weights ``w``) with a prefetch of one weight row (TILE_N
    values) of the next column tile at every ``PREFETCH_EVERY`` k steps: row block ``m`` of tile ``n`` fetches rows ``m * K / PREFETCH_EVERY``
    onwards of tile ``n + 1``, so the first blocks of a tile bring in all of the next one, each a little
    (a worker's tiles are consecutive, ``parallel`` splits them in contiguous ranges).  The address is
    clamped to the weights; a prefetch is a hint and never faults.  Why: a tile's first row block otherwise
    waits for each weight line from memory.  Measured (AVX2 tiles, weights cold, 2 threads, same process):
    12-20% faster at 128 rows, within 2% at 512-4096."""
    import tvm_ffi
    total = panels * K * TILE_N

    def visit(loop, mutator):
        if not loop.loop_var.same_as(k_outer):
            return mutator.default_mutate(loop)
        tile_size = tile_panels * K * TILE_N
        # Row (block * K / PREFETCH_EVERY + k_outer) of the next tile, within it (later blocks fetch its last
        # row again: an L1 hit) and within the weights; the panels are contiguous, so the flat weights are
        # indexed through the last axis.
        row = tirx.min((block * i64(K // PREFETCH_EVERY) + k_outer) * i64(TILE_N), i64(tile_size - TILE_N))
        offset = tirx.min((tile + 1) * i64(tile_size) + row, i64(total - TILE_N))
        addr = tirx.address_of(tirx.BufferLoad(w, [i64(0), i64(0), offset]))
        hint = tirx.call_llvm_intrin("void", "llvm.prefetch.p0", addr, tirx.const(0, "int32"),
                                     tirx.const(3, "int32"), tirx.const(1, "int32"))  # read, keep in L1, data
        body = tirx.SeqStmt([tirx.Evaluate(hint), loop.body])
        fetching = tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, body, loop.thread_binding, loop.annotations)
        # Only the first blocks fetch (enough to cover the next tile); the rest run the plain loop, whose
        # accumulators LLVM keeps in registers (a call that may read memory makes it store them first).
        blocks = tile_panels * PREFETCH_EVERY
        return tirx.IfThenElse(block < i64(blocks), fetching, loop)
    return tvm_ffi.structural_mutate(func, (tirx.For, visit))


def weight_grad(in_types, out_type: TensorType, dim_vars: DimVars, tile: tuple) -> tirx.PrimFunc:
    """x^T g for x (..., K), g (..., N) over every leading position (a projection's weight gradient), without
    transposing x: column panels in parallel; in each, ``tile`` = (rows, columns) register tiles of the
    (static) output, each a loop over the positions of rank-1 updates x[p, k:k+rows] g[p, n:n+columns], both
    contiguous rows.  A worker's g panel (positions x columns) stays in cache over its row blocks; where the
    columns do not fill whole tiles, the panel is first copied out clamped (so that no read is clamped per
    element, which would keep the loop from loading whole vectors)."""
    tile_k, tile_n = tile
    x_t, g_t = in_types
    dtype = out_type.dtype
    lead = dim_vars.shape(x_t.shape[:-1])
    M = positions(lead)
    K, N = out_type.shape
    k_pad = (K + tile_k - 1) // tile_k * tile_k
    n_pad = (N + tile_n - 1) // tile_n * tile_n
    X = te.placeholder((M, i64(K)), dtype, name="in0")
    G = te.placeholder((M, i64(N)), dtype, name="in1")
    p = te.reduce_axis((0, M), name="p")
    ragged = N % tile_n != 0
    if ragged:  # g copied into whole column panels, clamped there, so the loop reads whole vectors
        panels = n_pad // tile_n
        packed = te.compute((i64(panels), M, i64(tile_n)),
                            lambda c, q, l: G[q, tirx.min(c * tile_n + l, i64(N - 1))], name="packed")

        def g_at(j):
            return packed[j // tile_n, p, j % tile_n]
    else:
        def g_at(j):
            return G[p, j]

    def x_at(i):  # the last, partial row tile reads clamped rows (its results are not written back)
        return X[p, i if K % tile_k == 0 else tirx.min(i, i64(K - 1))]
    acc = te.compute((i64(k_pad), i64(n_pad)), lambda i, j: te.sum(x_at(i) * g_at(j), axis=p), name="acc")
    out = te.compute((i64(K), i64(N)), lambda i, j: acc[i, j], name="out")
    sch = s_tir.Schedule(te.create_prim_func([X, G, out]))
    jo, _, ji, ab = register_tiles(sch, tile_k, tile_n)
    am, an, ak = sch.get_loops(ab)[-3:]
    sch.reorder(ak, am, an)
    sch.unroll(am)
    if tile_n > TILE_N:  # one vector loop per TILE_N columns, unrolled
        ap, an = sch.split(an, [None, TILE_N])
        sch.unroll(ap)
    sch.vectorize(an)
    sch.vectorize(ji)
    if ragged:  # one panel per worker iteration
        pb = sch.get_sblock("packed")
        sch.compute_at(pb, jo)
        sch.vectorize(sch.get_loops(pb)[-1])
    sch.parallel(jo)
    zeroed(sch, ab, ak)
    if len(lead) > 1:
        ub = sch.get_sblock("acc_update")
        sch.transform_layout(ub, ("read", read_index(sch, ub, "in0")), lambda m, c: unravel(m, lead) + (c,))
        reader = sch.get_sblock("packed") if ragged else ub
        sch.transform_layout(reader, ("read", read_index(sch, reader, "in1")), lambda m, c: unravel(m, lead) + (c,))
    func = sch.mod["main"]
    return fast_math(func) if dtype == "float32" else func


def scatter_rows(in_types, out_type: TensorType, dim_vars: DimVars, lanes: int = 16) -> tirx.PrimFunc:
    """``scatter_add`` (an embedding's gradient) as the loop PyTorch's CPU backward runs, not as a reduction
    over every position for every row: zero the table, then each worker owns a strip of ``lanes``
    columns and adds every position's strip into the row its index names, in position order (so the sums
    are the same on every run).  An index outside the table is skipped (the executor rejects it before
    the forward's gather)."""
    idx_t, values_t, _ = in_types
    rows, width = out_type.shape
    dtype = out_type.dtype
    zero = tirx.const(0, dtype)
    strip = lanes if width % lanes == 0 else width
    idx = te.placeholder(dim_vars.shape(idx_t.shape), idx_t.dtype, name="in0")
    values = te.placeholder(dim_vars.shape(values_t.shape), dtype, name="in1")
    table = te.placeholder((i64(rows), i64(width)), dtype, name="in2")

    def loop(name, extent, kind, body_of):
        var = tirx.Var(name, "int64")
        return tirx.For(var, i64(0), extent, kind, body_of(var))

    def body(ins, outs):
        index, vals, _ = ins
        (out,) = outs
        inner = tirx.ForKind.VECTORIZED if strip == lanes else tirx.ForKind.SERIAL
        clear = loop("r", i64(rows), tirx.ForKind.PARALLEL, lambda r: loop(
            "c", i64(width), tirx.ForKind.SERIAL, lambda c: tirx.BufferStore(out, zero, [r, c])))

        def add_position(pos, column_strip):
            row = tirx.Var("row", "int64")

            def add(c):
                col = column_strip * i64(strip) + c
                return tirx.BufferStore(out, tirx.BufferLoad(out, [row, col]) + tirx.BufferLoad(vals, pos + [col]),
                                        [row, col])
            inside = tirx.all(row >= i64(0), row < i64(rows))
            return tirx.SeqStmt([tirx.Bind(row, tirx.BufferLoad(index, pos).astype("int64")),
                                 tirx.IfThenElse(inside, loop("c", i64(strip), inner, add), None)])

        def positions(column_strip, axis=0, pos=()):
            if axis == len(idx.shape):
                return add_position(list(pos), column_strip)
            return loop(f"p{axis}", idx.shape[axis], tirx.ForKind.SERIAL,
                        lambda p: positions(column_strip, axis + 1, pos + (p,)))
        scatter = loop("strip", i64(width // strip), tirx.ForKind.PARALLEL, positions)
        return tirx.SeqStmt([clear, scatter])
    out = te.extern((i64(rows), i64(width)), [idx, values, table], body, name="out", dtype=dtype)
    return te.create_prim_func([idx, values, table, out])


def _swaps_last_two(perm) -> bool:
    rank = len(perm)
    return rank >= 2 and tuple(perm) == tuple(range(rank - 2)) + (rank - 1, rank - 2)


def transpose_blocks(in_types, out_type: TensorType, dim_vars: DimVars, block: int = 16) -> tirx.PrimFunc:
    """A transpose of the last two (static) axes, a weight's for the input gradient g @ W^T, in blocks of
    ``block`` x ``block``: the rows a block reads stay in cache while it writes its columns, where the
    generic schedule strides through the whole input for every output row (0.14 ms instead of 0.41 at
    256 x 1024, AVX-512; where the axes are a sequence and a head dim the generic one is faster)."""
    (x,) = [te.placeholder(dim_vars.shape(t.shape), t.dtype, name="in0") for t in in_types]
    out = lower("transpose", {"perm": tuple(range(out_type.rank - 2)) + (out_type.rank - 1, out_type.rank - 2)},
                [x], out_type, dim_vars, name="out")
    sch = s_tir.Schedule(te.create_prim_func([x, out]))
    for stage in sch.get_child_blocks(sch.get_sblock("root"))[:-1]:  # a half type's widening and the transpose in
        sch.compute_inline(stage)                                     # float32: into the copy, not passes of their own
    ob = sch.get_sblock("out")
    *lead, a, b = sch.get_loops(ob)
    ao, ai = sch.split(a, [None, block])
    bo, bi = sch.split(b, [None, block])
    sch.reorder(ao, bo, ai, bi)
    outer = sch.fuse(*lead, ao) if lead else ao
    sch.parallel(outer)
    if isinstance(out_type.shape[-1], int) and out_type.shape[-1] % block == 0:
        sch.vectorize(bi)
    return sch.mod["main"]


def batched_matmul(in_types, out_type: TensorType, dim_vars: DimVars) -> tirx.PrimFunc:
    """a (..., M, K) @ b (..., K, N) with batch dims broadcast (attention's Q K^T and P V when not
    fused): every output row in parallel, as a sum over K of a[k] * b[k, :], contiguous along N
    (vectorized when N is static, left to LLVM's loop vectorizer when N is a sequence length)."""
    phs = [te.placeholder(dim_vars.shape(t.shape), t.dtype, name=f"in{i}") for i, t in enumerate(in_types)]
    out = lower("matmul", {}, phs, out_type, dim_vars, name="out")
    sch = s_tir.Schedule(te.create_prim_func(phs + [out]))
    ob = sch.get_sblock("out")
    loops = sch.get_loops(ob)
    rows = loops[:out_type.rank - 1]
    row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
    sch.parallel(row)
    vectorize_weighted_sum(sch, ob)
    return sch.mod["main"]


def rowwise(op: str, attrs: dict, in_types, out_type: TensorType, dim_vars: DimVars,
            reduces_row: bool = False) -> tirx.PrimFunc:
    """The generic lowering of ``op`` scheduled one output row at a time, rows in parallel.

    Every stage before the output is computed at the row loop, so its buffer is one row.  With
    ``reduces_row`` each output element is the reduction of a row of the first operand (``cross_entropy``: a
    position's loss over the vocabulary), so the row loop runs over every output axis.
    """
    phs = [te.placeholder(dim_vars.shape(t.shape), t.dtype, name=f"in{i}") for i, t in enumerate(in_types)]
    out = lower(op, attrs, phs, out_type, dim_vars, name="out")
    sch = s_tir.Schedule(te.create_prim_func(phs + [out]))
    stages = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    for name in stages[:-1]:
        if has_block(sch, name) and is_reduction(sch, sch.get_sblock(name)):
            split_row_reduction(sch, sch.get_sblock(name))
    last = stages[-1]
    stages = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    ob = sch.get_sblock(last)
    # all but the last output axis (and any reduction); every output axis where an element is a row's reduction
    loops = sch.get_loops(ob)[:out_type.rank if reduces_row else out_type.rank - 1]
    row = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    sch.parallel(row)
    if not is_reduction(sch, ob) and not reduces_row:
        vectorize_static(sch, sch.get_loops(ob)[-1])
    for name in reversed([n for n in stages if has_block(sch, n) and n != last]):
        blk = sch.get_sblock(name)
        sch.compute_at(blk, row, preserve_unit_loops=True)
    for name in [n for n in stages if has_block(sch, n)]:
        blk = sch.get_sblock(name)
        inner = sch.get_loops(blk)[-1]
        if name.endswith("_rf"):
            # compute_at ordered the loops as the block's iters: lanes, (unit row loops), reduction.
            loops = sch.get_loops(blk)
            depth = 1 + [sch.get(lp).same_as(sch.get(row)) for lp in loops].index(True)
            below = loops[depth:]
            ri, ro = below[0], below[-1]
            sch.reorder(ro, ri)
            sch.vectorize(ri)
            sch.decompose_reduction(blk, ro)
        elif name != last and not is_reduction(sch, blk):
            vectorize_static(sch, inner)
    func = sch.mod["main"]
    return fast_math(func) if out_type.dtype == "float32" else func


def write_slice(in_types, out_type: TensorType, axis: int, dim_vars: DimVars) -> tirx.PrimFunc:
    """``update_slice`` in place: the output is the cache operand's own memory (the executor passes the
    same tensor for both), so only ``value`` is written, at ``offset`` along ``axis``; the rest of
    the cache is never touched.  Same parameters as the copying kernel: cache, value, offset, out.
    The executor checks the offset on the host before the call (``IndexOutOfRange``).

    Its pointers are declared ``noalias`` as every other kernel's: the cache parameter, the one that aliases
    ``out``, is never read or written through.  (Without the attribute, TVM 0.27's LLVM code generator drops
    ``noalias`` for the whole module: every projection's register tile was then stored to memory after each
    multiply-add, 2.3x slower, in any module that held this kernel: every decode step.)"""
    cache_t, value_t, offset_t = in_types
    axis %= cache_t.rank
    cache = tirx.decl_buffer(dim_vars.shape(cache_t.shape), cache_t.dtype, name="in0")
    value = tirx.decl_buffer(dim_vars.shape(value_t.shape), value_t.dtype, name="in1")
    offset = tirx.decl_buffer((), offset_t.dtype, name="in2")
    out = tirx.decl_buffer(dim_vars.shape(out_type.shape), out_type.dtype, name="out")
    loops = [tirx.Var(f"i{a}", "int64") for a in range(value_t.rank)]
    start = tirx.Cast("int64", tirx.BufferLoad(offset, []))
    dest = [v + start if a == axis else v for a, v in enumerate(loops)]
    body = tirx.BufferStore(out, tirx.BufferLoad(value, loops), dest)
    for a in reversed(range(value_t.rank)):
        extent = value.shape[a]
        kind = tirx.ForKind.PARALLEL if a == 0 and value_t.rank > 1 else tirx.ForKind.SERIAL
        body = tirx.For(loops[a], tirx.IntImm("int64", 0), extent, kind, body)
    return tirx.PrimFunc([cache, value, offset, out], body).with_attr("tirx.noalias", True)
