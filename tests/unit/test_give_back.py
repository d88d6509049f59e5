"""Freed MLX arrays of an expert pool's size go back to the system: glibc keeps freed chunks under its
(growing) mmap threshold in the heap until `memory.give_back()` trims it."""

from __future__ import annotations

import gc
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash import memory


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_freed_pool_arrays_leave_the_process() -> None:
    # Pool-sized arrays (16 MiB each, made the way a resize makes them), freed, then some smaller
    # ones kept, as a shrink leaves them: the freed ones must not stay in the process.
    rows = (16 << 20) // 4
    held = [mx.array(np.ones(rows, dtype=np.uint32)) for _ in range(24)]
    mx.eval(held)
    full = rss()
    held = [mx.array(np.asarray(a)[: rows // 3]) for a in held]
    gc.collect()
    mx.clear_cache()
    memory.give_back()
    freed = 24 * (16 << 20) * 2 // 3
    assert full - rss() > 0.8 * freed, (full >> 20, rss() >> 20)
