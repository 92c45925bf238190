"""release_host_memory gives freed heap pages back to the OS (Linux/glibc)."""

import os
import sys

import numpy as np
import pytest

from rubrax.hostmem import release_host_memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's malloc_trim")
def test_release_host_memory_returns_fragmented_heap_pages():
    # 100 KB blocks sit below glibc's mmap threshold, so they live in the heap; keeping
    # every 10th alive stops free() from trimming the heap top by itself.
    blocks = [np.ones(12_800) for _ in range(3000)]  # ~300 MB, pages touched
    keep = blocks[::10]
    del blocks
    before = _rss_mb()
    assert release_host_memory()
    after = _rss_mb()
    assert before - after > 100, (before, after)
    assert all(float(b[0]) == 1.0 for b in keep)  # live blocks untouched
