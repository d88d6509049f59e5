"""Prefix cache, SSD tier: KV caches on disk, keyed by model identity and token prefix; they survive
restarts.

Layout: `<dir>/v<FORMAT>/<model digest>/<entry>.safetensors` (mlx-lm's `save_prompt_cache` format)
beside `<entry>.json` (format, model key, tokens, size, BLAKE2 digest of the data file), which is
what start-up reads; the digest is checked before an entry is used, so damaged bytes cost a miss,
never different output. The model key covers the weight files' sizes and modification times, so
weights replaced in place do not reuse the old model's KV. Files are written under a temporary name
and renamed, so a crash leaves no partial entry; anything partial, corrupt, foreign or of another
format version is logged, skipped and deleted (only files of this layout are ever removed: a
directory given by mistake keeps what else it holds). Writes happen on a
background thread so decoding never waits for the disk; eviction is least recently used under a
byte budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import (
    can_trim_prompt_cache,
    load_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

from mlx_flash import metrics

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
# Shorter prefixes are cheap to recompute and not worth a file.
MIN_TOKENS = 32
# Finished requests waiting to be written; beyond this, new ones are dropped (the RAM tier has them).
MAX_PENDING_WRITES = 16


@dataclass
class _Entry:
    name: str
    tokens: tuple[int, ...]
    nbytes: int
    digest: str
    used: float


def model_key(path: Path, config: dict[str, Any]) -> str:
    """What identifies a model's KV: where its weights are, its config, and the weight files (names,
    sizes, modification times: weights rewritten in place make another model)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.glob("*.safetensors"))
    weights = hashlib.sha256(repr(files).encode()).hexdigest()
    return f"{path.resolve()}|{digest}|{weights}"


def file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "blake2b").hexdigest()


class DiskCache:
    def __init__(self, root: Path, key: str, max_bytes: int, model_id: str) -> None:
        self.key = key
        self.max_bytes = max_bytes
        self.dir = root / f"v{FORMAT_VERSION}" / hashlib.sha256(key.encode()).hexdigest()[:24]
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._writes: queue.Queue[tuple[tuple[int, ...], list[Any]] | None] = queue.Queue(MAX_PENDING_WRITES)
        self._hits = metrics.PREFIX_CACHE_HITS.labels(model=model_id, tier="ssd")
        self._reused = metrics.PREFIX_CACHE_TOKENS.labels(model=model_id, tier="ssd")
        self._bytes = metrics.PREFIX_CACHE_BYTES.labels(model=model_id, tier="ssd")
        self._evictions = metrics.PREFIX_CACHE_EVICTIONS.labels(model=model_id, tier="ssd")
        self._forget_other_versions(root)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, name="prefix-cache-writer", daemon=True)
        self._writer.start()

    # ---------------------------------------------------------------- reading

    def fetch(self, tokens: list[int], longer_than: int = 0) -> tuple[list[Any] | None, int]:
        """The cached KV for the longest usable prefix of `tokens` and its length (< len(tokens)),
        if that is longer than `longer_than` tokens (what the RAM tier already has)."""
        best: tuple[int, _Entry] | None = None
        with self._lock:
            for entry in self._entries.values():
                n = _common_prefix(entry.tokens, tokens)
                n = min(n, len(tokens) - 1)  # generation starts from the last prompt token
                if n > longer_than and (best is None or n > best[0]):
                    best = (n, entry)
        if best is None:
            return None, 0
        n, entry = best
        try:
            path = self.dir / f"{entry.name}.safetensors"
            if file_digest(path) != entry.digest:
                raise ValueError("its data does not match its digest")
            cache, meta = load_prompt_cache(str(path), return_metadata=True)  # type: ignore[no-untyped-call]
            if meta.get("model") != self.key or json.loads(meta["tokens"]) != list(entry.tokens):
                raise ValueError("entry does not match its index")
            if n < len(entry.tokens):
                if not can_trim_prompt_cache(cache):
                    return None, 0
                trim_prompt_cache(cache, len(entry.tokens) - n)
        except Exception as e:  # a corrupt or foreign file must cost a miss, never a crash
            extra = {"entry": entry.name, "error": str(e)}
            log.warning("dropping unreadable prefix cache entry", extra=extra)
            self._remove(entry.name)
            return None, 0
        with self._lock:
            entry.used = time.time()
        with contextlib.suppress(OSError):
            os.utime(self.dir / f"{entry.name}.json")
        self._hits.inc()
        self._reused.inc(n)
        return cache, n

    # ---------------------------------------------------------------- writing

    def store(self, tokens: list[int], cache: list[Any]) -> None:
        """Queue the KV of `tokens` for writing (dropped if the writer is behind)."""
        key = tuple(tokens)
        if len(key) < MIN_TOKENS:
            return
        with self._lock:
            if any(e.tokens == key for e in self._entries.values()):
                return
        if self._writes.full():
            return
        # Finish computing the arrays here, on the engine thread that owns their stream; the writer
        # thread only copies bytes.
        mx.eval([c.state for c in cache])
        with contextlib.suppress(queue.Full):
            self._writes.put_nowait((key, cache))

    def close(self) -> None:
        self._writes.put(None)
        self._writer.join(30)

    def _write_loop(self) -> None:
        while (job := self._writes.get()) is not None:
            try:
                self._write(*job)
            except Exception:
                log.exception("could not write a prefix cache entry", extra={"dir": str(self.dir)})

    def _write(self, tokens: tuple[int, ...], cache: list[Any]) -> None:
        name = hashlib.sha256(self.key.encode() + repr(tokens).encode()).hexdigest()[:32]
        # mlx appends ".safetensors" to names without it, so the temporary name keeps the suffix.
        tmp = self.dir / f".{name}.tmp.safetensors"
        final = self.dir / f"{name}.safetensors"
        save_prompt_cache(str(tmp), cache, {"model": self.key, "tokens": json.dumps(list(tokens))})
        digest = file_digest(tmp)
        os.replace(tmp, final)
        nbytes = final.stat().st_size
        index = {
            "format": FORMAT_VERSION,
            "model": self.key,
            "tokens": list(tokens),
            "nbytes": nbytes,
            "digest": digest,
        }
        tmp_index = self.dir / f".{name}.json.tmp"
        tmp_index.write_text(json.dumps(index))
        os.replace(tmp_index, self.dir / f"{name}.json")
        with self._lock:
            self._entries[name] = _Entry(name, tokens, nbytes, digest, time.time())
        self._evict()

    def _evict(self) -> None:
        while True:
            with self._lock:
                total = sum(e.nbytes for e in self._entries.values())
                if total <= self.max_bytes or not self._entries:
                    self._bytes.set(total)
                    return
                oldest = min(self._entries.values(), key=lambda e: e.used).name
            self._remove(oldest)
            self._evictions.inc()

    # ---------------------------------------------------------------- start-up and removal

    def _scan(self) -> None:
        for path in self.dir.iterdir():
            if not path.is_file():
                log.warning("ignoring a foreign entry in the prefix cache", extra={"path": str(path)})
            elif path.name.startswith("."):  # a write that never finished
                path.unlink(missing_ok=True)
        for index in self.dir.glob("*.json"):
            name = index.stem
            if not index.is_file():
                continue
            try:
                meta = json.loads(index.read_text())
                ok = (
                    meta["format"] == FORMAT_VERSION
                    and meta["model"] == self.key
                    and (self.dir / f"{name}.safetensors").stat().st_size == meta["nbytes"]
                )
                if not ok:
                    raise ValueError("format, model or size differs")
                tokens = tuple(int(t) for t in meta["tokens"])
                digest = str(meta["digest"])
            except Exception as e:
                log.warning("dropping invalid prefix cache entry", extra={"entry": name, "error": str(e)})
                self._remove(name)
                continue
            self._entries[name] = _Entry(name, tokens, int(meta["nbytes"]), digest, index.stat().st_mtime)
        for data in self.dir.glob("*.safetensors"):
            if data.stem not in self._entries and data.is_file():  # no index: a crash mid-entry
                data.unlink(missing_ok=True)
        log.info("prefix cache on disk", extra={"dir": str(self.dir), "entries": len(self._entries)})
        self._evict()

    def _remove(self, name: str) -> None:
        with self._lock:
            self._entries.pop(name, None)
        for suffix in (".json", ".safetensors"):
            path = self.dir / f"{name}{suffix}"
            if path.is_file():
                path.unlink(missing_ok=True)

    def _forget_other_versions(self, root: Path) -> None:
        """Remove `v<N>` directories of another format version: only ones laid out as ours
        (model directories holding entry files), never anything else `root` holds."""
        if not root.is_dir():
            return
        for path in root.iterdir():
            if path.name != f"v{FORMAT_VERSION}" and re.fullmatch(r"v\d+", path.name) and _our_layout(path):
                log.warning("removing prefix cache of another format version", extra={"dir": str(path)})
                shutil.rmtree(path, ignore_errors=True)


def _our_layout(version_dir: Path) -> bool:
    """A format-version directory as this module writes them: directories of entry files only."""
    if not version_dir.is_dir() or version_dir.is_symlink():
        return False
    for model_dir in version_dir.iterdir():
        if not model_dir.is_dir() or model_dir.is_symlink():
            return False
        for f in model_dir.iterdir():
            if not (f.is_file() and f.name.endswith((".json", ".safetensors", ".json.tmp"))):
                return False
    return True


def _common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
