"""Several models in one worker under a small --memory-limit: load on demand, LRU eviction, pins,
idle TTL, aliases, and the admin API; outputs stay equal to mlx_lm.generate across reloads."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from mlx_lm import load

from helpers import Worker, continuation, run_worker
from mlx_flash.models.loader import weight_file_bytes

PROMPT = "The quick brown fox"


def complete(worker: Worker, model: str) -> str:
    c = openai.OpenAI(base_url=f"{worker.url}/v1", api_key="x", max_retries=0)
    r = c.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    return r.choices[0].text


def statuses(worker: Worker) -> dict[str, str]:
    body = httpx.get(f"{worker.url}/admin/api/models", timeout=10).json()
    return {m["id"]: m["status"] for m in body["models"]}


def reference(path: Path) -> str:
    model, tokenizer = load(str(path))[:2]
    return continuation(model, tokenizer, PROMPT, max_tokens=12)


@pytest.fixture(scope="module")
def two_models(model_path: dict[str, Path]) -> tuple[str, str, int]:
    """Two models and a memory limit that holds either one but not both."""
    a, b = str(model_path["qwen3"]), str(model_path["llama"])
    sizes = sorted([weight_file_bytes(Path(a)), weight_file_bytes(Path(b))])
    return a, b, sizes[1] + sizes[0] // 2


def test_models_swap_under_a_memory_limit_and_outputs_match_mlx_lm(
    two_models: tuple[str, str, int], tmp_path: Path
) -> None:
    a, b, limit = two_models
    args = ["--model", b, "--memory-limit", str(limit), "--prefix-cache-bytes", "0"]
    with run_worker(a, tmp_path / "w.log", *args) as w:
        # Both start-up models cannot fit: the first was evicted to load the second.
        assert statuses(w) == {a: "available", b: "loaded"}
        first_a = complete(w, a)  # loads a, evicting b
        assert statuses(w) == {a: "loaded", b: "available"}
        assert complete(w, b) == reference(Path(b))
        assert complete(w, a) == first_a == reference(Path(a))
        assert w.metric("mlx_flash_model_unloads_total", model=a, reason="lru") >= 1
        assert w.metric("mlx_flash_model_loads_total", model=a) == 3  # start, then twice on demand
        listed = httpx.get(f"{w.url}/v1/models", timeout=10).json()["data"]
        assert {m["id"]: m["status"] for m in listed} == {a: "loaded", b: "available"}
        assert '"msg":"unloading model"' in w.log() and '"reason":"lru"' in w.log()


def test_requests_queued_for_a_loaded_model_do_not_wait_behind_a_load_that_needs_it_gone(
    two_models: tuple[str, str, int], tmp_path: Path
) -> None:
    a, b, limit = two_models
    args = ["--model", b, "--memory-limit", str(limit), "--prefix-cache-bytes", "0", "--queue-timeout", "20"]
    eos = json.loads((Path(a) / "config.json").read_text())["eos_token_id"]
    no_eos = {str(t): -100 for t in (eos if isinstance(eos, list) else [eos])}
    with run_worker(a, tmp_path / "w.log", *args) as w, httpx.Client(base_url=w.url, timeout=60) as http:
        results: dict[str, tuple[int, float]] = {}

        def send(tag: str, model: str, max_tokens: int) -> None:
            body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}
            start = time.monotonic()
            r = http.post("/v1/completions", json={**body, "logit_bias": no_eos})
            results[tag] = (r.status_code, time.monotonic() - start)

        def queued() -> int:
            return int(http.get("/admin/api/models").json()["queue_depth"])

        long = threading.Thread(target=send, args=("long", a, 600))
        long.start()
        while not any(m["active_requests"] for m in http.get("/admin/api/models").json()["models"]):
            time.sleep(0.01)
        load = threading.Thread(target=send, args=("load", b, 4))  # must wait until `a` is idle
        load.start()
        deadline = time.monotonic() + 30
        while queued() < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        short = threading.Thread(target=send, args=("short", a, 4))  # holds `a` while it waits
        short.start()
        for t in (long, load, short):
            t.join(60)
    assert {tag: status for tag, (status, _) in results.items()} == {"long": 200, "load": 200, "short": 200}
    assert results["short"][1] < results["long"][1]  # it ran beside the long one, not after the load
    assert results["load"][1] < 20


def test_a_pinned_model_stays_and_a_model_that_cannot_fit_beside_it_is_refused(
    two_models: tuple[str, str, int], tmp_path: Path
) -> None:
    a, b, limit = two_models
    aliases = tmp_path / "aliases.toml"
    aliases.write_text(f'[aliases]\nother = "{b}"\n')
    args = ["--pin", a, "--aliases", str(aliases), "--memory-limit", str(limit), "--prefix-cache-bytes", "0"]
    with run_worker(a, tmp_path / "w.log", *args) as w:
        r = httpx.post(
            f"{w.url}/v1/completions", json={"model": "other", "prompt": PROMPT, "max_tokens": 2}, timeout=30
        )
        assert r.status_code == 503 and r.headers["x-should-retry"] == "false"
        assert r.json()["error"]["code"] == "model_too_large" and "pinned" in r.json()["error"]["message"]
        r = httpx.post(f"{w.url}/admin/api/models/{a}/unload", timeout=10)
        assert r.status_code == 409 and "pinned" in r.json()["error"]["message"]
        assert statuses(w)[a] == "loaded"


def test_idle_models_expire_and_come_back_on_demand(model_path: dict[str, Path], tmp_path: Path) -> None:
    a = str(model_path["qwen3"])
    with run_worker(a, tmp_path / "w.log", "--idle-ttl", "1") as w:
        before = complete(w, a)
        for _ in range(100):
            if statuses(w)[a] == "available":
                break
            time.sleep(0.1)
        assert statuses(w)[a] == "available"
        assert w.metric("mlx_flash_model_unloads_total", model=a, reason="idle") == 1
        assert complete(w, a) == before


def test_aliases_and_the_admin_api(model_path: dict[str, Path], tmp_path: Path) -> None:
    a, b = str(model_path["qwen3"]), str(model_path["llama"])
    aliases = tmp_path / "aliases.toml"
    aliases.write_text(f'[aliases]\nsmall = "{b}"\n')
    with run_worker(a, tmp_path / "w.log", "--aliases", str(aliases)) as w:
        assert statuses(w) == {a: "loaded", "small": "available"}
        assert complete(w, "small") == reference(Path(b))
        r = httpx.post(f"{w.url}/admin/api/models/small/unload", timeout=10)
        assert r.status_code == 200 and r.json()["model"]["status"] == "available"
        r = httpx.post(f"{w.url}/admin/api/models/small/load", timeout=60)
        assert r.status_code == 200 and r.json()["model"]["status"] == "loaded"
        assert r.json()["model"]["weight_bytes"] > 0 and r.json()["model"]["kv_bytes_per_token"] > 0
        # The admin API refuses a web page on another origin, and names it does not know.
        r = httpx.post(
            f"{w.url}/admin/api/models/small/unload", headers={"Origin": "http://evil.example"}, timeout=10
        )
        assert r.status_code == 403
        r = httpx.post(f"{w.url}/admin/api/models/nope/load", timeout=10)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        # Local paths a client invents are not loaded; only the operator's models are.
        r = httpx.post(
            f"{w.url}/v1/completions", json={"model": "/etc", "prompt": "x", "max_tokens": 1}, timeout=10
        )
        assert r.status_code == 404
        # A hub id that is not downloaded is not fetched by a request; the message says how.
        r = httpx.post(f"{w.url}/v1/completions", json={"model": "nobody/nothing", "prompt": "x"}, timeout=30)
        assert r.status_code == 404 and "/admin/api/models/nobody/nothing/load" in r.text


def test_bad_flags_are_clear_errors(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "mlx_flash.worker", "--port", "0", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    r = run("--memory-limit", "lots")
    assert r.returncode == 2 and "bad size 'lots'" in r.stderr
    bad = tmp_path / "aliases.toml"
    bad.write_text("[aliases]\nx = 3\n")
    r = run("--aliases", str(bad))
    assert r.returncode == 2 and "[aliases] must map names to strings" in r.stderr
    r = run("--memory-limit", "1M")
    # Status 3: a restart would not help, so a supervisor does not retry it.
    assert r.returncode == 3 and "model_too_large" not in r.stderr and "needs about" in r.stderr
