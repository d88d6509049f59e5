"""Prefix cache: KV caches of finished requests, reused by later requests sharing a prefix.

The RAM tier is mlx-lm's `LRUPromptCache` (a token trie with least-recently-used eviction under a
byte budget), the cache `mlx_lm.server` uses; the optional SSD tier (`disk_cache.DiskCache`) keeps
entries across restarts. Lives on the engine thread; never touched from async code.
"""

from __future__ import annotations

from typing import Any

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

from mlx_flash import metrics
from mlx_flash.engine.disk_cache import DiskCache

# Entries are bounded by bytes; the count limit only stops a flood of tiny entries.
MAX_ENTRIES = 4096


class PrefixCache:
    def __init__(self, model_id: str, max_bytes: int, disk: DiskCache | None = None) -> None:
        self.model_id = model_id
        self.enabled = max_bytes > 0
        self.disk = disk
        self.max_bytes = max_bytes
        # Evicted by trim_to below, not inside insert_cache, so evictions can be counted.
        self._lru = LRUPromptCache(max_size=1 << 62)
        self._evicted = metrics.PREFIX_CACHE_EVICTIONS.labels(model=model_id, tier="ram")
        self._hits = metrics.PREFIX_CACHE_HITS.labels(model=model_id, tier="ram")
        self._reused = metrics.PREFIX_CACHE_TOKENS.labels(model=model_id, tier="ram")
        self._bytes = metrics.PREFIX_CACHE_BYTES.labels(model=model_id, tier="ram")
        self._misses = metrics.PREFIX_CACHE_MISSES.labels(model=model_id)

    def fetch(self, tokens: list[int]) -> tuple[list[Any] | None, list[int]]:
        """The cached KV for the longest known prefix of `tokens` (a copy), and the tokens left to
        prefill: never empty, since generation starts from the last prompt token's logits."""
        cache, rest = None, tokens
        if self.enabled:
            cache, rest = self._lru.fetch_nearest_cache(self.model_id, tokens)
            if cache is not None and not rest:
                if not can_trim_prompt_cache(cache):
                    cache, rest = None, tokens
                else:
                    trim_prompt_cache(cache, 1)
                    rest = tokens[-1:]
        if self.disk is not None and len(rest) > 1:
            on_disk, n = self.disk.fetch(tokens, longer_than=len(tokens) - len(rest))
            if on_disk is not None:
                return on_disk, tokens[n:]
        if cache is None:
            self._misses.inc()
            return None, tokens
        self._hits.inc()
        self._reused.inc(len(tokens) - len(rest))
        return cache, list(rest)

    def store(self, tokens: list[int] | None, cache: list[Any] | None) -> None:
        """Keep the KV of `tokens` (what the cache holds) for later requests."""
        if not (tokens and cache):
            return
        if self.enabled:
            self._lru.insert_cache(self.model_id, list(tokens), cache)
            held = len(self._lru)
            self._lru.trim_to(n_sequences=MAX_ENTRIES, n_bytes=self.max_bytes)
            self._evicted.inc(held - len(self._lru))
            self._bytes.set(self._lru.nbytes)
        if self.disk is not None:
            self.disk.store(tokens, cache)

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
