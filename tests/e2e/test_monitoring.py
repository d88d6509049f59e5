"""The Grafana dashboard against a real Prometheus scraping a real `mlx-flash serve --workers 2`: every
PromQL expression of every panel, and the model variable's query, return data through Prometheus'
HTTP API. The server streams the demo model's experts, so the expert panels have data too."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from helpers import run_sidecar
from mlx_flash.demo import DEMO_MODEL_PATH
from mlx_flash.experts.store import expert_file_bytes

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "grafana" / "mlx-flash.json"
PROMETHEUS = shutil.which("prometheus")
# Two of the demo model's 8 experts per layer: its experts stream from disk.
EXPERT_MEMORY = 2 * expert_file_bytes(DEMO_MODEL_PATH, 8) // 8
# Grafana's variables, as the dashboard is opened: every model, a rate window of several scrapes.
VARIABLES = {"$model": ".*", "$__rate_interval": "30s"}


def panel_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", []) if t.get("expr")
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def prometheus(target: str, tmp: Path) -> Iterator[str]:
    """A Prometheus server scraping `target` (host:port) every 0.5 s."""
    assert PROMETHEUS is not None
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 500ms\n"
        f"scrape_configs:\n  - job_name: mlx-flash\n    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    cmd = [
        PROMETHEUS,
        f"--config.file={config}",
        f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with (tmp / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not _ready(url):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp / "prometheus.log").read_text()
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(20)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def query(url: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, f"{expr}: {r.text}"
    return list(r.json()["data"]["result"])


def traffic(url: str) -> None:
    """Chats streamed and not, a second turn (a prefix-cache hit), two at once, an unknown model."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What can you do?"}]
    first = client.chat.completions.create(model="demo", messages=messages, max_tokens=12)  # type: ignore[arg-type]
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": "Tell me more."},
    ]
    stream = client.chat.completions.create(model="demo", messages=messages, max_tokens=12, stream=True)  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=messages)  # type: ignore[arg-type]


@pytest.mark.skipif(PROMETHEUS is None, reason="needs prometheus (Debian package `prometheus`)")
def test_every_dashboard_query_returns_data_from_a_real_prometheus(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = panel_queries(dashboard)
    assert len(queries) >= 30
    args = ["--model", "demo", "--expert-memory", str(EXPERT_MEMORY)]
    with run_sidecar(tmp_path / "sidecar.log", *args) as sidecar:
        target = sidecar.url.removeprefix("http://")
        with prometheus(target, tmp_path) as prom:
            deadline = time.monotonic() + 60
            while not query(prom, 'up{job="mlx-flash"} == 1'):
                assert time.monotonic() < deadline, "Prometheus never scraped the sidecar"
                time.sleep(0.5)
            # Traffic over several scrapes, so every rate has samples that moved within its window.
            for _ in range(4):
                traffic(sidecar.url)
                time.sleep(1)
            empty = []
            for title, expr in queries:
                for var, value in VARIABLES.items():
                    expr = expr.replace(var, value)
                if not query(prom, expr):
                    empty.append(f"{title}: {expr}")
            assert not empty, "queries without data:\n" + "\n".join(empty)
            variable = dashboard["templating"]["list"][1]["definition"]
            metric = variable.removeprefix("label_values(").split(",")[0]
            models = {s["metric"]["model"] for s in query(prom, metric)}
            assert models == {"demo"}
