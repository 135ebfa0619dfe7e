"""How many threads the compiled CPU kernels use, as ``torch.set_num_threads`` does for PyTorch.

TVM's thread pool reads ``TVM_NUM_THREADS`` when its first parallel kernel starts it; attngraph sets
that to every core this process may run on unless it is set already (TVM's own default is one thread
on some machines).  ``set_num_threads`` works before and after the pool has started (a started pool can
shrink and grow back, not grow past its size).
"""

from __future__ import annotations

import os
import sys


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def ensure_threads() -> None:
    """Use every core unless ``TVM_NUM_THREADS`` says otherwise; before the pool starts."""
    if os.environ.get("TVM_NUM_THREADS") is None:
        os.environ["TVM_NUM_THREADS"] = str(available_cores())


def set_num_threads(n: int) -> None:
    """Run the compiled CPU kernels on ``n`` threads from now on.

    A pool already running is resized; it cannot grow past the threads it started with (every core,
    unless ``TVM_NUM_THREADS`` said fewer), and asking for more warns.  Before TVM is imported this
    only sets ``TVM_NUM_THREADS``, so the pool starts with ``n``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of threads must be a positive integer, got {n!r}")
    if "tvm" not in sys.modules:
        os.environ["TVM_NUM_THREADS"] = str(n)
        return
    import tvm_ffi
    ensure_threads()  # a pool not started yet starts with every core, so that it can grow back later
    tvm_ffi.get_global_func("runtime.config_threadpool")(1, n)  # 1: every (big) core
    got = get_num_threads()
    if got < n:
        import warnings
        warnings.warn(f"TVM's thread pool in this process has {got} threads and cannot grow to {n}; set "
                      f"TVM_NUM_THREADS={n} (or attngraph --threads {n}) before the first compiled call",
                      RuntimeWarning, stacklevel=2)


def get_num_threads() -> int:
    """The threads the compiled CPU kernels run on."""
    if "tvm" in sys.modules:
        import tvm_ffi
        ensure_threads()  # asking starts the pool: with every core, as a compiled call would
        return int(tvm_ffi.get_global_func("runtime.NumThreads")())
    return int(os.environ.get("TVM_NUM_THREADS") or available_cores())
