"""`mlx-flash chat` driven through a pseudo-terminal against a real `mlx-flash serve --model demo`."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import Sidecar, mlx_flash_command, run_sidecar


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    log = tmp_path_factory.mktemp("chat") / "sidecar.log"
    with run_sidecar(log, "--model", "demo", workers=1) as s:
        yield s


class Terminal:
    def __init__(self, fd: int) -> None:
        self.fd, self.seen = fd, ""

    def expect(self, text: str, timeout: float = 60) -> str:
        """Everything read up to and including `text`; fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            assert time.monotonic() < deadline, f"no {text!r} in {self.seen!r}"
            if select.select([self.fd], [], [], 0.2)[0]:
                self.seen += os.read(self.fd, 4096).decode(errors="replace")
        head, _, self.seen = self.seen.partition(text)
        return head + text

    def send(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())


def test_chat_streams_lists_clears_and_exits(server: Sidecar, tmp_path: Path) -> None:
    main, child = pty.openpty()
    env = {**os.environ, "HOME": str(tmp_path), "TERM": "dumb"}
    cmd = [*mlx_flash_command(), "chat", "--url", server.url, "--temperature", "0"]
    with subprocess.Popen(cmd, stdin=child, stdout=child, stderr=child, env=env) as proc:
        os.close(child)
        term = Terminal(main)
        try:
            term.expect("mlx-flash chat with demo")
            term.expect(">>> ")
            term.send("/models")
            assert "demo" in term.expect(">>> ")
            # Multi-line: a trailing backslash continues the message.
            term.send("Hello\\")
            term.expect("... ")
            term.send("there")
            reply = term.expect(">>> ").replace("\r", "")
            body = {
                "model": "demo",
                "messages": [{"role": "user", "content": "Hello\nthere"}],
                "temperature": 0,
            }
            direct = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60).json()
            assert direct["choices"][0]["message"]["content"].strip() in reply
            term.send("/clear")
            assert "history cleared" in term.expect(">>> ")
            term.send("/exit")
            assert proc.wait(10) == 0
            assert (tmp_path / ".mlx_flash_history").exists()
        finally:
            os.close(main)
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
