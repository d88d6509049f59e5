"""What a worker process holds: its configuration, the model scheduler, and whether it is ready."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import mlx.core as mx

from mlx_flash import memory, metrics
from mlx_flash.config import DEFAULT_MEMORY_FRACTION, WorkerConfig, parse_size
from mlx_flash.models.scheduler import Scheduler


def machine_memory() -> int:
    """Bytes this process may use: the smaller of RAM and its cgroup limit, and on Apple silicon
    of the GPU's recommended working set."""
    snap = memory.snapshot()
    total = (
        snap["effective_total_bytes"] if snap else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    )
    gpu = mx.device_info().get("max_recommended_working_set_size")
    return min(total, int(gpu)) if isinstance(gpu, int | float) and gpu > 0 else total


def memory_limit(config: WorkerConfig) -> int:
    """--memory-limit, or a share of the machine split between the workers on it."""
    total = machine_memory()
    if config.memory_limit is not None:
        return parse_size(config.memory_limit, total)
    return int(total * DEFAULT_MEMORY_FRACTION / config.local_workers)


@dataclass
class WorkerState:
    config: WorkerConfig
    ready: bool = False
    load_error: str | None = None
    # Whether loading again cannot help: the model is damaged, unsupported or larger than the limit.
    load_hopeless: bool = False
    _scheduler: Scheduler | None = field(default=None, repr=False)

    @property
    def scheduler(self) -> Scheduler:
        """Made on first use, inside the event loop that serves it."""
        if self._scheduler is None:
            self._scheduler = Scheduler(self.config, memory_limit(self.config))
            metrics.MEMORY_RESERVED_BYTES.set_function(lambda: self.scheduler.used)
        return self._scheduler

    async def close(self) -> None:
        if self._scheduler is not None:
            await self._scheduler.close()
