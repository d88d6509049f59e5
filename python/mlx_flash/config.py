"""The worker's configuration: one frozen dataclass, filled from flags or `MLX_FLASH_*` variables."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from mlx_flash.experts.policy import POLICIES

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
# The RAM prefix cache's budget unless given: this, or an eighth of the memory limit if less.
DEFAULT_PREFIX_CACHE_BYTES = 1 << 30
PREFIX_CACHE_SHARE = 1 / 8
DEFAULT_PREFIX_CACHE_DISK_BYTES = 10 << 30
# Without --memory-limit, models and KV may use this share of the memory the process can have
# (the smaller of RAM and its cgroup limit), split evenly between the workers of one host.
DEFAULT_MEMORY_FRACTION = 0.75
DEFAULT_MAX_QUEUE = 64
DEFAULT_QUEUE_TIMEOUT = 30.0
DEFAULT_PREFILL_STEP = 512
# Group sizes MLX quantizes with (mx.quantize), so --kv-group-size takes one of them.
KV_GROUP_SIZES = (32, 64, 128)
# While streams decode, a prefill chunk may take about this many decode steps: streams then slow to
# about twice their idle inter-token time while a long prompt is read.
DEFAULT_PREFILL_BUDGET = 1.0


@dataclass(frozen=True)
class WorkerConfig:
    models: tuple[str, ...] = ("demo",)
    pins: tuple[str, ...] = ()
    aliases: str | None = None
    memory_limit: str | None = None  # bytes ("12G", "512MiB", "8000000000") or a share ("60%")
    idle_ttl: float = 0.0  # seconds; 0 keeps an idle model until memory is needed
    max_queue: int = DEFAULT_MAX_QUEUE
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT
    kv_bits: int | None = None
    kv_group_size: int = 64
    quantized_kv_start: int = 5000
    prefill_step: int = DEFAULT_PREFILL_STEP
    prefill_budget: float = DEFAULT_PREFILL_BUDGET
    expert_trace: str | None = None  # append the experts each token uses to this file (JSON lines)
    expert_memory: str = "auto"  # bytes of MoE experts held in memory ("auto": all if the model fits)
    expert_policy: str = "decay"  # which expert a full pool evicts: lru, lfu or decay
    worker_id: str | None = None
    local_workers: int = 1
    sidecar_url: str | None = None  # serve MCP at /mcp, its tools calling the sidecar here
    host: str = "127.0.0.1"
    port: int = 8080
    uds: str | None = None
    parent_pid: int | None = None
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    prefix_cache_bytes: int | None = None  # None: DEFAULT_PREFIX_CACHE_BYTES or a share of the limit
    prefix_cache_dir: str | None = None
    prefix_cache_disk_bytes: int = DEFAULT_PREFIX_CACHE_DISK_BYTES
    log_level: str = "info"
    log_format: str = "json"  # or "text"
    log_file: str | None = None

    def validate(self) -> None:
        if not self.uds and not is_loopback(self.host) and not self.api_key:
            raise ValueError(
                f"refusing to listen on {self.host} without an API key: "
                "set --api-key (or MLX_FLASH_API_KEY), or bind 127.0.0.1"
            )
        if (self.prefix_cache_bytes or 0) < 0 or self.prefix_cache_disk_bytes < 0:
            raise ValueError("--prefix-cache-bytes and --prefix-cache-disk-bytes must be >= 0")
        if self.max_body_bytes < 1024:
            raise ValueError("max body size must be at least 1024 bytes")
        if self.memory_limit is not None:
            parse_size(self.memory_limit, 1)
        if self.idle_ttl < 0 or self.queue_timeout < 0 or self.max_queue < 0:
            raise ValueError("--idle-ttl, --queue-timeout and --max-queue must be >= 0")
        if self.kv_bits is not None and self.kv_bits not in (2, 3, 4, 5, 6, 8):
            raise ValueError("--kv-bits must be 2, 3, 4, 5, 6 or 8")
        if self.kv_group_size not in KV_GROUP_SIZES or self.quantized_kv_start < 0:
            raise ValueError("--kv-group-size must be 32, 64 or 128 and --quantized-kv-start >= 0")
        if self.prefill_step < 1 or self.prefill_budget < 0:
            raise ValueError("--prefill-step must be >= 1 and --prefill-budget >= 0")
        if self.expert_memory != "auto":
            parse_bytes(self.expert_memory)
        if self.expert_policy not in POLICIES:
            raise ValueError(f"--expert-policy must be one of {', '.join(POLICIES)}")
        if self.local_workers < 1:
            raise ValueError("--local-workers must be >= 1")
        if self.worker_id is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.worker_id):
            raise ValueError("--worker-id may hold only letters, digits, '.', '_' and '-'")

    def prefix_cache_budget(self, limit: int) -> int:
        """The RAM prefix cache's budget for a worker with this memory limit."""
        if self.prefix_cache_bytes is not None:
            return self.prefix_cache_bytes
        return min(DEFAULT_PREFIX_CACHE_BYTES, int(limit * PREFIX_CACHE_SHARE))

    @property
    def startup_models(self) -> tuple[str, ...]:
        """Loaded before the worker says it is ready: the models, then the pinned ones."""
        return tuple(dict.fromkeys((*self.models, *self.pins)))


UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, total: int) -> int:
    """Bytes from "12G", "512MiB", "1.5GB" (binary units), "8000000000", or "60%" of `total`."""
    t = text.strip().lower()
    if t.endswith("%"):
        try:
            share = float(t[:-1])
        except ValueError:
            share = -1
        if not 0 < share <= 100:
            raise ValueError(f"bad size {text!r}: a share must be between 0% and 100%")
        return int(total * share / 100)
    size = parse_bytes(text)
    if size <= 0:
        raise ValueError(f"bad size {text!r}: it must be more than 0")
    return size


def parse_bytes(text: str) -> int:
    """Bytes from "8000000000", "512M", "12G", "1.5GiB" (binary units)."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(?:i?b)?", text.strip().lower())
    if not m:
        raise ValueError(f"bad size {text!r}: use bytes, or a number with K, M, G or T")
    if not m.group(2) and "." in m.group(1):
        raise ValueError(f"bad size {text!r}: bytes are whole; a fraction needs a unit (e.g. {text}G)")
    return int(float(m.group(1)) * UNITS[m.group(2)])


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
