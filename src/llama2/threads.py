"""One thread setting for the whole engine: BLAS and the native pool.

Kept apart from `native` so that choosing a thread count loads nothing; `native` (our own pthread
pool) sizes itself from `threads()` at import.
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
    The native pool is one per process: its size follows the last call from any thread."""
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
    return n


def threads() -> int:
    """The thread count set last (default: the cores available)."""
    return _requested or available_cores()
