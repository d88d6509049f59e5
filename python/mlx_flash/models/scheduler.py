"""Which models are in memory, and which requests may start.

Models load on demand and the least recently used idle one is evicted when memory is needed, under
one byte ceiling (`--memory-limit`); pinned models stay, idle ones may expire (`--idle-ttl`).
Admission control: before a response starts, a request reserves the KV cache it can grow to (prompt
plus max tokens), and a load reserves the model's weights. What does not fit under the ceiling and in
the memory the system has now waits in one bounded FIFO queue, then gets 503 with Retry-After; so a
request is never cut off after 200 for lack of memory. Everything here runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.utils import load_config

from mlx_flash import logging as json_logging
from mlx_flash import memory, metrics
from mlx_flash.api.errors import (
    ApiError,
    Conflict,
    InternalError,
    MemoryExceeded,
    ModelNotFound,
    ModelTooLarge,
    Overloaded,
)
from mlx_flash.config import WorkerConfig
from mlx_flash.engine.disk_cache import DiskCache, model_key
from mlx_flash.engine.engine import Engine, KvQuantization, RequestHandle
from mlx_flash.engine.prefix_cache import PrefixCache
from mlx_flash.engine.request import GenerationRequest
from mlx_flash.experts import streamer, trace
from mlx_flash.models.loader import LoadedModel, check_kv_group, load_model, resolve, weight_file_bytes
from mlx_flash.models.registry import Known, Registry

log = logging.getLogger(__name__)

# Memory the system must keep free beyond what a request takes (the OS, MLX's scratch buffers): this
# much, or an eighth of the memory there is on a machine (or cgroup) smaller than 2 GiB.
HEADROOM_BYTES = 256 << 20
HEADROOM_SHARE = 1 / 8
# Waiters look at the live memory snapshot again this often, even if nothing here changed.
RECHECK_SECONDS = 0.25


@dataclasses.dataclass(eq=False)
class Entry:
    """One model this worker knows, loaded or not."""

    id: str
    target: str
    download: bool
    pinned: bool = False
    engine: Engine | None = None
    loading: asyncio.Task[Engine] | None = None
    progress: tuple[int, int] | None = None  # bytes read, of total, while loading
    reserved: int = 0  # weights plus prefix cache budget, while loading or loaded
    holders: int = 0  # leases: requests from lookup until the engine is done with them
    last_used: float = 0.0
    error: str | None = None

    @property
    def status(self) -> str:
        return "loaded" if self.engine else "loading" if self.loading else "available"

    def evictable(self) -> bool:
        return self.engine is not None and not self.pinned and self.holders == 0


@dataclasses.dataclass(eq=False)
class _Waiter:
    """One place in the admission queue."""

    loaded_model: bool  # a request's KV for a model already loaded (not a model load)


class Lease:
    """A request's hold on a loaded model; `start` admits it; released once its engine is done."""

    def __init__(self, scheduler: Scheduler, entry: Entry, engine: Engine) -> None:
        self.engine = engine
        self.kv_bytes = 0
        self.entry = entry
        self._scheduler = scheduler
        self._released = False

    async def start(
        self, request: GenerationRequest, limit_param: str | None, prompt_param: str = "messages"
    ) -> RequestHandle:
        """Wait for room for this request's KV cache, then hand it to the engine.

        `limit_param` names the client's max_tokens field when it set one; without it the completion
        is capped at what memory can ever hold. Errors name the field to change."""
        per_token = max(1, self.engine.loaded.kv_bytes_per_token)
        ceiling = self._scheduler.kv_ceiling(self.entry) // per_token
        prompt = len(request.prompt_tokens)
        least = prompt + (request.max_tokens if limit_param else 1)
        if least > ceiling:
            limit = self._scheduler.limit
            raise MemoryExceeded(
                f"This request needs a KV cache of {least} tokens ({per_token} bytes each) but at most "
                f"{max(ceiling, 0)} fit under this worker's memory limit of {limit} bytes beside the "
                f"model. Reduce {f'{limit_param} or ' if limit_param else ''}the prompt.",
                param=limit_param or prompt_param,
            )
        if prompt + request.max_tokens > ceiling:
            request = dataclasses.replace(request, max_tokens=ceiling - prompt)
        need = (prompt + request.max_tokens) * per_token
        await self._scheduler.admit(
            need, f"request for {self.entry.id}", lambda: self._reserve(need), loaded_model=True
        )
        return self.engine.submit(request, on_close=self.release)

    def _reserve(self, need: int) -> None:
        self.kv_bytes = need
        self._scheduler.kv_reserved += need

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._scheduler.kv_reserved -= self.kv_bytes
        self.entry.holders -= 1
        self.entry.last_used = time.monotonic()
        self._scheduler.changed()

    @contextlib.contextmanager
    def held(self) -> Iterator[Lease]:
        """Release the lease if the request fails before the engine takes it."""
        try:
            yield self
        except BaseException:
            self.release()
            raise


class Scheduler:
    def __init__(self, config: WorkerConfig, limit: int) -> None:
        self.config = config
        self.limit = limit
        self.registry = Registry(list(config.startup_models), config.aliases)
        self.kv_reserved = 0
        self.created = int(time.time())
        self._entries: dict[str, Entry] = {}
        self._waiters: deque[_Waiter] = deque()
        self._changed = asyncio.Event()
        self._prefix_budget = config.prefix_cache_budget(limit)
        self._pinned = {self.registry.find(name).target for name in config.pins}
        metrics.MEMORY_LIMIT_BYTES.set(limit)

    # ------------------------------------------------------------ models

    def entry(self, name: str) -> Entry:
        """The model `name` names (ModelNotFound if none), tracked from now on."""
        known = self.registry.find(name)
        entry = self._entries.get(known.target)
        if entry is None:
            entry = self._entries[known.target] = self._new(known)
        return entry

    def lookup(self, name: str) -> Entry:
        """The model `name` names if it is tracked or available; ModelNotFound otherwise."""
        known = self.registry.find(name)
        if known.target in self._entries:
            return self._entries[known.target]
        if not any(k.target == known.target for k in self.registry.available()):
            raise ModelNotFound(name)
        return self._new(known)

    def _new(self, known: Known) -> Entry:
        return Entry(known.id, known.target, known.download, pinned=known.target in self._pinned)

    def loaded(self) -> list[Engine]:
        return [e.engine for e in self._entries.values() if e.engine is not None]

    async def lease(self, name: str, download: bool = False) -> Lease:
        """Hold the model `name` names, loading it first if needed (evicting idle ones for room)."""
        entry = self.entry(name)
        json_logging.bind(model=entry.id)
        if entry.engine is not None and entry.engine.broken and entry.holders == 0:
            # Read afresh: its files were replaced (it loads) or damaged (the load says how).
            await self._unload(entry, "broken")
        entry.holders += 1
        try:
            while entry.engine is None:
                if entry.loading is None:
                    entry.loading = asyncio.create_task(self._load(entry, download or entry.download))
                    # Its error reaches every waiter; this keeps a load nobody awaits any more quiet.
                    entry.loading.add_done_callback(lambda t: t.cancelled() or t.exception())
                # Shielded: a client that gives up does not cancel a load others may be waiting for.
                await asyncio.shield(entry.loading)
        except BaseException:
            entry.holders -= 1
            if entry.engine is None and entry.loading is None and entry.holders == 0:
                self._entries.pop(entry.target, None)  # forget names that failed: clients choose them
            self.changed()
            raise
        entry.last_used = time.monotonic()
        return Lease(self, entry, entry.engine)

    async def load(self, name: str, download: bool = True) -> Entry:
        lease = await self.lease(name, download)
        lease.release()
        return lease.entry

    async def unload(self, name: str) -> Entry:
        entry = self.lookup(name)
        if entry.pinned:
            raise Conflict(f"The model '{entry.id}' is pinned (--pin) and stays loaded.")
        if entry.loading is not None or entry.holders:
            raise Conflict(f"The model '{entry.id}' is busy ({entry.holders} requests); retry later.")
        if entry.engine is not None:
            await self._unload(entry, "admin")
        return entry

    async def _load(self, entry: Entry, download: bool) -> Engine:
        try:
            try:
                path = await asyncio.to_thread(resolve, entry.target, download)
            except FileNotFoundError as e:
                hint = ""
                if not download:
                    hint = f"; POST /admin/api/models/{entry.id}/load downloads it"
                raise ModelNotFound(entry.id, f"{e}{hint}") from e
            weights = weight_file_bytes(path) or 1
            room = min(self._ceiling(entry), self._system_room()) - self._prefix_budget
            try:
                experts = await asyncio.to_thread(
                    streamer.plan, path, load_config(path), weights, room, self.config.expert_memory
                )
            except (OSError, ValueError) as e:  # its config or safetensors headers are not readable
                raise _load_failed(entry, e) from e
            if experts is not None:
                weights += experts.budget - experts.all_bytes
                if experts.budget < experts.floor_bytes:
                    raise ModelTooLarge(
                        f"The model '{entry.id}' streams its experts, but {experts.budget} bytes cannot hold "
                        f"the {experts.top_k} experts per layer a token needs ({experts.floor_bytes} bytes); "
                        "raise --expert-memory."
                    )
            need = weights + self._prefix_budget
            if need > self._ceiling(entry):
                streamed = " with its experts streamed from disk" if experts and experts.streamed else ""
                raise ModelTooLarge(
                    f"The model '{entry.id}' needs about {need} bytes{streamed} ({weights} of weights, "
                    f"{self._prefix_budget} of prefix cache: --prefix-cache-bytes) "
                    f"but this worker's memory limit is {self.limit} bytes ({self._ceiling(entry)} without "
                    "the pinned models); raise --memory-limit or pick a smaller model."
                )
            await self.admit(need, f"load of {entry.id}", lambda: setattr(entry, "reserved", need))
            started = time.perf_counter()
            try:
                engine = await asyncio.to_thread(_open, entry, path, self.config, self._prefix_cache, experts)
            except Exception as e:
                entry.reserved = 0
                raise _load_failed(entry, e) from e
            entry.engine, entry.error = engine, None
            entry.reserved = engine.loaded.weight_bytes + self._prefix_budget
            entry.last_used = time.monotonic()
            metrics.MODEL_WEIGHT_BYTES.labels(model=entry.id).set(engine.loaded.weight_bytes)
            metrics.MODEL_LOADS.labels(model=entry.id).inc()
            metrics.MODELS_LOADED.inc()
            metrics.MODEL_LOAD_SECONDS.labels(model=entry.id).set(time.perf_counter() - started)
            return engine
        except ApiError as e:
            entry.error = e.message
            raise
        finally:
            entry.loading, entry.progress = None, None
            self.changed()

    def _prefix_cache(self, loaded: LoadedModel) -> PrefixCache:
        disk = None
        # Quantized KV entries could not join a batch after a restart without --kv-bits: RAM only.
        if self.config.prefix_cache_dir and self.config.kv_bits is None:
            root = Path(self.config.prefix_cache_dir)
            if self.config.worker_id:  # workers of one host each keep their own tier
                root = root / self.config.worker_id
            key = model_key(loaded.path, loaded.config)
            disk = DiskCache(root, key, self.config.prefix_cache_disk_bytes, loaded.id)
        return PrefixCache(loaded.id, self._prefix_budget, disk)

    async def _unload(self, entry: Entry, reason: str) -> None:
        assert entry.engine is not None
        # The engine is handed over in a list so no frame here keeps its arrays alive.
        engines, entry.engine = [entry.engine], None
        log.info("unloading model", extra={"model": entry.id, "reason": reason})
        await asyncio.to_thread(_release, engines)
        entry.reserved = 0
        metrics.MODEL_WEIGHT_BYTES.remove(entry.id)
        metrics.MODELS_LOADED.dec()
        metrics.MODEL_UNLOADS.labels(model=entry.id, reason=reason).inc()
        self.changed()

    async def expire_idle(self) -> None:
        """Unload models idle for longer than --idle-ttl, until cancelled."""
        ttl = self.config.idle_ttl
        while ttl > 0:
            await asyncio.sleep(min(ttl / 4, 5.0))
            now = time.monotonic()
            for entry in list(self._entries.values()):
                if entry.evictable() and now - entry.last_used > ttl:
                    await self._unload(entry, "idle")

    # ------------------------------------------------------------ memory

    @property
    def used(self) -> int:
        return sum(e.reserved for e in self._entries.values()) + self.kv_reserved

    def _ceiling(self, entry: Entry) -> int:
        """Bytes `entry` could ever have: the limit minus every other pinned model."""
        pinned = sum(e.reserved for e in self._entries.values() if e.pinned and e is not entry)
        return self.limit - pinned

    def kv_ceiling(self, entry: Entry) -> int:
        """KV bytes one request of a loaded model could ever reserve."""
        return self._ceiling(entry) - entry.reserved

    def changed(self) -> None:
        """Wake the queue: memory was released or a model finished loading."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def admit(self, need: int, what: str, commit: Any, loaded_model: bool = False) -> None:
        """Wait, first in first out, until `need` bytes fit; then `commit()` reserves them.

        A request for a `loaded_model` that fits without evicting anything may pass loads waiting
        ahead of it: a load waits for models to become idle, and requests queued for those models
        hold them (their leases), so waiting behind it would hold everyone up until the timeout."""
        waiter = _Waiter(loaded_model)
        must_wait = not self._may_go(waiter) or not self._fits_now(need)
        if must_wait and len(self._waiters) >= self.config.max_queue:
            metrics.ADMISSION_REJECTED.labels(reason="queue_full").inc()
            raise Overloaded(
                f"The server is at capacity ({len(self._waiters)} requests waiting); retry later."
            )
        self._waiters.append(waiter)
        metrics.QUEUE_DEPTH.set(len(self._waiters))
        start = time.monotonic()
        try:
            while True:
                if self._waiters[0] is waiter and await self._make_room(need):
                    commit()
                    return
                if self._may_go(waiter) and self._fits_now(need):
                    commit()
                    return
                left = start + self.config.queue_timeout - time.monotonic()
                if left <= 0:
                    metrics.ADMISSION_REJECTED.labels(reason="timeout").inc()
                    log.warning("not admitted", extra={"what": what, "need_bytes": need, "used": self.used})
                    raise Overloaded(
                        f"Not enough memory for this {what} now ({need} bytes needed, {self.used} of "
                        f"{self.limit} reserved); retry later."
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(left, RECHECK_SECONDS))
        finally:
            self._waiters.remove(waiter)
            metrics.QUEUE_DEPTH.set(len(self._waiters))
            metrics.ADMISSION_WAIT_SECONDS.observe(time.monotonic() - start)
            self.changed()

    def _may_go(self, waiter: _Waiter) -> bool:
        """Whether only loads wait ahead of `waiter` (a new one or one in the queue) that it may pass."""
        if not waiter.loaded_model:
            return not self._waiters or self._waiters[0] is waiter
        for ahead in self._waiters:
            if ahead is waiter:
                break
            if ahead.loaded_model:
                return False
        return True

    def _system_room(self) -> int:
        """Bytes a load could have from the system now: what is free, plus what idle models would
        give back, less the headroom admission keeps (so an auto expert budget is one it admits)."""
        snap = memory.snapshot()
        if snap is None:
            return self.limit
        idle = sum(e.reserved for e in self._entries.values() if e.evictable())
        return int(snap["effective_available_bytes"]) + idle - headroom(snap)

    def _fits_now(self, need: int) -> bool:
        return self.used + need <= self.limit and _system_has(need)

    async def _make_room(self, need: int) -> bool:
        """Whether `need` fits, after evicting least recently used idle models if that helps."""
        while self.used + need > self.limit:
            idle = [e for e in self._entries.values() if e.evictable()]
            if sum(e.reserved for e in idle) < self.used + need - self.limit:
                return False  # evicting every idle model would not be enough
            await self._unload(min(idle, key=lambda e: e.last_used), "lru")
        return _system_has(need)

    def describe(self, entry: Entry) -> dict[str, Any]:
        engine = entry.engine
        return {
            "id": entry.id,
            "target": entry.target,
            "status": entry.status,
            "pinned": entry.pinned,
            "weight_bytes": engine.loaded.weight_bytes if engine else None,
            "kv_bytes_per_token": engine.loaded.kv_bytes_per_token if engine else None,
            "context_length": engine.loaded.context_length if engine else None,
            "batching": engine.kv_quantization is None if engine else None,
            "experts": engine.loaded.experts.status() if engine and engine.loaded.experts else None,
            "reserved_bytes": entry.reserved,
            "active_requests": entry.holders,
            "idle_seconds": round(time.monotonic() - entry.last_used, 1) if engine else None,
            "load_progress": round(entry.progress[0] / max(entry.progress[1], 1), 3)
            if entry.progress
            else None,
            "error": entry.error,
        }

    def models(self) -> list[Entry]:
        """Every model that is loaded, loading, or available without a download."""
        entries = {k.target: self._entries.get(k.target) or self._new(k) for k in self.registry.available()}
        entries.update({e.target: e for e in self._entries.values()})
        return list(entries.values())

    def status(self) -> dict[str, Any]:
        entries = self.models()
        return {
            "memory_limit": self.limit,
            "memory_used": self.used,
            "kv_reserved": self.kv_reserved,
            "queue_depth": len(self._waiters),
            "models": [self.describe(e) for e in entries],
        }

    async def close(self) -> None:
        for entry in self._entries.values():
            if entry.loading is not None:
                entry.loading.cancel()
            if entry.engine is not None:
                await asyncio.to_thread(entry.engine.close)


def _system_has(need: int) -> bool:
    """Whether the memory the system has free right now takes `need` more bytes."""
    snap = memory.snapshot()
    if snap is None:
        return True
    if snap["pressure"] == "critical":
        return False
    return need + headroom(snap) <= snap["effective_available_bytes"]


def _load_failed(entry: Entry, e: Exception) -> InternalError:
    log.error("model failed to load", extra={"model": entry.id}, exc_info=e)
    return InternalError(f"The model '{entry.id}' failed to load: {type(e).__name__}: {e}")


def headroom(snap: Any) -> int:
    """Bytes admission leaves free for this memory reading."""
    return min(HEADROOM_BYTES, int(snap["effective_total_bytes"] * HEADROOM_SHARE))


def _release(engines: list[Engine]) -> None:
    """Stop an engine and give its memory back to the system."""
    engine = engines.pop()
    engine.close()
    if engine.loaded.experts is not None:
        engine.loaded.experts.close()
    del engine
    gc.collect()
    mx.clear_cache()
    memory.give_back()


def _open(
    entry: Entry, path: Path, config: WorkerConfig, prefix_cache: Any, experts: streamer.ExpertPlan | None
) -> Engine:
    """Load a model and start its engine (on a thread: both read files)."""
    q = None
    if config.kv_bits is not None:
        q = KvQuantization(config.kv_bits, config.kv_group_size, config.quantized_kv_start)
        check_kv_group(load_config(path), q.group_size)
    loaded = load_model(
        entry.id,
        path,
        lambda done, total: setattr(entry, "progress", (done, total)),
        experts,
        config.expert_policy,
    )
    if config.expert_trace:
        # Line-buffered appends, one JSON line per layer pass; open while the process lives.
        traced = trace.record(loaded.model, loaded.id, open(config.expert_trace, "a", buffering=1))  # noqa: SIM115
        log.info("tracing experts", extra={"model": loaded.id, "layers": traced, "file": config.expert_trace})
    if q is not None:
        log.info(
            "KV cache quantized: requests run one at a time, without batching", extra={"model": entry.id}
        )
    if loaded.experts is not None and experts is not None:
        loaded.experts.follow(experts.top_k)
    return Engine(
        loaded,
        prefix_cache(loaded),
        prefill_step=config.prefill_step,
        prefill_budget=config.prefill_budget,
        kv_quantization=q,
    )
