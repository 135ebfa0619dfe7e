"""The one timing rule of the benchmarks: the median of repeated calls, after a warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(fn: Callable[[], object], repeat: int, warmup: int = 2, settle: float = 0.3,
              sync: Callable[[], None] | None = None) -> float:
    """Median milliseconds of ``fn()`` over ``repeat`` calls.  First ``settle`` seconds of sleep, so
    that the previous engine's worker threads stop spinning (OpenMP, ORT and TVM pools busy-wait
    for a while after their work) and no engine is timed against another one's idle spin; then
    ``warmup`` calls (allocations, kernel loading).  ``sync`` (a GPU's synchronize) runs after
    every call, inside the timing."""
    time.sleep(settle)
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def interleaved_ms(fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 2,
                   settle: float = 0.05, block: int = 3, warm: float = 0.025) -> dict[str, float]:
    """Median milliseconds of each engine in ``fns``, timed in rounds (one block of calls of each
    engine per round) rather than one engine after the other: on a shared machine whose speed drifts,
    every engine then sees the same slow and fast phases, so the ratios hold even when the absolute
    times do not.  Each block starts after ``settle`` seconds of sleep (the previous engine's worker
    threads stop spinning) with untimed calls for ``warm`` seconds (at least one), then times ``block``
    calls back to back.  A model is served by repeated calls, and on 2 cores the first calls after
    another engine ran are slowed by that engine's threads and by waking this one's own (BERT-size
    encoder, batch 1 x 128, single calls each right after the three other engines': attngraph 19-21
    ms, peers 18-21 ms, once 38; in warm blocks 13.6 and 16-17 ms, steady across runs), so every
    engine is timed warm, alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            time.sleep(settle)
            start = time.perf_counter()
            fn()
            while time.perf_counter() - start < warm:
                fn()
            for _ in range(block):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def kernel_totals(compiled, inputs, repeat: int = 5) -> dict:
    """{(kernel, op): (seconds, flops, calls)} of an attngraph build at ``inputs``: its kernel calls
    each timed alone (``CompiledModel.profile``, median of ``repeat`` runs), summed by distinct kernel."""
    per: dict = {}
    for k in compiled.profile(inputs, repeat=repeat):
        t, f, n = per.get((k.kernel, k.op), (0.0, 0, 0))
        per[(k.kernel, k.op)] = (t + k.seconds, f + k.flops, n + 1)
    return per
