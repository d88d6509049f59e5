"""One log for the sidecar and its workers: a request id followed through both, the ring behind
`GET /admin/api/logs`, and the text format written to `--log-file`."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from helpers import Sidecar, run_sidecar

pytestmark = pytest.mark.timeout(300)

HEAD = ("ts", "level", "component", "msg")


def _lines_about(sidecar: Sidecar, request_id: str, want: set[str]) -> list[dict[str, Any]]:
    """The ring's lines about `request_id`, once the components in `want` have all logged."""
    deadline = time.monotonic() + 20
    while True:
        r = httpx.get(
            f"{sidecar.url}/admin/api/logs", params={"request_id": request_id, "limit": 100}, timeout=10
        )
        r.raise_for_status()
        lines: list[dict[str, Any]] = r.json()["lines"]
        if want <= {f"{line['component']} {line['msg']}" for line in lines} or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with run_sidecar(tmp_path_factory.mktemp("logs") / "sidecar.log", workers=1) as s:
        yield s


def test_a_request_id_follows_the_request_through_both_logs(sidecar: Sidecar) -> None:
    client = openai.OpenAI(base_url=f"{sidecar.url}/v1", api_key="unused", max_retries=0)
    rid = "trace-7f3a.client:42"
    with client.chat.completions.with_streaming_response.create(
        model="demo",
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=8,
        stream=True,
        extra_headers={"X-Request-Id": rid},
    ) as response:
        assert response.headers["x-request-id"] == rid
        assert b"[DONE]" in response.read()
    want = {"sidecar.proxy request", "worker.worker request", "worker.engine generation"}
    lines = _lines_about(sidecar, rid, want)
    assert want <= {f"{line['component']} {line['msg']}" for line in lines}, lines
    for line in lines:
        assert all(isinstance(line[k], str) for k in HEAD), line
        assert line["request_id"] == rid and line["worker"] == "worker-0" and line["model"] == "demo", line
    by = {f"{line['component']} {line['msg']}": line for line in lines}
    assert by["sidecar.proxy request"]["status"] == 200
    assert by["sidecar.proxy request"]["path"] == "/v1/chat/completions"
    generation = by["worker.engine generation"]
    assert generation["finish"] in ("stop", "length") and 1 <= generation["completion_tokens"] <= 8

    # The same lines reached stderr, where every line is one JSON object in the same schema.
    deadline = time.monotonic() + 10
    while rid not in sidecar.log().split('"msg":"generation"', 1)[-1] and time.monotonic() < deadline:
        time.sleep(0.1)
    written = [json.loads(line) for line in sidecar.log().splitlines() if line.startswith("{")]
    assert all(all(k in line for k in HEAD) for line in written)
    mentioning = [line for line in written if rid in json.dumps(line)]
    assert {f"{line['component']} {line['msg']}" for line in mentioning} >= want
    assert all(line["request_id"] == rid for line in mentioning)


def test_ids_are_generated_and_forged_ones_replaced(sidecar: Sidecar) -> None:
    for sent in (None, "two words", "x" * 200):
        headers = {"X-Request-Id": sent} if sent else {}
        body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = httpx.post(f"{sidecar.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", rid), rid
        lines = _lines_about(sidecar, rid, {"sidecar.proxy request", "worker.worker request"})
        assert {line["component"] for line in lines} >= {"sidecar.proxy", "worker.worker", "worker.engine"}


def test_failed_requests_are_logged_with_their_status(sidecar: Sidecar) -> None:
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(f"{sidecar.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 404
    lines = _lines_about(
        sidecar, r.headers["x-request-id"], {"sidecar.proxy request", "worker.worker request"}
    )
    assert sorted(line["status"] for line in lines if line["msg"] == "request") == [404, 404], lines


def test_the_ring_pages_and_filters(sidecar: Sidecar) -> None:
    url = f"{sidecar.url}/admin/api/logs"
    first = httpx.get(url, params={"since": 0, "limit": 3}, timeout=10).json()
    assert len(first["lines"]) == 3
    assert [line["seq"] for line in first["lines"]] == [0, 1, 2] and first["next"] == 3
    # The worker's own start-up lines are there, tagged with its id.
    everything = httpx.get(url, params={"limit": 1000}, timeout=10).json()["lines"]
    assert any(line["component"] == "worker.worker" and line["msg"] == "ready" for line in everything)
    assert all(line["worker"] == "worker-0" for line in everything if line["component"].startswith("worker."))
    # Not a terminal: the model's load progress is written as lines (a terminal gets a bar instead).
    written = [json.loads(line) for line in sidecar.log().splitlines() if line.startswith("{")]
    loading = [line["percent"] for line in written if line["msg"] == "loading model" and "percent" in line]
    assert loading and loading == sorted(loading) and max(loading) < 100, loading
    warnings = httpx.get(url, params={"level": "warning", "limit": 1000}, timeout=10).json()["lines"]
    assert all(line["level"] in ("warning", "error") for line in warnings)
    tail = httpx.get(url, params={"since": everything[-1]["seq"] + 1}, timeout=10).json()
    assert all(line["seq"] > everything[-1]["seq"] for line in tail["lines"])
    bad = httpx.get(url, params={"level": "loud"}, timeout=10)
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] is None and "level" in bad.json()["error"]["message"]
    assert httpx.get(url, params={"since": -1}, timeout=10).status_code == 400


def test_text_format_to_a_file(tmp_path: Path) -> None:
    log_file = tmp_path / "mlx-flash.log"
    with run_sidecar(
        tmp_path / "stderr.log", "--log-format", "text", f"--log-file={log_file}", workers=1
    ) as s:
        r = httpx.post(
            f"{s.url}/v1/chat/completions",
            json={"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            headers={"X-Request-Id": "text-format-1"},
            timeout=60,
        )
        assert r.status_code == 200
        _lines_about(s, "text-format-1", {"sidecar.proxy request", "worker.engine generation"})
        text = log_file.read_text()
        assert s.log().strip() == ""  # nothing on stderr: it all went to the file
    line = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR) +\S+ .*"
    assert all(re.match(line, entry) for entry in text.splitlines() if entry), text
    about = [entry for entry in text.splitlines() if "request_id=text-format-1" in entry]
    assert any(" sidecar.proxy request " in entry and "status=200" in entry for entry in about), about
    assert any(" worker.engine generation " in entry and "worker=worker-0" in entry for entry in about), about
