"""The worker's log lines: the sidecar's schema, request fields from the context, text format."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

from mlx_flash import logging as json_logging


@pytest.fixture()
def log_file(tmp_path: Path) -> Path:
    path = tmp_path / "worker.log"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield path
    for handler in root.handlers:
        if handler not in saved[0]:
            handler.close()
    root.handlers[:], level = saved
    root.setLevel(level)


def _lines(path: Path) -> list[str]:
    for handler in logging.getLogger().handlers:
        handler.flush()
    return path.read_text().splitlines()


def test_json_lines_carry_the_request_fields_from_the_context(log_file: Path) -> None:
    json_logging.configure("info", "json", str(log_file), worker="worker-3")
    log = logging.getLogger("mlx_flash.engine.engine")
    token = json_logging.start_request("req-1")
    json_logging.bind(model="demo")
    log.info("inside", extra={"tokens": 5})
    captured = json_logging.request_fields()
    json_logging.end_request(token)
    log.warning("outside")
    # Another thread has no context: it passes the captured fields itself.
    thread = threading.Thread(target=lambda: log.info("on the engine thread", extra=captured))
    thread.start()
    thread.join()
    log.debug("below the level")
    inside, outside, engine = (json.loads(line) for line in _lines(log_file))
    assert list(inside)[:7] == ["ts", "level", "component", "msg", "request_id", "worker", "model"]
    assert inside | {"ts": None} == {
        "ts": None,
        "level": "info",
        "component": "worker.engine",
        "msg": "inside",
        "request_id": "req-1",
        "worker": "worker-3",
        "model": "demo",
        "tokens": 5,
    }
    assert outside["level"] == "warning" and "request_id" not in outside and outside["worker"] == "worker-3"
    assert engine["request_id"] == "req-1" and engine["model"] == "demo"


def test_text_lines_match_the_sidecars(log_file: Path) -> None:
    json_logging.configure("debug", "text", str(log_file))
    token = json_logging.start_request("req-2")
    logging.getLogger("uvicorn.error").info("started", extra={"path": "/v1/x y", "status": 200})
    json_logging.end_request(token)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("mlx_flash.worker").exception("failed")
    lines = _lines(log_file)
    assert (
        lines[0].split(" ", 1)[1]
        == 'INFO    worker.uvicorn started request_id=req-2 path="/v1/x y" status=200'
    )
    assert lines[0][:24].endswith("Z") and lines[0][10] == "T"
    assert lines[1].split(" ", 1)[1] == "ERROR   worker.worker failed"
    assert lines[-1] == "ValueError: boom"


def test_components_are_short() -> None:
    assert json_logging.component("mlx_flash.models.scheduler") == "worker.scheduler"
    assert json_logging.component("uvicorn.error") == "worker.uvicorn"
