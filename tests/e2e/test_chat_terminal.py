"""`mlx-flash chat` driven through a pseudo-terminal against a real `mlx-flash serve --model demo`."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import socket
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_chat_starts_a_server_when_none_runs_and_stops_it(tmp_path: Path) -> None:
    port = _free_port()
    main, child = pty.openpty()
    env = {**os.environ, "HOME": str(tmp_path), "TERM": "dumb"}
    cmd = [*mlx_flash_command(), "chat", "--url", f"http://127.0.0.1:{port}", "--temperature", "0"]
    with subprocess.Popen(cmd, stdin=child, stdout=child, stderr=child, env=env) as proc:
        os.close(child)
        term = Terminal(main)
        try:
            started = term.expect("starting one (log: ")
            assert f"no server at http://127.0.0.1:{port}" in started
            term.expect("mlx-flash chat with demo", timeout=180)
            term.expect(">>> ")
            server_pids = _listeners(port)
            assert server_pids, "the started server is not listening"
            assert _workers_of(server_pids), "no worker of the started server found"
            term.send("Hello")
            reply = term.expect(">>> ").replace("\r", "")
            body = {"model": "demo", "messages": [{"role": "user", "content": "Hello"}], "temperature": 0}
            direct = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
            assert direct.json()["choices"][0]["message"]["content"].strip() in reply
            term.send("/exit")
            assert proc.wait(60) == 0
            assert _refused(port)
            assert not [p for p in server_pids if Path(f"/proc/{p}").exists()], "server left running"
            assert not _workers_of(server_pids), "workers left running"
            log = tmp_path / ".cache" / "mlx-flash" / "chat-server.log"
            assert "listening" in log.read_text()
        finally:
            os.close(main)
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            for pid in _listeners(port):
                os.kill(pid, signal.SIGKILL)


def _listeners(port: int) -> list[int]:
    """Pids of the processes with a socket listening on `port` (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(fields[9])
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in {f"socket:[{i}]" for i in inodes} for fd in fds):
                pids.append(int(pid))
    return pids


def _workers_of(pids: list[int]) -> list[int]:
    """Pids of the workers supervised by any of `pids` (their command line names the parent)."""
    marks = [f"--parent-pid\0{p}\0".encode() for p in pids]
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if any(m in cmdline for m in marks):
                found.append(int(pid))
    return found


def test_no_start_fails_fast_with_a_clear_message(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "HOME": str(tmp_path)}
    cmd = [*mlx_flash_command(), "chat", "--url", f"http://127.0.0.1:{port}", "--no-start"]
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    assert f"cannot reach http://127.0.0.1:{port}" in done.stdout
    assert time.monotonic() - started < 10
    assert _refused(port)
