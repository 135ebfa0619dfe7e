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
