"""The Starlette app before its model is loaded: alive, not ready, and honest about it."""

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

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
