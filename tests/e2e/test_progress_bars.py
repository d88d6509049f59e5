"""On a terminal `mlx-flash serve` draws a model's load as a progress bar instead of progress lines;
the lines stay in the log ring (and are what a non-terminal gets: tests/e2e/test_logs.py)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import time

import httpx
import pytest

from helpers import mlx_flash_command

pytestmark = pytest.mark.timeout(180)


def test_a_terminal_gets_a_bar_and_the_ring_keeps_the_lines() -> None:
    master, slave = pty.openpty()
    cmd = [*mlx_flash_command(), "serve", "--port", "0", "--workers", "1"]
    env = {**os.environ, "COLUMNS": "160"}
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True, env=env)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 120
        while b"model loaded" not in out and time.monotonic() < deadline and proc.poll() is None:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    out += os.read(master, 65536)
                except OSError:
                    break
        text = out.decode(errors="replace")
        assert "model loaded" in text, text
        # The bar: our template's message and frame, drawn on the terminal.
        assert re.search(r"loading model demo \(worker-0\) \[[=> ]{30}\]", text), text
        lines = [json.loads(line) for line in re.findall(r"^\{.*\}\r?$", text, re.M)]
        assert not [line for line in lines if line["msg"] == "loading model" and "percent" in line], lines
        listening = next(
            line for line in lines if line["msg"] == "listening" and line["component"] == "sidecar"
        )
        ring = httpx.get(f"{listening['url']}/admin/api/logs", params={"limit": 1000}, timeout=10).json()
        progress = [line for line in ring["lines"] if line["msg"] == "loading model" and "percent" in line]
        assert progress and all(line["worker"] == "worker-0" for line in progress), ring
        assert [line["percent"] for line in progress] == sorted(line["percent"] for line in progress)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        os.close(master)
