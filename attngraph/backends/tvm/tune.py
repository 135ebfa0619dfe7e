"""Opt-in auto-tuning with TVM MetaSchedule (``attngraph tune``), reused by later builds.

MetaSchedule searches schedules for static shapes, so each distinct kernel is tuned at fixed sizes
(the model's default dims, or ``--dim``): its generic tensor expression with the dims made
constants.  The best schedule found is timed against the kernel a build uses anyway (hand-scheduled
or generic) at the same sizes; ``results.json`` beside the database keeps both times.  A build with
``tuning_db`` adds, for each kernel whose tuned schedule won, a static variant compiled from the
database; the executor calls it when a run's dims are exactly the tuned ones and the symbolic
kernel otherwise.  So tuning can only make the tuned sizes faster, and every other size is as before.

Works around what TVM_NOTES.md §5 found: the default builder imports the tensor intrinsics (35 s)
in every worker, so builds use ``fast_build``; the cost model is "random" (xgboost is not installed).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from ...ir import Graph
from .. import BuildError
from .kernel import generic_func, kernel_func
from .plan import KernelSpec, plan_kernels
from .targets import get_target
from .cache import cache_root
from .shapes import DimVars


class StaticDims(DimVars):
    """DimVars whose symbols are the given constants: the kernel at one fixed size."""

    def __init__(self, sizes: dict):
        super().__init__()
        self.sizes = dict(sizes)

    def var(self, name: str):
        from tvm import tirx
        if name not in self.sizes:
            raise KeyError(f"no size for dim {name!r}; give it with --dim {name}=INT")
        return tirx.IntImm("int64", self.sizes[name])


def fast_build(mod, target, _params):
    """MetaSchedule's builder without its 35 s import of the tensor intrinsics (unused on llvm)."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    return tvm.tirx.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def default_db(model: str, target: str) -> str:
    root = cache_root() or os.path.join(os.path.expanduser("~"), ".cache", "attngraph")
    return os.path.join(root, "tuning", f"{model}-{target}")


def _sizes_key(spec: KernelSpec, sizes: dict) -> dict:
    used = set().union(*(t.symbols for t in spec.in_types + (spec.out_type,)))
    return {d: int(sizes[d]) for d in sorted(used)}


def _static_module(spec: KernelSpec, sizes: dict):
    import tvm
    func = generic_func(spec, StaticDims(sizes))
    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def _record_key(spec: KernelSpec, sizes: dict) -> str:
    from ...ir.serialize import canonical
    text = json.dumps([spec.op, canonical(spec.attrs), [str(t) for t in spec.in_types], str(spec.out_type),
                       _sizes_key(spec, sizes)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _time_ms(func, spec: KernelSpec, sizes: dict, target, repeat: int = 20) -> float:
    """Median time of ``func`` (a PrimFunc at these sizes) on random operands."""
    import numpy as np
    import tvm
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    rng = np.random.default_rng(0)
    args = []
    for t in spec.in_types + (spec.out_type,):
        shape = t.concrete(sizes)
        if t.dtype == "bool":
            a = rng.random(shape) < 0.1
        elif t.is_float:
            a = rng.standard_normal(shape).astype(t.dtype)
        else:
            a = np.zeros(shape, t.dtype)
        args.append(tvm.runtime.tensor(a))
    fn = ex["main"]
    evaluator = ex.time_evaluator("main", tvm.cpu(), number=3, repeat=repeat) if hasattr(ex, "time_evaluator") else None
    if evaluator is not None:
        return float(np.median(evaluator(*args).results) * 1e3)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


@dataclass
class TuneResult:
    kernel: str
    op: str
    sizes: dict
    builtin_ms: float
    tuned_ms: float | None

    @property
    def used(self) -> bool:
        return self.tuned_ms is not None and self.tuned_ms < self.builtin_ms

    def __str__(self) -> str:
        sizes = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
        if self.tuned_ms is None:
            return f"{self.kernel} ({self.op} at {sizes}): built-in {self.builtin_ms:.3f} ms; tuning found nothing"
        verdict = "tuned schedule used" if self.used else "built-in schedule kept"
        return (f"{self.kernel} ({self.op} at {sizes}): built-in {self.builtin_ms:.3f} ms, "
                f"tuned {self.tuned_ms:.3f} ms: {verdict}")


def tune_graph(g: Graph, sizes: dict, db_dir: str, *, target: str = "llvm", trials: int = 64, ops=(),
               log: Callable[[str], None] = print) -> list[TuneResult]:
    """Tune each distinct kernel of ``g`` (those of ``ops`` if given) at ``sizes``; records go to
    ``db_dir`` (a MetaSchedule JSON database plus ``results.json``)."""
    from tvm.s_tir import meta_schedule as ms
    tgt = get_target(target).tvm_target
    tgt_ms = _with_cores(tgt)
    specs, _ = plan_kernels(get_target(target).layout(g))
    if ops:
        # "linear" names the projections also where the target packs their weights (linear_packed).
        def matches(spec, op):
            return spec.op == op or spec.op == f"{op}_packed"
        unknown = sorted(op for op in set(ops) if not any(matches(s, op) for s in specs))
        if unknown:
            raise BuildError(f"no kernel of op {', '.join(unknown)} in {g.name} (--kernel); its kernels' ops: "
                             f"{', '.join(sorted({s.op for s in specs}))}")
        specs = [s for s in specs if any(matches(s, op) for op in ops)]
    os.makedirs(db_dir, exist_ok=True)
    results_path = os.path.join(db_dir, "results.json")
    results = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
    out = []
    for i, spec in enumerate(specs):
        at = _sizes_key(spec, sizes)
        log(f"[{i + 1}/{len(specs)}] tuning {spec.name} ({spec.op}) at {at}, {trials} trials")
        mod = _static_module(spec, sizes)
        work = os.path.join(db_dir, "work")
        os.makedirs(work, exist_ok=True)
        db = ms.tune_tir(mod, tgt_ms, work, max_trials_global=trials, num_trials_per_iter=min(trials, 32),
                         builder=ms.builder.LocalBuilder(f_build=fast_build, max_workers=2, timeout_sec=120),
                         cost_model="random", num_tuning_cores=2,
                         database=ms.database.JSONDatabase(work_dir=work))
        sch = ms.tir_integration.compile_tir(db, mod, tgt_ms)
        builtin = _time_ms(kernel_func(spec._replace(name="main"), StaticDims(sizes), target), spec, sizes, tgt)
        tuned = _time_ms(sch.mod["main"], spec, sizes, tgt) if sch is not None else None
        r = TuneResult(spec.name, spec.op, at, builtin, tuned)
        results[_record_key(spec, sizes)] = {"kernel": spec.name, "op": spec.op, "sizes": at,
                                             "builtin_ms": builtin, "tuned_ms": tuned, "used": r.used}
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)
        out.append(r)
    return out


def _with_cores(tgt):
    import tvm
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return tvm.target.Target({**{k: v for k, v in tgt.export().items() if k in ("kind", "mcpu", "mattr", "keys")},
                              "num-cores": cores})


class TunedSchedules:
    """The tuned static variants a build adds, read from a database written by ``tune_graph``."""

    def __init__(self, db_dir: str, target):
        if not os.path.isdir(db_dir) or not os.path.exists(os.path.join(db_dir, "results.json")):
            raise FileNotFoundError(f"no tuning database at {db_dir!r}; create one with: attngraph tune MODEL --db {db_dir}")
        self.db_dir, self.target = db_dir, target
        with open(os.path.join(db_dir, "results.json")) as f:
            self.results = json.load(f)
        self._db = None

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.results, sort_keys=True).encode()).hexdigest()[:16]

    def variants(self, spec: KernelSpec) -> list[dict]:
        """The sizes at which ``spec`` has a tuned schedule that beat the built-in one."""
        return [r["sizes"] for key, r in self.results.items()
                if r["used"] and key == _record_key(spec, r["sizes"])]

    def static_func(self, spec: KernelSpec, sizes: dict):
        """The tuned PrimFunc of ``spec`` at ``sizes`` (None if the database has no record)."""
        from tvm.s_tir import meta_schedule as ms
        if self._db is None:
            self._db = ms.database.JSONDatabase(work_dir=os.path.join(self.db_dir, "work"))
        sch = ms.tir_integration.compile_tir(self._db, _static_module(spec, sizes), _with_cores(self.target))
        return None if sch is None else sch.mod["main"]
