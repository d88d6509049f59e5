"""Prometheus series of a worker: prefix `mlx_flash_`, base units, bounded labels."""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Iterator

import mlx.core as mx
from prometheus_client import Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import REGISTRY, Collector

from mlx_flash import __version__, memory

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)

REQUESTS = Counter("mlx_flash_requests", "HTTP requests answered", ["api", "route", "status"])
REQUEST_SECONDS = Histogram(
    "mlx_flash_request_duration_seconds", "End-to-end request time", ["route"], buckets=LATENCY_BUCKETS
)
REQUESTS_WAITING = Gauge("mlx_flash_requests_waiting", "Requests queued for a model's batch", ["model"])
REQUESTS_RUNNING = Gauge("mlx_flash_requests_running", "Requests in a model's batch", ["model"])
ERRORS = Counter(
    "mlx_flash_errors",
    "Errors sent to clients, before or after a response started, by reason (the error's code or type)",
    ["reason"],
)
QUEUE_SECONDS = Histogram(
    "mlx_flash_queue_time_seconds",
    "Time from submission to generation start",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
TTFT_SECONDS = Histogram(
    "mlx_flash_time_to_first_token_seconds",
    "Time from submission to the first token",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
PREFILL_SECONDS = Histogram(
    "mlx_flash_prefill_seconds",
    "Time from generation start to the first token (reading the uncached prompt)",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
DECODE_SECONDS = Histogram(
    "mlx_flash_decode_seconds",
    "Time from the first token to the last",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
INTER_TOKEN_SECONDS = Histogram(
    "mlx_flash_inter_token_latency_seconds",
    "Time between consecutive tokens",
    ["model"],
    buckets=TOKEN_BUCKETS,
)
BATCH_SIZE = Histogram(
    "mlx_flash_batch_size",
    "Sequences decoded together per step of the continuous batch",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
PREFILL_CHUNK_TOKENS = Histogram(
    "mlx_flash_prefill_chunk_tokens",
    "Prompt tokens read per prompt in one engine step (smaller while other streams decode)",
    ["model"],
    buckets=(1, 4, 16, 64, 256, 1024, 4096),
)
PREFIX_CACHE_HITS = Counter(
    "mlx_flash_prefix_cache_hits", "Requests that reused a cached prompt prefix", ["model", "tier"]
)
PREFIX_CACHE_MISSES = Counter("mlx_flash_prefix_cache_misses", "Requests with no cached prefix", ["model"])
PREFIX_CACHE_TOKENS = Counter(
    "mlx_flash_prefix_cache_tokens_reused", "Prompt tokens served from the prefix cache", ["model", "tier"]
)
PREFIX_CACHE_EVICTIONS = Counter(
    "mlx_flash_prefix_cache_evictions", "Prefix cache entries evicted for space", ["model", "tier"]
)
PREFIX_CACHE_BYTES = Gauge(
    "mlx_flash_prefix_cache_bytes", "Bytes held by the prefix cache", ["model", "tier"]
)
PROMPT_TOKENS = Counter("mlx_flash_prompt_tokens", "Prompt tokens processed", ["model"])
GENERATION_TOKENS = Counter("mlx_flash_generation_tokens", "Tokens generated", ["model"])
MODELS_LOADED = Gauge("mlx_flash_models_loaded", "Models loaded in this worker")
MODEL_WEIGHT_BYTES = Gauge("mlx_flash_model_weight_bytes", "Weight bytes of loaded models", ["model"])
MODEL_LOAD_SECONDS = Gauge("mlx_flash_model_load_seconds", "Time the last load of a model took", ["model"])

MODEL_LOADS = Counter("mlx_flash_model_loads", "Models loaded", ["model"])
MODEL_UNLOADS = Counter(
    "mlx_flash_model_unloads", "Models unloaded, by reason (lru, idle, admin)", ["model", "reason"]
)
MEMORY_LIMIT_BYTES = Gauge("mlx_flash_memory_limit_bytes", "The worker's memory ceiling (--memory-limit)")
MEMORY_RESERVED_BYTES = Gauge(
    "mlx_flash_memory_reserved_bytes",
    "Bytes reserved under the ceiling: weights, prefix caches, KV of requests",
)
QUEUE_DEPTH = Gauge("mlx_flash_admission_queue_depth", "Requests and loads waiting for memory")
ADMISSION_WAIT_SECONDS = Histogram(
    "mlx_flash_admission_wait_seconds",
    "Time spent in admission control, admitted or not",
    buckets=LATENCY_BUCKETS,
)
ADMISSION_REJECTED = Counter(
    "mlx_flash_admission_rejected", "Requests refused with 503, by reason (queue_full, timeout)", ["reason"]
)
for _reason in ("queue_full", "timeout"):  # both series exist from the start, at zero
    ADMISSION_REJECTED.labels(reason=_reason)

BUILD = Info("mlx_flash_build", "What this worker runs: versions of mlx-flash, MLX, mlx-lm and Python")
BUILD.info(
    {
        "version": __version__,
        "mlx": importlib.metadata.version("mlx"),
        "mlx_lm": importlib.metadata.version("mlx-lm"),
        "python": platform.python_version(),
    }
)

PRESSURE_LEVELS = {"normal": 0, "warning": 1, "critical": 2}


class MemoryCollector(Collector):
    """Reads the memory snapshot at scrape time, so the numbers are never stale."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = memory.snapshot()
        if snap is None:
            return
        yield GaugeMetricFamily(
            "mlx_flash_memory_available_bytes",
            "Memory available to this process (the smaller of system and cgroup)",
            value=snap["effective_available_bytes"],
        )
        yield GaugeMetricFamily(
            "mlx_flash_memory_total_bytes",
            "Memory this process may use (the smaller of system and cgroup limit)",
            value=snap["effective_total_bytes"],
        )
        yield GaugeMetricFamily(
            "mlx_flash_memory_pressure_level",
            "Memory pressure: 0 normal, 1 warning, 2 critical",
            value=PRESSURE_LEVELS[snap["pressure"]],
        )
        yield GaugeMetricFamily(
            "mlx_flash_memory_used_bytes", "Memory in use on the host", value=snap["used_bytes"]
        )
        yield GaugeMetricFamily(
            "mlx_flash_memory_swap_used_bytes", "Swap in use on the host", value=snap["swap_used_bytes"]
        )
        mlx = {
            "active": ("Bytes of MLX arrays alive", mx.get_active_memory),
            "peak": ("Most bytes of MLX arrays alive at once since the start", mx.get_peak_memory),
            "cache": ("Bytes MLX keeps freed for reuse (its buffer cache)", mx.get_cache_memory),
        }
        for name, (doc, read) in mlx.items():
            yield GaugeMetricFamily(f"mlx_flash_mlx_{name}_bytes", doc, value=read())


class ExpertCollector(Collector):
    """Streamed experts of each model, read from its pools at scrape time. Read bandwidth is
    rate(mlx_flash_expert_read_bytes_total) / rate(mlx_flash_expert_read_seconds_total)."""

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        from mlx_flash.experts.streamer import STREAMERS

        streamers = list(STREAMERS)
        counters = {
            "hits": "Expert uses served from the pool",
            "misses": "Expert uses that waited for a read from disk",
            "evictions": "Experts dropped from a pool to make room",
            "read_bytes": "Expert bytes read from disk",
            "read_seconds": "Time spent reading experts from disk",
        }
        gauges = {
            "budget_bytes": "Most bytes of experts the model may hold (--expert-memory)",
            "resident_bytes": "Bytes of expert slots the model holds now (shrinks under memory pressure)",
            "slots_per_layer": "Experts each MoE layer holds now",
        }
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            **{
                k: CounterMetricFamily(f"mlx_flash_expert_{k}", h, labels=["model"])
                for k, h in counters.items()
            },
            **{k: GaugeMetricFamily(f"mlx_flash_expert_{k}", h, labels=["model"]) for k, h in gauges.items()},
        }
        for s in streamers:
            c, m = s.counters, [s.model_id]
            values = {
                "hits": c.hits,
                "misses": c.misses,
                "evictions": c.evictions,
                "read_bytes": c.bytes_read,
                "read_seconds": c.read_seconds,
                "budget_bytes": s.budget,
                "resident_bytes": s.resident_bytes,
                "slots_per_layer": s.capacity,
            }
            for k, v in values.items():
                families[k].add_metric(m, v)
        yield from families.values()


REGISTRY.register(MemoryCollector())
REGISTRY.register(ExpertCollector())
