"""What a worker process holds: its configuration and the engines of its loaded models."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from mlx_flash.api.errors import ModelNotFound, NotReady
from mlx_flash.config import WorkerConfig
from mlx_flash.engine.engine import Engine


@dataclass
class WorkerState:
    config: WorkerConfig
    load_error: str | None = None
    _engines: list[Engine] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, engine: Engine) -> None:
        with self._lock:
            self._engines.append(engine)

    def engines(self) -> list[Engine]:
        with self._lock:
            return list(self._engines)

    @property
    def ready(self) -> bool:
        return bool(self.engines())

    def engine_for(self, name: str) -> Engine:
        engines = self.engines()
        for engine in engines:
            if engine.loaded.serves(name):
                return engine
        if not engines and name in (self.config.model, Path(self.config.model).name):
            raise NotReady(f"The model '{self.config.model}' is still loading; retry shortly.")
        raise ModelNotFound(name)

    def close(self) -> None:
        for engine in self.engines():
            engine.close()
