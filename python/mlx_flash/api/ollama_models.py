"""Ollama's model endpoints: GET /, /api/version, /api/tags, /api/ps, POST /api/show, `keep_alive`,
and a clear 501 for what a server of local mlx-lm models does not do (pull, push, create, ...)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import math
import re
import time
from pathlib import Path
from typing import Any

from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_config, load_tokenizer
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from mlx_flash.api.body import read_json_object
from mlx_flash.api.errors import ApiError, InvalidRequest
from mlx_flash.models.loader import resolve, weight_file_bytes
from mlx_flash.models.scheduler import Entry, Scheduler
from mlx_flash.worker_state import WorkerState

# The Ollama release whose API this surface follows; clients gate features on it.
OLLAMA_VERSION = "0.12.0"
FOREVER = "2318-11-26T00:00:00Z"  # what Ollama reports for keep_alive -1
DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# Go's time.Duration, which Ollama parses keep_alive into: int64 nanoseconds.
MAX_DURATION_S = 2**63 / 1e9
# What /api/generate and /api/chat sample with when `options` leaves them out (Ollama's defaults).
DEFAULT_OPTIONS = {"temperature": 0.8, "top_p": 0.9, "top_k": 40}
NOT_SUPPORTED = ("pull", "push", "create", "delete", "copy", "blobs/{digest}")


class NotImplementedHere(ApiError):
    status = 501
    code = "not_implemented"


def rfc3339(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).isoformat().replace("+00:00", "Z")


def parse_keep_alive(value: Any) -> float | None:
    """Seconds to keep the model loaded after this request (negative: forever), or None if not given.
    Numbers are seconds; strings are Go durations ("5m", "1h30m") or a number of seconds."""
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is None:
        raise InvalidRequest(
            f'keep_alive must be a duration such as "5m" or a number of seconds, not {value!r}'
        )
    if not math.isfinite(seconds) or abs(seconds) > MAX_DURATION_S:
        raise InvalidRequest(f"keep_alive {value!r} is longer than a duration can be (about 292 years)")
    return seconds


def _seconds(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        with contextlib.suppress(ValueError):
            return float(text)
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("+-")
        parts = DURATION.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return sign * sum(float(n) * UNITS[u] for n, u in parts)
    return None


class KeepAlive:
    """Per-model unload deadlines set by `keep_alive` (the worker's --idle-ttl applies otherwise)."""

    def __init__(self) -> None:
        self.deadlines: dict[str, float | None] = {}  # target -> epoch seconds, None: forever
        self._tasks: set[asyncio.Task[None]] = set()

    def set(self, scheduler: Scheduler, entry: Entry, seconds: float) -> None:
        deadline = None if seconds < 0 else time.time() + seconds
        self.deadlines[entry.target] = deadline
        if deadline is not None:
            task = asyncio.create_task(self._unload_at(scheduler, entry, deadline))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _unload_at(self, scheduler: Scheduler, entry: Entry, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - time.time()))
        # Requests still running keep the model until they end (the one that set this one included).
        while entry.holders:
            if self.deadlines.get(entry.target) != deadline:
                return  # a later request set another deadline
            await asyncio.sleep(0.1)
        if self.deadlines.get(entry.target) != deadline:
            return
        with contextlib.suppress(ApiError):  # busy or pinned: it stays
            await scheduler.unload(entry.id)
        if self.deadlines.get(entry.target) == deadline:
            del self.deadlines[entry.target]

    def expires_at(self, scheduler: Scheduler, entry: Entry) -> str:
        if entry.target in self.deadlines:
            deadline = self.deadlines[entry.target]
            return FOREVER if deadline is None else rfc3339(deadline)
        ttl = scheduler.config.idle_ttl
        if ttl <= 0 or entry.pinned:
            return FOREVER
        return rfc3339(time.time() - (time.monotonic() - entry.last_used) + ttl)


def keep_alive(request: Request) -> KeepAlive:
    app_state = request.app.state
    if not hasattr(app_state, "keep_alive"):
        app_state.keep_alive = KeepAlive()
    kept: KeepAlive = app_state.keep_alive
    return kept


def scheduler_of(request: Request) -> Scheduler:
    state: WorkerState = request.app.state.worker
    return state.scheduler


# ---------------------------------------------------------------- model descriptions


def _path(entry: Entry) -> Path | None:
    if entry.engine is not None:
        return entry.engine.loaded.path
    try:
        return resolve(entry.target, download=False)
    except FileNotFoundError:
        return None


def _details(config: dict[str, Any]) -> dict[str, Any]:
    family = str(config.get("model_type", ""))
    bits = (config.get("quantization") or {}).get("bits")
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "")
    level = f"Q{bits}" if bits else {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}.get(dtype, "")
    return {
        "parent_model": "",
        "format": "safetensors",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": "",
        "quantization_level": level,
    }


def _card(entry: Entry) -> dict[str, Any]:
    """An /api/tags item (read from disk, without loading the model)."""
    path = _path(entry)
    config = load_config(path) if path is not None and (path / "config.json").is_file() else {}
    modified = path.stat().st_mtime if path is not None else time.time()
    return {
        "name": entry.id,
        "model": entry.id,
        "modified_at": rfc3339(modified),
        "size": weight_file_bytes(path) if path is not None else 0,
        # Ollama's digest is of the model's manifest; ours names the model, stable across restarts.
        "digest": hashlib.sha256(entry.target.encode()).hexdigest(),
        "details": _details(config),
    }


async def tags(request: Request) -> Response:
    entries = scheduler_of(request).models()
    return JSONResponse({"models": [await run_in_threadpool(_card, e) for e in entries]})


async def ps(request: Request) -> Response:
    scheduler = scheduler_of(request)
    kept = keep_alive(request)
    models = []
    for entry in scheduler.models():
        if entry.engine is None:
            continue
        card = await run_in_threadpool(_card, entry)
        models.append(
            {
                **card,
                "size": entry.reserved,
                "size_vram": entry.reserved,
                "expires_at": kept.expires_at(scheduler, entry),
                "context_length": entry.engine.loaded.context_length,
            }
        )
    return JSONResponse({"models": models})


def _show(entry: Entry) -> dict[str, Any]:
    path = _path(entry)
    if path is None:
        raise InvalidRequest(f"The model '{entry.id}' is not available locally.")
    config = load_config(path)
    tokenizer: TokenizerWrapper = (
        entry.engine.loaded.tokenizer if entry.engine is not None else load_tokenizer(path)  # type: ignore[no-untyped-call]
    )
    arch = str(config.get("model_type", "unknown"))
    text = config.get("text_config", config)
    info: dict[str, Any] = {"general.architecture": arch}
    for key, ours in (
        ("context_length", "max_position_embeddings"),
        ("embedding_length", "hidden_size"),
        ("block_count", "num_hidden_layers"),
        ("attention.head_count", "num_attention_heads"),
        ("attention.head_count_kv", "num_key_value_heads"),
    ):
        if isinstance(text.get(ours), int):
            info[f"{arch}.{key}"] = text[ours]
    capabilities = ["completion"]
    if tokenizer.has_tool_calling:
        capabilities.append("tools")
    if tokenizer.has_thinking:
        capabilities.append("thinking")
    card = _card(entry)
    return {
        "modelfile": "",
        "parameters": "\n".join(f"{k:<15}{v}" for k, v in DEFAULT_OPTIONS.items()),
        "template": tokenizer.chat_template or "",
        "details": card["details"],
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": card["modified_at"],
    }


async def show(request: Request) -> Response:
    state: WorkerState = request.app.state.worker
    body = await read_json_object(request, state.config.max_body_bytes)
    name = body.get("model") or body.get("name")  # `name` is the deprecated spelling
    if not isinstance(name, str) or not name:
        raise InvalidRequest("model is required")
    return JSONResponse(await run_in_threadpool(_show, state.scheduler.lookup(name)))


async def root(request: Request) -> Response:
    return PlainTextResponse("Ollama is running")


async def version(request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_VERSION})


async def not_supported(request: Request) -> Response:
    action = request.url.path.removeprefix("/api/").split("/")[0]
    raise NotImplementedHere(
        f"/api/{action} is not supported by mlx-flash: it serves mlx-lm models from local directories and "
        "the Hugging Face cache (load one with POST /admin/api/models/{name}/load)."
    )


def routes() -> list[BaseRoute]:
    return [
        Route("/", root, methods=["GET"]),
        Route("/api/version", version, methods=["GET"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        *(Route(f"/api/{p}", not_supported, methods=["POST", "DELETE", "HEAD"]) for p in NOT_SUPPORTED),
    ]
