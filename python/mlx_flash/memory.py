"""A thin wrapper over the native memory reader; the pressure classification lives in Rust,
shared with the sidecar."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mlx_flash import _native

if TYPE_CHECKING:
    from mlx_flash._native import MemorySnapshot

log = logging.getLogger(__name__)


def snapshot() -> MemorySnapshot | None:
    """The current memory snapshot, or None where the platform has no reader yet."""
    try:
        return _native.memory_snapshot()
    except NotImplementedError:
        return None
    except (OSError, ValueError) as e:
        log.warning("memory snapshot failed", extra={"error": str(e)})
        return None
