"""The Starlette app before any model is loaded: alive, not ready, and honest about it."""

from starlette.testclient import TestClient

from mlx_flash.config import WorkerConfig
from mlx_flash.worker import create_app
from mlx_flash.worker_state import WorkerState


def test_ready_is_503_until_the_model_is_loaded() -> None:
    with TestClient(create_app(WorkerState(WorkerConfig(model="demo")))) as client:
        assert client.get("/health").status_code == 200
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading"


def test_requests_for_the_loading_model_get_503_with_retry_after() -> None:
    with TestClient(create_app(WorkerState(WorkerConfig(model="demo")))) as client:
        r = client.post("/v1/chat/completions", json={"model": "demo", "messages": []})
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "model_loading"
        r = client.post("/v1/chat/completions", json={"model": "other", "messages": []})
        assert r.status_code == 404


def test_failed_load_is_reported_by_ready() -> None:
    state = WorkerState(WorkerConfig(model="demo"))
    state.load_error = "FileNotFoundError: model directory not found: x"
    with TestClient(create_app(state)) as client:
        assert client.get("/ready").json() == {"status": "failed", "error": state.load_error}
