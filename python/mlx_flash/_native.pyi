"""Type stubs for the Rust extension module ``mlx_flash._native`` (python/native).

``MemorySnapshot`` exists only for type checkers: at runtime ``memory_snapshot``
returns a plain ``dict``. Import it under ``typing.TYPE_CHECKING``.
"""

from typing import Literal, TypedDict

__all__ = ["__version__", "memory_snapshot", "serve"]

__version__: str

class MemorySnapshot(TypedDict):
    """System memory as seen by this process. All sizes are in bytes."""

    platform: str
    total_bytes: int
    available_bytes: int
    used_bytes: int
    swap_used_bytes: int
    cgroup_limit_bytes: int | None
    cgroup_usage_bytes: int | None
    psi_some_avg10: float | None
    psi_full_avg10: float | None
    effective_available_bytes: int
    effective_total_bytes: int
    pressure: Literal["normal", "warning", "critical"]

def memory_snapshot() -> MemorySnapshot:
    """Return a snapshot of system memory.

    Raises ``NotImplementedError`` on platforms other than Linux and macOS, ``OSError``
    if a kernel interface cannot be read and ``ValueError`` if its output cannot be parsed.
    """

def serve(args: list[str]) -> int:
    """Run the sidecar with ``mlx-flash serve`` arguments until SIGINT/SIGTERM; return the exit code.

    The GIL is released while it runs; flags are parsed by the same code as ``mlx-flash-sidecar``.
    """
