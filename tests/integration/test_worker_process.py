"""The worker as a process: safe defaults, auth, readiness, metrics, and real internal failures."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlx.core as mx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import Worker, build_model, run_worker
from mlx_flash import blas
from mlx_flash.demo import DEMO_MODEL_PATH


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mlx_flash", *args], capture_output=True, text=True, timeout=120
    )


def test_refuses_to_listen_off_loopback_without_an_api_key() -> None:
    r = run_cli("worker", "--host", "0.0.0.0", "--port", "0")
    assert r.returncode == 2
    assert "without an API key" in r.stderr


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = run_cli("worker", "--port", str(taken.getsockname()[1]))
    assert r.returncode == 2
    assert "Address already in use" in r.stderr and "Traceback" not in r.stderr


def test_missing_model_directory_exits_with_a_clear_error(tmp_path: Path) -> None:
    r = run_cli("worker", "--model", str(tmp_path / "nope"), "--port", "0")
    assert r.returncode == 1
    assert "model directory not found" in r.stderr


def test_a_missing_shard_is_named(tmp_path: Path) -> None:
    model = shutil.copytree(DEMO_MODEL_PATH, tmp_path / "sharded")
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    r = run_cli("worker", "--model", str(model), "--port", "0")
    assert r.returncode == 3  # it cannot load, ever (and not an abort in teardown: 134)
    assert "lacks weight files its index lists: model-00002-of-00002.safetensors" in r.stderr


@pytest.fixture(scope="module")
def keyed_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    with run_worker("demo", tmp_path_factory.mktemp("logs") / "keyed.log", "--api-key", "s3cret") as w:
        yield w


def test_api_key_is_required_when_set(keyed_worker: Worker) -> None:
    url = keyed_worker.url
    r = httpx.get(f"{url}/v1/models", timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert (
        httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code
        == 401
    )
    assert httpx.get(f"{url}/v1/models", headers={"x-api-key": "s3cret"}, timeout=10).status_code == 200
    # The scheme is case-insensitive, and either header may carry the key.
    for headers in (
        {"Authorization": "bearer s3cret"},
        {"Authorization": "Bearer s3cret", "x-api-key": "old"},
    ):
        assert httpx.get(f"{url}/v1/models", headers=headers, timeout=10).status_code == 200, headers
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # liveness needs no key
    with openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0) as c:
        assert c.models.list().data[0].id == "demo"
    assert "s3cret" not in keyed_worker.log()


def test_health_ready_and_metrics(demo_worker: Worker) -> None:
    url = demo_worker.url
    assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
    assert httpx.get(f"{url}/ready", timeout=10).json() == {"status": "ready", "models": ["demo"]}
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    text = httpx.get(f"{url}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "mlx_flash_time_to_first_token_seconds",
        "mlx_flash_inter_token_latency_seconds",
        "mlx_flash_request_duration_seconds",
        "mlx_flash_queue_time_seconds",
        "mlx_flash_prefill_seconds",
        "mlx_flash_decode_seconds",
    ):
        assert families[name].type == "histogram"
    assert families["mlx_flash_memory_available_bytes"].samples[0].value > 0
    requests = families["mlx_flash_requests"].samples
    assert {(s.labels["api"], s.labels["route"]) for s in requests} >= {("openai", "/chat/completions")}
    assert not any("demo" in s.labels["route"] for s in requests)
    assert demo_worker.metric("mlx_flash_generation_tokens_total", model="demo") > 0
    assert demo_worker.metric("mlx_flash_prefill_seconds_count", model="demo") >= 1
    assert demo_worker.metric("mlx_flash_errors_total", reason="model_not_found") >= 1
    assert demo_worker.metric("mlx_flash_requests_running", model="demo") == 0
    assert demo_worker.metric("mlx_flash_requests_waiting", model="demo") == 0
    assert demo_worker.metric("mlx_flash_models_loaded") == 1
    assert demo_worker.metric("mlx_flash_mlx_active_bytes") > 0
    build = families["mlx_flash_build_info"].samples[0]
    assert build.labels["version"] and build.labels["mlx"] and build.value == 1


@pytest.fixture(scope="module")
def broken_worker(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """bf16 MoE: loads, but MLX's CPU gather_mm supports only float32, so generation really fails."""
    path = build_model("qwen3_moe", models_dir / "moe-bf16", dtype=mx.bfloat16)
    with run_worker(str(path), tmp_path_factory.mktemp("logs") / "bf16.log") as worker:
        yield worker


def errors(worker: Worker) -> dict[str, float]:
    """mlx_flash_errors_total by reason."""
    text = httpx.get(f"{worker.url}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = families["mlx_flash_errors"].samples if "mlx_flash_errors" in families else []
    return {s.labels["reason"]: s.value for s in samples if s.name.endswith("_total")}


def test_internal_failure_is_500_without_retry_or_traceback(broken_worker: Worker) -> None:
    body = {"model": "moe-bf16", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    before = errors(broken_worker)
    r = httpx.post(f"{broken_worker.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 500
    # One failure, counted once (where the client is sent it), whatever failed underneath.
    assert errors(broken_worker) == {**before, "server_error": before.get("server_error", 0) + 1}
    assert r.headers["x-should-retry"] == "false"
    assert r.json()["error"]["type"] == "server_error"
    assert "Traceback" not in r.text and "gather" not in r.text.lower()
    assert "GatherMM" in broken_worker.log()  # the detail is logged for the operator


def test_failure_after_200_ends_the_stream_with_an_error_event(broken_worker: Worker) -> None:
    c = openai.OpenAI(base_url=f"{broken_worker.url}/v1", api_key="x", max_retries=0)
    stream = c.chat.completions.create(
        model="moe-bf16", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    with pytest.raises(openai.APIError):
        list(stream)
    assert httpx.get(f"{broken_worker.url}/health", timeout=10).status_code == 200


def blas_line(log: str) -> dict[str, Any]:
    entries = (json.loads(x) for x in log.splitlines() if x.startswith("{"))
    return next(e for e in entries if e.get("msg") == "blas")


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or mx.default_device() != mx.cpu,
    reason="MLX's Linux CPU wheel bundles its BLAS",
)
def test_worker_says_which_blas_it_runs_on(demo_worker: Worker) -> None:
    line = blas_line(demo_worker.log())
    if "openblas" in os.environ.get("LD_PRELOAD", ""):
        assert any("openblas" in n for n in line["libraries"]) and "hint" not in line
    else:
        assert any(n.startswith("libblas") for n in line["libraries"])
        assert "LD_PRELOAD=" in line["hint"]


@pytest.mark.skipif(blas.installed_openblas() is None, reason="OpenBLAS not installed (libopenblas0-pthread)")
def test_a_worker_started_with_openblas_preloaded_runs_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LD_PRELOAD", str(blas.installed_openblas()))
    with run_worker("demo", tmp_path / "openblas.log") as w:
        line = blas_line(w.log())
        assert any("openblas" in n for n in line["libraries"]) and "hint" not in line
        c = openai.OpenAI(base_url=f"{w.url}/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "echo: hi"}], max_tokens=8, temperature=0
        )
        assert r.choices[0].message.content
