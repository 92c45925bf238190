"""Host-memory hygiene for CPU runs.

XLA's CPU buffers and numpy arrays come from the C allocator. glibc keeps freed
blocks below its (dynamically raised, up to 32 MiB) mmap threshold in its heap instead
of returning them to the OS, so after a big transient (loading a checkpoint: file
tensors + stacked copies; placing a train state: a second copy of params and optimizer
moments) the process keeps that memory resident and later allocations land on top of
it. `release_host_memory()` hands the free pages back (glibc `malloc_trim(0)`). Measured
on the SmolLM2-135M RL benchmark: peak RSS 5.2 GB -> 4.3 GB at unchanged speed
(`python benchmarks/rl_step.py`). A no-op where glibc is absent (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None


def release_host_memory() -> bool:
    """Return free heap pages to the OS; True if anything was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
