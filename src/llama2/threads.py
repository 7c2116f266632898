"""One thread setting for the whole engine: BLAS, the native pool and the numba kernels.

Kept apart from `jit` so that choosing a thread count does not load numba: a prompt's first token
is computed with numpy and BLAS alone, and numba (about 0.4 s to import and start) loads with the
first decode step. `jit` applies the setting when it loads; so does `native` (our own pthread pool,
which sizes itself from `threads()` at import).
"""

import os
import sys

_requested = None


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(n: int = None) -> int:
    """Use `n` threads (default: the cores this process may run on) in BLAS and in our kernels.
    The native pool is one per process: its size follows the last call from any thread.
    numba's count is per calling thread: a thread that runs the model calls this itself."""
    global _requested
    _requested = n = n or available_cores()
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:  # BLAS keeps its own default
        pass
    native = sys.modules.get(__package__ + ".native")
    if native is not None:
        native.set_threads(n)
    jit = sys.modules.get(__package__ + ".jit")
    if jit is not None:
        jit.apply_threads(n)
    return n


def threads() -> int:
    """The thread count set last (default: the cores available)."""
    return _requested or available_cores()
