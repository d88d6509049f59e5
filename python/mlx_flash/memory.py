"""A thin wrapper over the native memory reader; the pressure classification lives in Rust,
shared with the sidecar."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
from typing import TYPE_CHECKING

from mlx_flash import _native

if TYPE_CHECKING:
    from mlx_flash._native import MemorySnapshot

log = logging.getLogger(__name__)

# glibc keeps freed chunks smaller than its mmap threshold (which grows to 32 MiB) in the heap, so
# arrays freed by MLX stay in the process's memory until malloc_trim gives their pages back.
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)  # glibc only (not musl)


def snapshot() -> MemorySnapshot | None:
    """The current memory snapshot, or None where the platform has no reader yet."""
    try:
        return _native.memory_snapshot()
    except NotImplementedError:
        return None
    except (OSError, ValueError) as e:
        log.warning("memory snapshot failed", extra={"error": str(e)})
        return None


def give_back() -> None:
    """Return memory the process freed to the system (glibc's heap; elsewhere the allocator does)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
