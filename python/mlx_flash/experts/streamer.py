"""A MoE model's experts streamed from its safetensors files: one `ExpertPool` per layer, one store,
one budget that follows memory pressure.

    streamer = ExpertStreamer(model, model_dir, model_id)   # before the model's weights are read
    streamer.set_budget(8 << 30)      # experts of every layer within 8 GB (all of them: resident)
    streamer.follow(budget)           # shrink under memory pressure, grow back when it passes

The non-expert weights stay resident. Every layer holds the same number of experts, so the budget is a
number of experts per layer: `budget // bytes of one expert in every layer`.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import weakref
from pathlib import Path
from typing import Any

from mlx_flash import memory
from mlx_flash.config import parse_bytes
from mlx_flash.experts.pool import Counters, ExpertPool, StreamedExperts, expert_arrays, moe_layers
from mlx_flash.experts.store import DTYPES, ExpertStore, expert_file_bytes

log = logging.getLogger(__name__)

# How often the memory monitor is read while following pressure.
FOLLOW_INTERVAL = 0.25
# Below this share of memory free the pools shrink until it is free again (the monitor says
# "warning" at 15%); they grow back toward the budget while the second stays free.
SHRINK_BELOW_FREE = 0.20
GROW_ABOVE_FREE = 0.25

# With --expert-memory auto, a model too large to hold whole leaves this share of the memory limit for
# KV caches; its experts get the rest after the other weights and the prefix cache.
AUTO_KV_SHARE = 0.10

# Every streamer alive, for the metrics collector.
STREAMERS: weakref.WeakSet[ExpertStreamer] = weakref.WeakSet()


@dataclasses.dataclass(frozen=True)
class ExpertPlan:
    """How a MoE model's experts are held: `budget` bytes of them in memory, of `all_bytes`."""

    budget: int
    all_bytes: int
    num_experts: int
    top_k: int

    @property
    def floor_bytes(self) -> int:
        """The least a pass can run with: the router's top-k experts in every layer."""
        return self.top_k * self.all_bytes // self.num_experts

    @property
    def streamed(self) -> bool:
        return self.budget < self.all_bytes


def plan(model_dir: Path, config: dict[str, Any], weights: int, room: int, setting: str) -> ExpertPlan | None:
    """The plan for a model of `weights` bytes given `room` bytes for its weights and KV, under
    `--expert-memory` `setting` ("auto" or bytes); None when the model has no experts on disk. Auto
    holds every expert when the model fits, else what fits beside the other weights and some KV (at
    least the router's top-k per layer: if even that does not fit, the model does not)."""
    c = config.get("text_config", config)
    experts = int(c.get("num_experts") or c.get("num_local_experts") or c.get("n_routed_experts") or 0)
    on_disk = expert_file_bytes(model_dir, experts) if experts > 1 else 0
    if not on_disk:
        return None
    top_k = max(1, int(c.get("num_experts_per_tok") or 1))
    if setting != "auto":
        return ExpertPlan(min(parse_bytes(setting), on_disk), on_disk, experts, top_k)
    if weights <= room:
        return ExpertPlan(on_disk, on_disk, experts, top_k)
    p = ExpertPlan(int(room * (1 - AUTO_KV_SHARE)) - (weights - on_disk), on_disk, experts, top_k)
    return dataclasses.replace(p, budget=min(on_disk, max(p.budget, p.floor_bytes)))


class ExpertStreamer:
    def __init__(
        self, model: Any, model_dir: Path, model_id: str, policy: str = "decay", threads: int = 8
    ) -> None:
        self.model_id = model_id
        self.policy = policy
        self.lock = threading.RLock()
        self.counters = Counters()
        paths = {id(m): p for p, m in model.named_modules()}
        layers = moe_layers(model)
        if not layers:
            raise ValueError(f"{model_id} has no mlx-lm expert layers (SwitchGLU/SwitchMLP) to stream")
        arrays = [expert_arrays(paths[id(switch)], switch) for _, _, switch in layers]
        try:
            self.store = ExpertStore(model_dir, [a.tensor for layer in arrays for a in layer], threads)
        except KeyError as e:  # e.g. one tensor per expert, stacked by mlx-lm only at load
            raise ValueError(f"{e.args[0]}: only checkpoints saved by mlx-lm can be streamed") from e
        for a in (a for layer in arrays for a in layer):
            t = self.store.tensors[a.tensor]
            have = a.module[a.attribute]
            if t.location.shape != tuple(have.shape) or DTYPES[t.location.dtype][1] != have.dtype:
                self.store.close()
                raise ValueError(
                    f"{a.tensor} on disk is {t.location.dtype}{list(t.location.shape)} but the model holds "
                    f"{have.dtype}{list(have.shape)}: only checkpoints saved by mlx-lm can be streamed"
                )
        self.pools = [ExpertPool(layer, self.store, policy, self.counters, self.lock) for layer in arrays]
        for (parent, name, switch), pool in zip(layers, self.pools, strict=True):
            setattr(parent, name, StreamedExperts(switch, pool))
        self.budget = self.all_bytes
        self._stop = threading.Event()
        self._follower: threading.Thread | None = None
        STREAMERS.add(self)

    @property
    def unit_bytes(self) -> int:
        """Bytes of one expert in every layer: the step the budget moves in."""
        return sum(p.expert_bytes for p in self.pools)

    @property
    def all_bytes(self) -> int:
        return sum(p.num_experts * p.expert_bytes for p in self.pools)

    @property
    def resident_bytes(self) -> int:
        return sum(p.resident_bytes for p in self.pools)

    @property
    def capacity(self) -> int:
        """Experts each layer holds."""
        return self.pools[0].capacity

    def capacity_for(self, budget: int) -> int:
        return max(1, min(self.pools[0].num_experts, budget // self.unit_bytes))

    def start_empty(self, budget: int) -> None:
        """Before the model's weights are read: hold `budget` bytes of empty slots instead of the
        experts (which are then never read whole), or every expert if the budget holds them all."""
        self.budget = budget
        capacity = self.capacity_for(budget)
        if capacity < self.pools[0].num_experts:
            for pool in self.pools:
                pool.start_empty(capacity)

    def set_budget(self, budget: int) -> None:
        """Hold at most `budget` bytes of experts from now on."""
        self.budget = budget
        self._resize(self.capacity_for(budget))

    def _resize(self, capacity: int) -> None:
        if capacity == self.capacity:
            return
        log.info(
            "resizing expert pools",
            extra={"model": self.model_id, "from": self.capacity, "to": capacity},
        )
        for pool in self.pools:  # layer by layer: the engine runs between them
            with self.lock:
                pool.resize(capacity)
        gc.collect()
        memory.give_back()

    def follow(self, floor: int) -> None:
        """Track memory pressure on a thread until `close()`: below SHRINK_BELOW_FREE free the pools
        shrink (never under `floor` experts per layer), above GROW_ABOVE_FREE they grow back toward
        the budget."""
        self._follower = threading.Thread(
            target=self._follow, args=(floor,), name=f"experts:{self.model_id}", daemon=True
        )
        self._follower.start()

    def _follow(self, floor: int) -> None:
        while not self._stop.wait(FOLLOW_INTERVAL):
            snap = memory.snapshot()
            if snap is None:
                continue
            try:
                self._resize(self.target(snap, floor))
            except Exception:  # never let the monitor die: the next reading tries again
                log.exception("resizing expert pools failed", extra={"model": self.model_id})

    def target(self, snap: Any, floor: int) -> int:
        """Experts per layer for this memory reading."""
        total, free = snap["effective_total_bytes"], snap["effective_available_bytes"]
        cap, unit = self.capacity, self.unit_bytes
        ceiling = self.capacity_for(self.budget)
        floor = min(floor, ceiling)
        low, high = SHRINK_BELOW_FREE * total, GROW_ABOVE_FREE * total
        if free < low or snap["pressure"] == "critical":
            return max(floor, min(cap, cap - max(1, int(-(-(low - free) // unit)))))
        if free > high and cap < ceiling and snap["pressure"] == "normal":
            return min(ceiling, cap + max(1, int((free - high) // unit)))
        return cap

    def status(self) -> dict[str, Any]:
        c = self.counters
        return {
            "policy": self.policy,
            "budget_bytes": self.budget,
            "resident_bytes": self.resident_bytes,
            "all_bytes": self.all_bytes,
            "experts_per_layer": self.capacity,
            "layers": len(self.pools),
            "hits": c.hits,
            "misses": c.misses,
            "evictions": c.evictions,
            "bytes_read": c.bytes_read,
            "read_seconds": round(c.read_seconds, 6),
            "read_bytes_per_second": round(c.bytes_read / c.read_seconds) if c.read_seconds else None,
        }

    def __enter__(self) -> ExpertStreamer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        if self._follower is not None:
            self._follower.join(5)
        self.store.close()
