"""Register tiles measured on this CPU (``attngraph tune-tiles``): each field of ``CpuTiles`` timed over a few
candidate tiles on transformer-base's kernels, and the fastest of each kept, with every measurement, in the user's
cache for this CPU (``ATTNGRAPH_CACHE``, by default ``~/.cache/attngraph/cpu-tiles/``).  Builds for this CPU
(``llvm``) then use them (``LLVMTarget.tiles``); ``llvm:CPU`` builds, and builds on a CPU where nothing was
measured, keep the table's (``tiles.py``).  ``ATTNGRAPH_TILES=table`` ignores the measurements.  Reading the record
imports no TVM: a build's stamp includes it (``measured_tiles``), so a rebuild after a tuning is not skipped as up to
date."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import time

from .....files import our_json, write_file

#: Candidates per instruction set and field, the table's own among them; (rows, columns) of float32 accumulators.
CANDIDATES = {
    "avx512": {"dense": [(4, 64), (6, 64), (8, 32), (6, 32), (4, 32)],
               "few_rows": [(2, 64), (1, 64), (4, 32), (2, 32)],
               "one_row": [(1, 64), (1, 32), (1, 128)],
               "attention": [(8, 32), (6, 32), (4, 32), (8, 16)],
               "weight_grad": [(4, 64), (8, 32), (6, 32), (12, 16)]},
    "avx2": {"dense": [(6, 16), (4, 16), (2, 32), (3, 32)],
             "few_rows": [(2, 32), (1, 32), (2, 16)],
             "attention": [(6, 16), (4, 16), (5, 16), (4, 8)],
             "weight_grad": [(6, 16), (4, 16), (3, 32), (8, 8)]},
}

#: What each field is measured on, at each of the sizes it serves: transformer-base's FFN projection (512 -> 2048,
#: ReLU) at 64 and 512 rows and at 2, 4 and 8 (the few-rows form's), a 512 -> 8192 projection at one row (a decode
#: step's wide read), its attention over 128 and 512 positions (8 heads of 64, q, k and v read in a merged
#: projection), and the FFN weight's gradient over 512 positions.  A field's time is the sum over its sizes.
SIZES = {"dense": [{"batch": 1, "seq": 64}, {"batch": 1, "seq": 512}],
         "few_rows": [{"batch": 1, "seq": 2}, {"batch": 1, "seq": 4}, {"batch": 1, "seq": 8}],
         "one_row": [{"batch": 1, "seq": 1}],
         "attention": [{"batch": 1, "seq": 128}, {"batch": 1, "seq": 512}],
         "weight_grad": [{"batch": 2, "seq": 256}]}

#: A candidate replaces the table's tile only when this much faster (timing noise must not churn the tiles).
MARGIN = 1.03


def record_path() -> str | None:
    """This CPU's record in the cache (None: caching is off)."""
    from ...cache import cache_root
    from ...stamp import host_identity
    root = cache_root()
    if root is None:
        return None
    return os.path.join(root, "cpu-tiles", hashlib.sha256(host_identity().encode()).hexdigest()[:16] + ".json")


def measured() -> dict | None:
    """This CPU's record (``{"isa": ..., "tiles": {field: [rows, columns]}, "gflops": ..., ...}``), or None where
    nothing was measured, caching is off, or ``ATTNGRAPH_TILES=table``; a damaged record counts as none."""
    path = record_path()
    if os.environ.get("ATTNGRAPH_TILES", "").lower() == "table" or path is None:
        return None
    record = our_json(path, ("tiles",))
    return record if record is not None and isinstance(record["tiles"], dict) else None


def measured_tiles() -> dict | None:
    """The tiles of this CPU's record ({field: [rows, columns]}), or None."""
    record = measured()
    return None if record is None else record.get("tiles")


def apply(tiles, record: dict | None):
    """``tiles`` (a ``CpuTiles``) with the fields ``record`` measured for its instruction set."""
    if not record or record.get("isa") != tiles.isa:
        return tiles
    known = {f.name for f in dataclasses.fields(tiles)}
    chosen = {k: tuple(v) for k, v in record["tiles"].items()
              if k in known and isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v)}
    return dataclasses.replace(tiles, **chosen)


def _specs() -> dict:
    """{field: (KernelSpec, form)}: the kernels each field is measured on (their dims ``SIZES``)."""
    from .....ir import TensorType
    from .....models import get
    from .....nn import trace
    from .....passes import optimize
    from ...plan import FEW_ROWS, ONE_ROW, KernelSpec
    from .. import get_target
    from ..table import MAIN
    from .tiles import PANEL_WIDTH

    def f32(*shape):
        return TensorType(shape, "float32")

    def projection(k, n):
        return KernelSpec(f"linear_{k}x{n}", "linear_packed", {"activation": "relu", "n": n},
                          (f32("batch", "seq", k), f32(n // PANEL_WIDTH, k, PANEL_WIDTH), f32(n)), f32("batch", "seq", n))
    layer, _ = optimize(trace(get("transformer-base-encoder-layer")), 3, layout=get_target("llvm").layout_passes())
    attention = next(n for n in layer.nodes() if n.op == "fused_attention")
    attention = KernelSpec("attention", "fused_attention", dict(attention.attrs),
                           tuple(layer.node(o).type for o in layer.operands(attention.id)), attention.type)
    grad = KernelSpec("weight_grad", "weight_grad", {}, (f32("batch", "seq", 512), f32("batch", "seq", 2048)),
                      f32(512, 2048))
    return {"dense": (projection(512, 2048), MAIN), "few_rows": (projection(512, 2048), FEW_ROWS),
            "one_row": (projection(512, 8192), ONE_ROW), "attention": (attention, MAIN), "weight_grad": (grad, MAIN)}


def tune(rounds: int = 7, say=print) -> dict:
    """Time every candidate of every field on this CPU (``rounds`` interleaved rounds, each the median of 5 calls
    at each size; a candidate's best round counts), write the record with the fastest of each (the table's unless
    another is ``MARGIN`` faster), and return it."""
    import numpy as np
    import tvm

    from .....threads import ensure_threads, get_num_threads
    from ...kernel import finish
    from ...runtime.executor import flops
    from ...shapes import DimVars
    from .. import get_target
    from ..table import MAIN
    from .kernels import KERNELS
    from .isa import cpu_name
    from .tiles import cpu_tiles
    ensure_threads()  # the threads a build's kernels run on
    target = get_target("llvm")
    table = cpu_tiles(target.tvm_target)  # the table's, whatever was measured before
    rng = np.random.default_rng(0)
    record = {"isa": table.isa, "cpu": cpu_name(), "llvm_cpu": str(target.tvm_target.mcpu),
              "threads": get_num_threads(),
              "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "tiles": {}, "gflops": {}}
    for field, (spec, form) in _specs().items():
        own = getattr(table, field)
        candidates = CANDIDATES[table.isa].get(field)
        if not candidates or own is None:
            continue
        cases = []  # (arguments, floating-point work) at each size
        for sizes in SIZES[field]:
            shapes = [t.concrete(sizes) for t in spec.in_types]
            out = spec.out_type.concrete(sizes)
            args = [tvm.runtime.tensor(rng.standard_normal(s).astype(np.float32)) for s in shapes]
            cases.append((args + [tvm.runtime.empty(out, "float32")], flops(spec.op, spec.attrs, shapes, out)))
        dv = DimVars()
        runs = {}
        for tile in candidates:
            ctx = dataclasses.replace(table, **{field: tile})
            try:
                func = KERNELS.kernel(spec, dv, ctx) if form == MAIN else KERNELS.forms(spec, dv, ctx).get(form)
                if func is not None:
                    runs[tile] = tvm.compile(tvm.IRModule({"k": finish(func, spec, dv, "k")}),
                                             target=target.tvm_target)["k"]
            except Exception as e:  # noqa: BLE001 - a tile this kernel cannot take: say so, time the others
                say(f"  {field} {tile[0]} x {tile[1]}: does not build ({type(e).__name__})")
        seconds = {tile: [] for tile in runs}
        for _ in range(rounds):
            for tile, fn in runs.items():
                total = 0.0
                for args, _ in cases:
                    fn(*args)
                    samples = []
                    for _ in range(5):
                        start = time.perf_counter()
                        fn(*args)
                        samples.append(time.perf_counter() - start)
                    total += float(np.median(samples))
                seconds[tile].append(total)
        work = sum(w for _, w in cases)
        gflops = {tile: work / min(t) / 1e9 for tile, t in seconds.items()}  # the best round: the least disturbed
        fastest = max(gflops, key=gflops.get)
        best = fastest if own not in gflops or gflops[fastest] > MARGIN * gflops[own] else own
        record["tiles"][field] = list(best)
        record["gflops"][field] = {f"{r}x{c}": g for (r, c), g in gflops.items()}
        say(f"{field:12s} " + "  ".join(f"{r}x{c} {g:6.1f}" + ("*" if (r, c) == best else " ")
                                         for (r, c), g in gflops.items()) + f"  (table: {own[0]}x{own[1]})")
    path = record_path()
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_file(os.path.dirname(path), os.path.basename(path), json.dumps(record, indent=1, sort_keys=True).encode())
    return record

