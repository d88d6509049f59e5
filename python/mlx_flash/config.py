"""The worker's configuration: one frozen dataclass, filled from flags or `MLX_FLASH_*` variables."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_PREFIX_CACHE_BYTES = 1 << 30
DEFAULT_PREFIX_CACHE_DISK_BYTES = 10 << 30


@dataclass(frozen=True)
class WorkerConfig:
    model: str = "demo"
    host: str = "127.0.0.1"
    port: int = 8080
    uds: str | None = None
    parent_pid: int | None = None
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES
    prefix_cache_dir: str | None = None
    prefix_cache_disk_bytes: int = DEFAULT_PREFIX_CACHE_DISK_BYTES
    log_level: str = "info"

    def validate(self) -> None:
        if not self.uds and not is_loopback(self.host) and not self.api_key:
            raise ValueError(
                f"refusing to listen on {self.host} without an API key: "
                "set --api-key (or MLX_FLASH_API_KEY), or bind 127.0.0.1"
            )
        if self.prefix_cache_bytes < 0 or self.prefix_cache_disk_bytes < 0:
            raise ValueError("--prefix-cache-bytes and --prefix-cache-disk-bytes must be >= 0")
        if self.max_body_bytes < 1024:
            raise ValueError("max body size must be at least 1024 bytes")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def env_default(name: str, default: str | None) -> str | None:
    """Flags fall back to MLX_FLASH_<NAME> environment variables."""
    return os.environ.get(f"MLX_FLASH_{name}", default)


def env_int(name: str, default: int) -> int:
    value = os.environ.get(f"MLX_FLASH_{name}")
    return int(value) if value else default
