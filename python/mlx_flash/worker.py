"""The worker process: a Starlette app under uvicorn that owns one MLX model.

mlx-flash worker --model demo --host 127.0.0.1 --port 8081
python -m mlx_flash.worker --model ./my-model --port 0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable

import mlx.core as mx
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlx_flash import __version__, blas, memory, metrics
from mlx_flash import logging as json_logging
from mlx_flash.api import admin, anthropic, ollama, openai, responses
from mlx_flash.api.error_shapes import error_response
from mlx_flash.api.errors import (
    ApiError,
    InternalError,
    MethodNotAllowed,
    ModelTooLarge,
    RouteNotFound,
    Unauthorized,
)
from mlx_flash.config import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MEMORY_FRACTION,
    DEFAULT_PREFILL_BUDGET,
    DEFAULT_PREFILL_STEP,
    DEFAULT_PREFIX_CACHE_DISK_BYTES,
    DEFAULT_QUEUE_TIMEOUT,
    WorkerConfig,
    env_default,
    env_int,
    parse_bytes,
)
from mlx_flash.experts.policy import POLICIES
from mlx_flash.worker_state import WorkerState

# Named explicitly: run as `python -m mlx_flash.worker`, __name__ is "__main__".
log = logging.getLogger("mlx_flash.worker")
# A client's X-Request-Id is kept only if it cannot forge log lines (the sidecar's rule).
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

UNAUTHENTICATED = {"/health", "/ready"}
# Seconds an idle client connection stays open: longer than the sidecar keeps an idle pooled one (60), so
# the sidecar closes it first (a worker closing first races the sidecar's next request on it).
KEEP_ALIVE_S = 75
# Route -> the API it belongs to (the `api` label); every other route is "other".
ROUTE_APIS = {
    "/chat/completions": "openai",
    "/completions": "openai",
    "/models": "openai",
    "/models/{model}": "openai",
    "/health": "server",
    "/ready": "server",
    "/metrics": "server",
    "/admin": "admin",
    "/messages": "anthropic",
    "/messages/count_tokens": "anthropic",
    "/responses": "responses",
    "/responses/{id}": "responses",
    "/": "ollama",
    "/api/version": "ollama",
    "/api/tags": "ollama",
    "/api/show": "ollama",
    "/api/ps": "ollama",
    "/api/generate": "ollama",
    "/api/chat": "ollama",
}


def route_label(path: str) -> str:
    """A bounded label for metrics: the route, never the raw path."""
    if path.startswith("/admin/"):
        return "/admin"
    path = path.removeprefix("/v1")
    if path.startswith("/models/"):
        return "/models/{model}"
    if path.startswith("/responses/"):
        return "/responses/{id}"
    return path if path in ROUTE_APIS else "other"


class Observe:
    """Request id, API key check, one JSON log line and metrics per request (streams included)."""

    def __init__(self, app: ASGIApp, config: WorkerConfig) -> None:
        self.app = app
        self.api_key = config.api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("x-request-id", "")
        if not _SANE_ID.fullmatch(request_id):
            request_id = uuid.uuid4().hex
        status = 500
        started = False
        context = json_logging.start_request(request_id)

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if self.api_key and scope["path"] not in UNAUTHENTICATED and not self._authorized(headers):
                err = Unauthorized("Missing or incorrect API key (send 'Authorization: Bearer <key>').")
                await error_response(scope["path"], err)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception as exc:
            # A bug: the traceback goes to the log, never to the client. Answered here rather than by
            # Starlette's error middleware, which re-raises so that uvicorn closes the connection, and the
            # sidecar's next request on that pooled connection would fail.
            log.error("unhandled error", exc_info=exc, extra={"path": scope["path"]})
            if started:  # mid-response: closing the connection is what tells the client
                raise
            await error_response(scope["path"], InternalError())(scope, receive, send_with_id)
        finally:
            route = route_label(scope["path"])
            elapsed = time.perf_counter() - start
            api = ROUTE_APIS.get(route, "other")
            metrics.REQUESTS.labels(api=api, route=route, status=str(status)).inc()
            metrics.REQUEST_SECONDS.labels(route=route).observe(elapsed)
            if route not in ("/health", "/ready", "/metrics"):
                # Successful reads (model lists the sidecar and the admin page poll) only at debug.
                quiet = scope["method"] == "GET" and status < 400
                log.log(
                    logging.DEBUG if quiet else logging.INFO,
                    "request",
                    extra={
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "seconds": round(elapsed, 4),
                    },
                )
            json_logging.end_request(context)

    def _authorized(self, headers: dict[str, str]) -> bool:
        assert self.api_key is not None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        bearer = token.strip() if scheme.lower() == "bearer" else scheme  # the scheme is case-insensitive
        key = self.api_key.encode()
        return any(
            hmac.compare_digest(given.encode(), key) for given in (headers.get("x-api-key", ""), bearer)
        )


async def health(request: Request) -> Response:
    # The sidecar's liveness ping; it routes away from workers under memory pressure.
    return JSONResponse({"status": "ok", "version": __version__, "memory": memory.snapshot()})


async def ready(request: Request) -> Response:
    state: WorkerState = request.app.state.worker
    if state.ready:
        return JSONResponse({"status": "ready", "models": [e.loaded.id for e in state.scheduler.loaded()]})
    status = "failed" if state.load_error else "loading"
    return JSONResponse({"status": status, "error": state.load_error}, status_code=503)


async def prometheus(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(request.url.path, exc)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    path = request.url.path
    if exc.status_code == 404:
        return error_response(path, RouteNotFound(f"Unknown route {request.method} {path}"))
    if exc.status_code == 405:
        return error_response(path, MethodNotAllowed(f"Method {request.method} is not allowed for {path}"))
    return error_response(path, ApiError(str(exc.detail)))


def create_app(state: WorkerState, on_fatal: Callable[[], None] | None = None) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.worker = state
        tasks = [
            asyncio.create_task(_load_startup_models(state, on_fatal)),
            asyncio.create_task(state.scheduler.expire_idle()),
        ]
        async with contextlib.AsyncExitStack() as stack:
            if mcp is not None:
                await stack.enter_async_context(mcp.session_manager.run())
            yield
        for task in tasks:
            task.cancel()
        await state.close()

    routes = [
        Route("/health", health),
        Route("/ready", ready),
        Route("/metrics", prometheus),
        *openai.routes(),
        *anthropic.routes(),
        *responses.routes(),
        *ollama.routes(),
        *admin.routes(),
    ]
    mcp = None
    if state.config.sidecar_url:  # behind a sidecar: MCP's tools call its API
        from mlx_flash.mcp import server as mcp_server

        mcp_app, mcp = mcp_server.http_app(state.config.sidecar_url)
        routes.extend(mcp_app.routes)
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={ApiError: api_error, HTTPException: http_error},
    )
    app.add_middleware(Observe, config=state.config)
    return app


async def _load_startup_models(state: WorkerState, on_fatal: Callable[[], None] | None) -> None:
    """Load --model and --pin models in order; the worker is ready once all are in."""
    for name in state.config.startup_models:
        try:
            await state.scheduler.load(name)
        except Exception as e:
            log.error("model failed to load", extra={"model": name, "error": str(e)})
            state.load_error = str(e) if isinstance(e, ApiError) else f"{type(e).__name__}: {e}"
            state.load_hopeless = hopeless(e)
            if on_fatal is not None:
                on_fatal()
            return
    state.ready = True
    log.info("ready", extra={"models": list(state.config.startup_models)})


# Exit status of a worker whose startup models cannot load for a reason a restart does not fix; its
# supervisor gives up on it at once rather than retrying (sidecar/src/workers/supervisor.rs: the same
# constant).
EXIT_CANNOT_LOAD = 3


def hopeless(e: Exception) -> bool:
    """Whether a failed load would fail the same way again: a model larger than the memory limit, or
    one whose files do not load (damaged, incomplete, unsupported). Memory that may free up, a queue
    that may drain, a hub that may become reachable are worth a retry."""
    if isinstance(e, ModelTooLarge):
        return True
    return isinstance(e, InternalError) and not isinstance(e.__cause__, MemoryError)


def _bind(config: WorkerConfig) -> socket.socket:
    if config.uds:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(config.uds)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(config.uds)
        os.chmod(config.uds, 0o600)
    else:
        info = socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    sock.listen(2048)
    return sock


def _exit_with_parent(parent_pid: int, server: uvicorn.Server) -> None:
    """A supervised worker must not outlive its sidecar, even one killed with SIGKILL."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    log.warning("parent process is gone; shutting down", extra={"parent_pid": parent_pid})
    server.should_exit = True
    time.sleep(10)
    os._exit(1)


def _log_blas() -> None:
    libraries = blas.mapped()
    hint = blas.advice(libraries, str(mx.default_device()), blas.installed_openblas())
    log.info("blas", extra={"libraries": libraries, **({"hint": hint} if hint else {})})


def run(config: WorkerConfig) -> int:
    """Serve until interrupted; the model loads in the background while /ready says 503."""
    json_logging.configure(config.log_level, config.log_format, config.log_file, config.worker_id)
    state = WorkerState(config)
    try:
        config.validate()
        log.info("memory limit", extra={"bytes": state.scheduler.limit})  # reads --aliases, --pin too
        _log_blas()
        sock = _bind(config)
    except (ValueError, OSError, ApiError) as e:
        message = e.message if isinstance(e, ApiError) else str(e)
        print(f"mlx-flash: error: {message}", file=sys.stderr)  # noqa: T201 - user-facing
        return 2
    server: uvicorn.Server

    def stop() -> None:
        server.should_exit = True

    server = uvicorn.Server(
        uvicorn.Config(
            create_app(state, stop),
            log_config=None,
            timeout_graceful_shutdown=10,
            timeout_keep_alive=KEEP_ALIVE_S,
        )
    )
    if config.uds:
        log.info("listening", extra={"uds": config.uds})
    else:
        host, port = sock.getsockname()[:2]
        log.info("listening", extra={"host": host, "port": port, "url": f"http://{host}:{port}"})
    if config.parent_pid is not None:
        watch = threading.Thread(
            target=_exit_with_parent, args=(config.parent_pid, server), name="parent-watch", daemon=True
        )
        watch.start()
    server.run(sockets=[sock])
    if state.load_error:
        # Out now, past interpreter teardown: a load that failed part way can leave native threads
        # that abort the process while static objects are destroyed (exit status 134, not 1).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CANNOT_LOAD if state.load_hopeless else 1)
    return 0


def _bytes(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """Flags about models, memory and caches; `mlx-flash serve` hands them to its workers."""
    p.add_argument("--pin", action="append", default=[], help="load at start and never evict; repeatable")
    p.add_argument(
        "--aliases",
        default=env_default("ALIASES", None),
        help='a TOML file with an [aliases] table (name = "org/repo" or a directory); overrides built-ins',
    )
    p.add_argument(
        "--memory-limit",
        default=env_default("MEMORY_LIMIT", None),
        help="ceiling for weights, prefix caches and KV: bytes, 12G, 512M, or a share like 60%% "
        f"(default {DEFAULT_MEMORY_FRACTION * 100:.0f}%% of memory, split between the host's workers)",
    )
    p.add_argument(
        "--idle-ttl",
        type=float,
        default=float(env_default("IDLE_TTL", "0") or 0),
        help="unload a model idle this many seconds (0: keep until its memory is needed)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=env_int("MAX_QUEUE", DEFAULT_MAX_QUEUE),
        help="requests that may wait for memory; more get 503",
    )
    p.add_argument(
        "--queue-timeout",
        type=float,
        default=float(env_default("QUEUE_TIMEOUT", str(DEFAULT_QUEUE_TIMEOUT)) or DEFAULT_QUEUE_TIMEOUT),
        help="seconds a request may wait for memory before 503 with Retry-After",
    )
    p.add_argument(
        "--kv-bits",
        type=int,
        default=env_int("KV_BITS", 0) or None,
        help="quantize the KV cache to this many bits (mlx-lm's, from --quantized-kv-start tokens on); "
        "requests then run one at a time, without batching, and the SSD prefix tier is off",
    )
    p.add_argument("--kv-group-size", type=int, default=64, help="group size of KV quantization")
    p.add_argument(
        "--quantized-kv-start", type=int, default=5000, help="tokens kept unquantized before KV quantization"
    )
    p.add_argument(
        "--prefill-step",
        type=int,
        default=DEFAULT_PREFILL_STEP,
        help="most prompt tokens read per prompt between two decode steps",
    )
    p.add_argument(
        "--prefill-budget",
        type=float,
        default=DEFAULT_PREFILL_BUDGET,
        help="while streams decode, size prefill chunks to take about this many decode steps, so streams "
        "slow to about (1 + this) times their idle inter-token time during a long prompt; 0: always "
        "--prefill-step tokens (fastest prefill, streams stall)",
    )
    p.add_argument(
        "--expert-trace",
        metavar="FILE",
        help="append the experts each token uses in each MoE layer to FILE (JSON lines; slows generation); "
        "`mlx-flash experts replay FILE` compares cache policies on it",
    )
    p.add_argument(
        "--expert-memory",
        default=env_default("EXPERT_MEMORY", "auto"),
        help="bytes of a MoE model's experts kept in memory (12G, 512M); the rest stream from its "
        "safetensors files as layers need them, with the same output. auto (default): every expert "
        "if the model fits under --memory-limit, else what fits. Pools shrink under memory pressure",
    )
    p.add_argument(
        "--expert-policy",
        default=env_default("EXPERT_POLICY", "decay"),
        choices=POLICIES,
        help="which expert a full pool evicts (mlx-flash experts replay compares them on a trace)",
    )
    p.add_argument(
        "--prefix-cache-bytes",
        type=_bytes,
        default=env_default("PREFIX_CACHE_BYTES", None),
        help="RAM budget of the prefix cache (KV reused across requests): bytes, 512M, 2G; 0 turns it "
        "off (default: 1 GiB, or an eighth of --memory-limit if that is less)",
    )
    p.add_argument(
        "--prefix-cache-dir",
        default=env_default("PREFIX_CACHE_DIR", None),
        help="keep prefix cache entries on disk here too (survives restarts)",
    )
    p.add_argument(
        "--prefix-cache-disk-bytes",
        type=_bytes,
        default=_bytes(env_default("PREFIX_CACHE_DISK_BYTES", str(DEFAULT_PREFIX_CACHE_DISK_BYTES)) or "0"),
        help="disk budget of the prefix cache",
    )


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        action="append",
        help="a model to load at start: 'demo' (built in), a local mlx-lm model directory, a Hugging Face "
        "repo id, or an alias; repeat for several (default: demo, or MLX_FLASH_MODEL, comma-separated)",
    )
    add_engine_flags(p)
    p.add_argument("--host", default=env_default("HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=env_int("PORT", 8080), help="0 picks a free port")
    p.add_argument(
        "--api-key",
        default=env_default("API_KEY", None),
        help="require this key (Bearer or x-api-key); mandatory off loopback",
    )
    p.add_argument("--uds", default=None, help="listen on this Unix socket instead of host:port")
    p.add_argument(
        "--parent-pid", type=int, default=None, help="exit when this process (the supervisor) goes away"
    )
    p.add_argument("--worker-id", default=None, help="set by the sidecar: names this worker's SSD cache dir")
    p.add_argument(
        "--sidecar-url",
        default=None,
        help="set by the sidecar: serve MCP at /mcp, its tools calling this URL",
    )
    p.add_argument(
        "--local-workers", type=int, default=1, help="set by the sidecar: workers sharing this host"
    )
    p.add_argument("--max-body-bytes", type=int, default=env_int("MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES))
    p.add_argument(
        "--log-level", default=env_default("LOG_LEVEL", "info"), choices=["debug", "info", "warning", "error"]
    )
    p.add_argument("--log-format", default=env_default("LOG_FORMAT", "json"), choices=["json", "text"])
    p.add_argument(
        "--log-file", default=env_default("LOG_FILE", None), help="append log lines here, not stderr"
    )


def config_from(args: argparse.Namespace) -> WorkerConfig:
    from_env = [m for m in (env_default("MODEL", "") or "").split(",") if m]
    models = args.model or from_env or ([] if args.pin else ["demo"])
    return WorkerConfig(
        models=tuple(models),
        pins=tuple(args.pin),
        aliases=args.aliases,
        memory_limit=args.memory_limit,
        idle_ttl=args.idle_ttl,
        max_queue=args.max_queue,
        queue_timeout=args.queue_timeout,
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        quantized_kv_start=args.quantized_kv_start,
        prefill_step=args.prefill_step,
        prefill_budget=args.prefill_budget,
        expert_trace=args.expert_trace,
        expert_memory=args.expert_memory,
        expert_policy=args.expert_policy,
        sidecar_url=args.sidecar_url,
        host=args.host,
        port=args.port,
        uds=args.uds,
        parent_pid=args.parent_pid,
        worker_id=args.worker_id,
        local_workers=args.local_workers,
        api_key=args.api_key,
        max_body_bytes=args.max_body_bytes,
        prefix_cache_bytes=args.prefix_cache_bytes,
        prefix_cache_dir=args.prefix_cache_dir,
        prefix_cache_disk_bytes=args.prefix_cache_disk_bytes,
        log_level=args.log_level,
        log_format=args.log_format,
        log_file=args.log_file,
    )


def main(argv: list[str] | None = None, prog: str = "python -m mlx_flash.worker") -> int:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_worker_flags(p)
    return run(config_from(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
