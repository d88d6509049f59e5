"""The worker's model admin API: what is loaded, and load or unload by name.

GET  /admin/api/models
POST /admin/api/models/{name}/load     (may download a hub model; waits until it is loaded)
POST /admin/api/models/{name}/unload
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from mlx_flash.api.errors import ApiError
from mlx_flash.worker_state import WorkerState


class CrossOrigin(ApiError):
    status = 403
    code = "cross_origin"


def _same_origin(request: Request) -> None:
    """A web page on another origin must not drive the admin API of a server on localhost."""
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise CrossOrigin("Admin actions are refused from another origin.")


async def models(request: Request) -> Response:
    state: WorkerState = request.app.state.worker
    return JSONResponse(state.scheduler.status())


async def load(request: Request) -> Response:
    _same_origin(request)
    scheduler = request.app.state.worker.scheduler
    entry = await scheduler.load(request.path_params["name"])
    return JSONResponse({"model": scheduler.describe(entry)})


async def unload(request: Request) -> Response:
    _same_origin(request)
    scheduler = request.app.state.worker.scheduler
    entry = await scheduler.unload(request.path_params["name"])
    return JSONResponse({"model": scheduler.describe(entry)})


def routes() -> list[BaseRoute]:
    return [
        Route("/admin/api/models", models, methods=["GET"]),
        Route("/admin/api/models/{name:path}/load", load, methods=["POST"]),
        Route("/admin/api/models/{name:path}/unload", unload, methods=["POST"]),
    ]
