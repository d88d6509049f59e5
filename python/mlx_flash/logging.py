"""Log lines with the sidecar's schema: `ts`, `level`, `component`, `msg`, then `request_id`,
`worker` and `model` when known, then event fields. JSON (one object per line) or text.

A request's id and model live in a context variable set by the worker's middleware, so every line
logged while serving it carries them; the engine thread, which runs outside that context, passes
`request_fields()` captured at submit time as `extra=`.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

import orjson

# Attributes every LogRecord has; anything else was passed in `extra=` and is logged as a field.
# (uvicorn adds `color_message`, a duplicate of msg with terminal colours.)
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
}
_HEAD = ("ts", "level", "component", "msg")
_LEVELS = {"WARNING": "warning", "CRITICAL": "error"}

_request: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("request", default=None)


def start_request(request_id: str) -> contextvars.Token[dict[str, Any] | None]:
    """Lines logged from here on in this context are about request `request_id`."""
    return _request.set({"request_id": request_id})


def end_request(token: contextvars.Token[dict[str, Any] | None]) -> None:
    _request.reset(token)


def bind(**fields: Any) -> None:
    """Add fields (e.g. `model`) to every later line about the current request."""
    current = _request.get()
    if current is not None:
        current.update(fields)


def request_fields() -> dict[str, Any]:
    """The current request's fields, to pass as `extra=` from another thread."""
    return dict(_request.get() or {})


def component(logger: str) -> str:
    """`mlx_flash.models.scheduler` → `worker.scheduler`; `uvicorn.error` → `worker.uvicorn`."""
    if logger.startswith("mlx_flash"):
        return f"worker.{logger.rsplit('.', 1)[-1]}"
    return f"worker.{logger.split('.', 1)[0]}"


class _Fields(logging.Filter):
    """Adds the request's fields and this worker's id to every record that lacks them."""

    def __init__(self, worker: str | None) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_request.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        if self.worker is not None and not hasattr(record, "worker"):
            record.worker = self.worker
        return True


def entry(record: logging.LogRecord, exc_text: str | None = None) -> dict[str, Any]:
    line: dict[str, Any] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        "level": _LEVELS.get(record.levelname, record.levelname.lower()),
        "component": component(record.name),
        "msg": record.getMessage(),
    }
    for key in ("request_id", "worker", "model"):
        if key in vars(record):
            line[key] = vars(record)[key]
    for key, value in vars(record).items():
        if key not in _STANDARD and key not in line and not key.startswith("_"):
            line[key] = value
    if exc_text:
        line["exception"] = exc_text
    return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        exc = self.formatException(record.exc_info) if record.exc_info else None
        return orjson.dumps(entry(record, exc), default=str).decode()


class TextFormatter(logging.Formatter):
    """`ts LEVEL component msg key=value ...`, the sidecar's text format."""

    def format(self, record: logging.LogRecord) -> str:
        exc = self.formatException(record.exc_info) if record.exc_info else None
        line = entry(record)
        head = f"{line['ts']} {line['level'].upper():<7} {line['component']} {line['msg']}"
        fields = [f"{k}={_text_value(v)}" for k, v in line.items() if k not in _HEAD]
        text = " ".join([head, *fields])
        return f"{text}\n{exc}" if exc else text


def _text_value(value: Any) -> str:
    if isinstance(value, str) and value and not any(c in value for c in ' "=\n'):
        return value
    return orjson.dumps(value, default=str).decode()


def configure(
    level: str = "info", fmt: str = "json", file: str | None = None, worker: str | None = None
) -> None:
    """Log at `level` as `fmt` (json or text) to `file` (appended) or stderr."""
    handler: logging.Handler = logging.FileHandler(file) if file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
    handler.addFilter(_Fields(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # uvicorn's own access log is replaced by our per-request line.
    logging.getLogger("uvicorn.access").disabled = True
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
