"""Each API's own error shape; the worker's handlers pick one by path so an Anthropic or Ollama client
sees errors it can parse (unknown routes, 413, auth, model and admission errors alike)."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from mlx_flash import metrics
from mlx_flash.api import openai
from mlx_flash.api.errors import ApiError

# Anthropic's error types by status (its SDK maps them to exception classes).
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_body(err: ApiError) -> dict[str, Any]:
    metrics.ERRORS.labels(reason=err.code or err.type).inc()
    kind = ANTHROPIC_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def ollama_body(err: ApiError) -> dict[str, Any]:
    metrics.ERRORS.labels(reason=err.code or err.type).inc()
    return {"error": err.message}


def is_anthropic(path: str) -> bool:
    return path.startswith(("/v1/messages", "/messages"))


def is_ollama(path: str) -> bool:
    return path.startswith("/api/")


def error_response(path: str, err: ApiError) -> JSONResponse:
    """`err` in the shape of the API `path` belongs to (OpenAI's for everything else)."""
    if is_anthropic(path):
        body = anthropic_body(err)
    elif is_ollama(path):
        body = ollama_body(err)
    else:
        body = openai.error_body(err)
    return JSONResponse(body, status_code=err.status, headers=err.headers())
