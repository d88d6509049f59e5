"""The Starlette app before its model is loaded: alive, not ready, and honest about it."""

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.testclient import TestClient

from mlx_flash import worker
from mlx_flash.config import WorkerConfig
from mlx_flash.models import scheduler
from mlx_flash.worker import create_app
from mlx_flash.worker_state import WorkerState


def test_ready_is_503_until_the_model_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    release, real_load = threading.Event(), scheduler.load_model

    def held_load(*args: Any, **kwargs: Any) -> Any:  # the real load, once the test has looked
        release.wait(30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(scheduler, "load_model", held_load)
    with TestClient(create_app(WorkerState(WorkerConfig(models=("demo",))))) as client:
        assert client.get("/health").status_code == 200
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        release.set()


def test_a_request_waits_for_its_model_to_load_and_unknown_models_are_404() -> None:
    with TestClient(create_app(WorkerState(WorkerConfig(models=("demo",))))) as client:
        r = client.post("/v1/chat/completions", json={"model": "other", "messages": []})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = client.post("/v1/chat/completions", json={"model": "demo", "messages": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert client.get("/ready").json() == {"status": "ready", "models": ["demo"]}


def test_failed_load_is_reported_by_ready(tmp_path: Path) -> None:
    state = WorkerState(WorkerConfig(models=(str(tmp_path / "missing"),)))
    with TestClient(create_app(state)) as client:
        for _ in range(100):
            body = client.get("/ready").json()
            if body["status"] != "loading":
                break
            time.sleep(0.05)
        assert body["status"] == "failed" and "model directory not found" in body["error"]


def test_an_unhandled_error_is_a_500_and_the_connection_keeps_serving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # uvicorn closes a connection whose app raised; the sidecar's next request on that pooled connection
    # would then fail. The worker answers the 500 itself and keeps the connection open.
    async def broken(request: Any) -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(worker, "health", broken)  # before create_app, which routes /health to it
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(WorkerState(WorkerConfig())), log_config=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        with socket.create_connection(sock.getsockname()[:2], timeout=10) as conn:
            replies = []
            for path in ("/health", "/ready"):
                conn.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
                replies.append(_read_response(conn))
        (status, body), (again, _) = replies
        assert status == 500 and json.loads(body)["error"]["type"] == "server_error"
        assert b"secret" not in body and b"Traceback" not in body
        assert again in (200, 503)  # answered on the same connection
    finally:
        server.should_exit = True
        thread.join(15)


def _read_response(conn: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, "the worker closed the connection"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            v
            for k, _, v in (h.partition(b":") for h in head.split(b"\r\n"))
            if k.lower() == b"content-length"
        )
    )
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, "the worker closed the connection"
        body += chunk
    return int(head.split()[1]), body
