"""`mlx-flash --workers 2` end to end: the real console script, the Rust sidecar, real workers."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import Sidecar, alive, mlx_flash_command, run_sidecar

# Bans the end-of-turn token, so a random-weight model's stream runs to max_tokens.
NO_EOS = {"2": -100}
CHAT = {"model": "demo", "messages": [{"role": "user", "content": "What is 12+30?"}], "temperature": 0}


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    with run_sidecar(tmp_path_factory.mktemp("e2e") / "sidecar.log", "--model", "demo") as s:
        yield s


def direct(sidecar: Sidecar, worker_id: str) -> httpx.Client:
    """A client talking straight to one worker's Unix socket, bypassing the sidecar."""
    url = next(w["url"] for w in sidecar.workers() if w["id"] == worker_id)
    return httpx.Client(transport=httpx.HTTPTransport(uds=url.removeprefix("unix:")), base_url="http://w")


def normalized(sse: bytes) -> bytes:
    """Per-request values differ between two requests (completion id, timestamp, and the prefix
    cache's share of the prompt, since the second request finds the first one's); nothing else may."""
    sse = re.sub(rb'"id":"chatcmpl-[0-9a-f]+"', b'"id":"X"', sse)
    sse = re.sub(rb'"cached_tokens":\d+', b'"cached_tokens":0', sse)
    return re.sub(rb'"created":\d+', b'"created":0', sse)


def test_stream_bytes_through_the_sidecar_equal_the_workers(sidecar: Sidecar) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "logprobs": True}
    through = httpx.post(f"{sidecar.url}/v1/chat/completions", json=body, timeout=60)
    worker_id = through.headers["x-worker-id"]
    with direct(sidecar, worker_id) as client:
        straight = client.post("/v1/chat/completions", json=body, timeout=60)
    assert through.headers["content-type"] == straight.headers["content-type"]
    assert through.content.endswith(b"data: [DONE]\n\n")
    assert normalized(through.content) == normalized(straight.content)


def test_openai_sdk_streams_through_the_sidecar(sidecar: Sidecar) -> None:
    client = openai.OpenAI(base_url=f"{sidecar.url}/v1", api_key="unused")
    whole = client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    stream = client.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [m.id for m in client.models.list()] == ["demo"]


def test_conversations_without_ids_keep_their_worker(sidecar: Sidecar) -> None:
    client = openai.OpenAI(base_url=f"{sidecar.url}/v1", api_key="unused")
    placements: dict[int, set[str]] = {}
    for chat in range(6):
        messages = [{"role": "user", "content": f"Conversation {chat}: greet me."}]
        for _turn in range(3):
            raw = client.chat.completions.with_raw_response.create(
                model="demo", messages=messages, max_tokens=8
            )
            placements.setdefault(chat, set()).add(raw.headers["x-worker-id"])
            messages += [
                {"role": "assistant", "content": raw.parse().choices[0].message.content or ""},
                {"role": "user", "content": "And again?"},
            ]
    assert all(len(workers) == 1 for workers in placements.values()), placements
    assert len(set().union(*placements.values())) == 2, "conversations should spread over both workers"


def test_metrics_merge_every_worker_and_pass_promtool(sidecar: Sidecar) -> None:
    httpx.post(f"{sidecar.url}/v1/chat/completions", json={**CHAT, "max_tokens": 4}, timeout=60)
    text = httpx.get(f"{sidecar.url}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    workers = {s.labels.get("worker") for s in families["mlx_flash_requests"].samples}
    assert {"worker-0", "worker-1"} <= workers
    assert "mlx_flash_sidecar_routing_decisions" in families
    up = families["mlx_flash_sidecar_worker_up"].samples
    assert {s.labels["worker"] for s in up} == {"worker-0", "worker-1"}
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'); the parser check above passed")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_admin_actions_refuse_other_origins(sidecar: Sidecar) -> None:
    restart = f"{sidecar.url}/admin/api/workers/worker-0/restart"
    evil = httpx.post(restart, headers={"Origin": "http://evil.example"}, timeout=10)
    assert evil.status_code == 403
    assert evil.json()["error"]["code"] == "forbidden"
    rebinding = httpx.get(f"{sidecar.url}/admin/api/workers", headers={"Host": "evil.example"}, timeout=10)
    assert rebinding.status_code == 403
    assert {w["id"] for w in sidecar.workers()} == {"worker-0", "worker-1"}


def test_kill_9_mid_stream_errors_fast_and_the_worker_comes_back(
    tmp_path: Path, model_path: dict[str, Path]
) -> None:
    with run_sidecar(tmp_path / "sidecar.log", "--model", str(model_path["qwen3"])) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        model = s.workers()[0]["models"][0]
        messages = [{"role": "user", "content": "hi"}]
        body = {"model": model, "messages": messages, "max_tokens": 3000, "logit_bias": NO_EOS}
        with client.chat.completions.with_streaming_response.create(**body, stream=True) as response:
            victim = response.headers["x-worker-id"]
            pid = next(w["pid"] for w in s.workers() if w["id"] == victim)
            chunks = response.parse()
            for _ in zip(range(5), chunks, strict=False):
                pass
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(openai.APIError, match="failed mid-response"):
                for _ in chunks:
                    pass
            assert time.monotonic() - killed < 1.0
        # The other worker keeps serving while the victim restarts.
        other = client.chat.completions.with_raw_response.create(**{**body, "max_tokens": 4})
        assert other.headers["x-worker-id"] != victim
        s.wait_ready(2, timeout=60)
        back = next(w for w in s.workers() if w["id"] == victim)
        assert back["pid"] != pid and back["restarts"] == 1 and "exited" in back["last_error"]


def test_serve_stops_and_says_why_when_no_worker_can_start(tmp_path: Path) -> None:
    serve = [*mlx_flash_command(), "serve", "--port", "0"]
    # Refused before anything starts: a worker flag every worker would reject.
    r = subprocess.run([*serve, "--kv-bits", "99"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--kv-bits must be" in r.stderr and "Traceback" not in r.stderr
    # A model directory that is there but does not load: the workers fail, then the server stops.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    r = subprocess.run([*serve, "--model", str(broken)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("mlx-flash: error: no worker could start (worker-0: worker exited"), last
    assert "No safetensors found" in last  # the worker's own words for why
    # Loading it again would fail the same way: given up on at once, not after --max-restarts (5).
    assert "exit status: 3" in last and "worker stopped; restarting" not in r.stderr


def test_requested_restarts_are_not_crashes_and_revive_a_failed_worker(tmp_path: Path) -> None:
    with run_sidecar(tmp_path / "sidecar.log", "--model", "demo", "--max-restarts", "0", workers=1) as s:
        restart = f"{s.url}/admin/api/workers/worker-0/restart"
        for n in (1, 2):  # past --max-restarts 0: asked for, so they never count
            pid = s.workers()[0]["pid"]
            assert httpx.post(restart, timeout=10).status_code == 202
            deadline = time.monotonic() + 60
            while (w := s.workers()[0])["pid"] in (pid, None) or w["state"] != "ready":
                assert w["state"] != "failed", w
                assert time.monotonic() < deadline, "the worker did not come back"
                time.sleep(0.1)
            assert w["restarts"] == n
        os.kill(w["pid"], signal.SIGKILL)  # a crash: over --max-restarts 0, so it is given up on
        deadline = time.monotonic() + 30
        while s.workers()[0]["state"] != "failed":
            assert time.monotonic() < deadline, "the crashed worker was not marked failed"
            time.sleep(0.1)
        ready = httpx.get(f"{s.url}/ready", timeout=10)
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert "worker-0: worker exited" in ready.json()["error"]
        r = httpx.post(f"{s.url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and "Every worker failed" in r.json()["error"]["message"]
        assert httpx.post(restart, timeout=10).status_code == 202  # and a request brings it back
        s.wait_ready(1, timeout=60)
        r = httpx.post(f"{s.url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=30)
        assert r.status_code == 200


def test_a_hung_worker_is_restarted(tmp_path: Path) -> None:
    with run_sidecar(tmp_path / "sidecar.log", "--model", "demo") as s:
        victim = s.workers()[0]
        os.kill(victim["pid"], signal.SIGSTOP)  # alive, but answers nothing
        deadline = time.monotonic() + 45
        while (w := s.workers()[0])["restarts"] == 0:
            assert time.monotonic() < deadline, "a stopped worker was never restarted"
            # Meanwhile the other worker serves everything.
            r = httpx.post(f"{s.url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=30)
            assert r.status_code == 200
            time.sleep(0.5)
        assert "stopped answering" in w["last_error"]
        assert not alive(victim["pid"])
        s.wait_ready(2, timeout=60)


def test_shutdown_drains_and_leaves_no_process_behind(tmp_path: Path, model_path: dict[str, Path]) -> None:
    with run_sidecar(tmp_path / "sidecar.log", "--model", str(model_path["qwen3"])) as s:
        pids = [w["pid"] for w in s.workers()]
        socket_dir = Path(s.workers()[0]["url"].removeprefix("unix:")).parent
        assert socket_dir.stat().st_mode & 0o777 == 0o700  # private, whatever the umask
        # A stream in flight when the signal arrives still completes (drain), then everything stops.
        model = s.workers()[0]["models"][0]
        body = {"model": model, "prompt": "x", "max_tokens": 400, "stream": True, "logit_bias": NO_EOS}
        result: dict[str, bytes] = {}

        def stream() -> None:
            result["body"] = httpx.post(f"{s.url}/v1/completions", json=body, timeout=60).content

        t = threading.Thread(target=stream)
        t.start()
        deadline = time.monotonic() + 10
        while httpx.get(f"{s.url}/admin/api/status", timeout=5).json()["in_flight"] == 0:
            assert time.monotonic() < deadline, "the stream never started"
            time.sleep(0.01)
        s.process.send_signal(signal.SIGINT)
        assert s.process.wait(30) == 0
        t.join(30)
        assert result["body"].endswith(b"data: [DONE]\n\n")
        assert b'"finish_reason":"length"' in result["body"]
        assert not [pid for pid in pids if alive(pid)]
        assert not socket_dir.exists()
        assert '"msg":"stopped"' in s.log()


def test_workers_follow_a_killed_sidecar(tmp_path: Path) -> None:
    with run_sidecar(tmp_path / "sidecar.log", "--model", "demo") as s:
        pids = [w["pid"] for w in s.workers()]
        s.process.kill()
        s.process.wait(10)
        deadline = time.monotonic() + 15
        while [pid for pid in pids if alive(pid)] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in pids if alive(pid)]


def test_api_key_guards_every_route_but_health(tmp_path: Path) -> None:
    with run_sidecar(tmp_path / "sidecar.log", "--model", "demo", "--api-key=sekret", workers=1) as s:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{s.url}/v1", api_key="sekret", max_retries=0)
        assert good.chat.completions.create(**{**CHAT, "max_tokens": 4}).choices  # type: ignore[call-overload]
        assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{s.url}/metrics", timeout=10).status_code == 401
        restart = httpx.post(f"{s.url}/admin/api/workers/worker-0/restart", timeout=10)
        assert restart.status_code == 401
        assert "sekret" not in s.log()


def test_refuses_a_public_address_without_a_key() -> None:
    from helpers import mlx_flash_command

    r = subprocess.run(
        [*mlx_flash_command(), "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert "without an API key" in r.stderr
