"""Admission control: a request reserves the KV cache it can grow to before its response starts;
what does not fit waits in a bounded queue and then gets 503 with Retry-After, never a cut-off 200."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlx.core as mx
import pytest

from helpers import Worker, holding, memory_cgroup, run_worker
from mlx_flash.models.loader import kv_bytes_per_token, weight_file_bytes

CEILING_TOKENS = 3100  # KV the memory limit leaves beside the model's weights
LONG = 3000


def no_eos(path: Path) -> dict[str, int]:
    eos = json.loads((path / "config.json").read_text())["eos_token_id"]
    return {str(t): -100 for t in (eos if isinstance(eos, list) else [eos])}


@pytest.fixture(scope="module")
def tight(model_path: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    path = model_path["qwen3"]
    per_token = kv_bytes_per_token(json.loads((path / "config.json").read_text()), mx.float32)
    limit = weight_file_bytes(path) + CEILING_TOKENS * per_token
    args = ["--memory-limit", str(limit), "--prefix-cache-bytes", "0", "--max-queue", "1"]
    log = tmp_path_factory.mktemp("logs") / "tight.log"
    with run_worker(str(path), log, *args, "--queue-timeout", "1") as w:
        yield w


def body(path: Path, **fields: object) -> dict[str, object]:
    return {"model": str(path), "prompt": "Once upon a time", "temperature": 0, **fields}


def test_what_does_not_fit_waits_then_gets_503_and_the_running_request_completes(
    tight: Worker, model_path: dict[str, Path]
) -> None:
    path = model_path["qwen3"]
    long = body(path, max_tokens=LONG, logit_bias=no_eos(path), stream=True)
    with (
        httpx.Client(timeout=120) as client,
        client.stream("POST", f"{tight.url}/v1/completions", json=long) as r1,
    ):
        assert r1.status_code == 200
        chunks = r1.iter_lines()
        next(chunks)  # it is generating, holding KV for 3000+ tokens
        waited: list[httpx.Response] = []
        second = threading.Thread(
            target=lambda: waited.append(
                client.post(f"{tight.url}/v1/completions", json=body(path, max_tokens=LONG))
            )
        )
        started = time.monotonic()
        second.start()
        time.sleep(0.3)  # the second waits in the queue (--max-queue 1) ...
        full = client.post(f"{tight.url}/v1/completions", json=body(path, max_tokens=LONG))
        assert full.status_code == 503 and full.headers["retry-after"]  # ... so a third finds it full
        assert full.json()["error"]["code"] == "overloaded" and "capacity" in full.json()["error"]["message"]
        second.join()
        assert time.monotonic() - started >= 1.0  # --queue-timeout
        assert waited[0].status_code == 503 and waited[0].headers["retry-after"]
        assert "Not enough memory" in waited[0].json()["error"]["message"]
        text = [json.loads(line[6:]) for line in chunks if line.startswith("data: {")]
        assert text[-1]["choices"][0]["finish_reason"] == "length"  # the admitted one was not cut off
    assert tight.metric("mlx_flash_admission_rejected_total", reason="queue_full") == 1
    assert tight.metric("mlx_flash_admission_rejected_total", reason="timeout") == 1
    assert tight.metric("mlx_flash_admission_queue_depth") == 0
    # Memory is released when a request ends: the same request is admitted now.
    r = httpx.post(f"{tight.url}/v1/completions", json=body(path, max_tokens=LONG // 10), timeout=120)
    assert r.status_code == 200


def test_a_request_that_could_never_fit_is_400_and_default_max_tokens_is_capped(
    tight: Worker, model_path: dict[str, Path]
) -> None:
    path = model_path["qwen3"]
    r = httpx.post(f"{tight.url}/v1/completions", json=body(path, max_tokens=4000), timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "insufficient_memory" and err["param"] == "max_tokens"
    # Chat without max_tokens may use the rest of the context (4096), but only what memory holds.
    chat = {
        "model": str(path),
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "temperature": 0,
        "logit_bias": no_eos(path),
    }
    r = httpx.post(f"{tight.url}/v1/chat/completions", json=chat, timeout=300)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    total = r.json()["usage"]["total_tokens"]
    assert CEILING_TOKENS - 20 <= total <= CEILING_TOKENS + 20


def test_a_prompt_that_could_never_fit_is_400_naming_what_to_change(
    tight: Worker, model_path: dict[str, Path]
) -> None:
    path = model_path["qwen3"]
    words = " ".join(["a"] * 3300)  # 3300 tokens: over the ceiling, within the context
    chat = {"model": str(path), "messages": [{"role": "user", "content": words}]}
    r = httpx.post(f"{tight.url}/v1/chat/completions", json=chat, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "insufficient_memory" and err["param"] == "messages"
    # The prompt and the one token every completion needs, not the prompt plus the whole context.
    need = int(err["message"].split("needs a KV cache of ")[1].split(" ")[0])
    assert CEILING_TOKENS < need < 4096 and "Reduce the prompt." in err["message"]
    r = httpx.post(
        f"{tight.url}/v1/responses",
        json={"model": str(path), "input": "Hi", "max_output_tokens": 4000},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_output_tokens"
    assert "Reduce max_output_tokens or the prompt." in r.json()["error"]["message"]


def test_503_under_a_memory_limited_cgroup_until_memory_is_free(
    model_path: dict[str, Path], tmp_path: Path
) -> None:
    """A smaller machine: a worker and another process share a 1.5 GiB cgroup; while the other holds
    most of it, requests are refused before they start; once it is gone they are served."""
    with memory_cgroup("mlxf-admission", 3 << 29) as (group, join):
        path = str(model_path["qwen3"])
        with run_worker(path, tmp_path / "w.log", "--queue-timeout", "1", prefix=join) as w:
            ok = httpx.post(f"{w.url}/v1/completions", json=body(Path(path), max_tokens=4), timeout=30)
            assert ok.status_code == 200
            usage = int((group / "memory.usage_in_bytes").read_text())
            with holding(join, (3 << 29) - usage - (150 << 20)):
                r = httpx.post(f"{w.url}/v1/completions", json=body(Path(path), max_tokens=4), timeout=30)
                assert r.status_code == 503 and r.headers["retry-after"]
                assert r.json()["error"]["code"] == "overloaded"
                health = httpx.get(f"{w.url}/health", timeout=10).json()["memory"]
                assert health["cgroup_limit_bytes"] == 3 << 29
                assert health["effective_available_bytes"] < 256 << 20
            r = httpx.post(f"{w.url}/v1/completions", json=body(Path(path), max_tokens=4), timeout=30)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == ok.json()["choices"][0]["text"]


def test_a_small_cgroup_serves_a_model_that_fits_with_the_defaults(
    model_path: dict[str, Path], tmp_path: Path
) -> None:
    """A machine (or container) of 320 MiB: the prefix cache budget and the headroom admission keeps
    scale down with it, so a small model loads and answers."""
    with memory_cgroup("mlxf-small", 320 << 20) as (_, join):
        path = model_path["qwen3"]
        with run_worker(str(path), tmp_path / "w.log", prefix=join) as w:
            r = httpx.post(f"{w.url}/v1/completions", json=body(path, max_tokens=4), timeout=30)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            status = httpx.get(f"{w.url}/admin/api/models", timeout=10).json()
            assert status["memory_limit"] == int(0.75 * (320 << 20))
            model = status["models"][0]
            assert model["reserved_bytes"] == model["weight_bytes"] + (30 << 20)  # an eighth of the limit
