"""Child processes of a benchmark: start a server and learn its port, stop it, wait until it is ready;
its memory and CPU time from /proc, sampled in the background or read before and after a run.

Linux only (/proc), as the benchmarks that use it are run on Linux; used by bench/sidecar_overhead.py and
bench/concurrency.py (mlx_lm.server).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import resource
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# ---------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    process: subprocess.Popen[str]
    port: int
    log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _drain(stream: IO[str], lines: list[str], found: queue.Queue[str]) -> None:
    """Keep a child's pipe empty (a full pipe would block it); hand each line to `found` too."""
    for line in stream:
        lines.append(line.rstrip("\n"))
        found.put(line)


def _first(found: queue.Queue[str], want: Callable[[str], int | None], timeout: float, what: str) -> int:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = found.get(timeout=left)
        except queue.Empty:
            break
        value = want(line)
        if value is not None:
            return value
    raise RuntimeError(f"{what}: nothing after {timeout} s")


def free_port() -> int:
    """A port nobody listens on now, for servers that cannot pick their own and report it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(name: str, argv: list[str], port_from: str) -> Server:
    """Start `argv`; its port is the first stdout line ("stdout"), the sidecar's `listening` log line
    ("log"), or given ("port:N", for a server told its port in `argv`)."""
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    server = Server(name, process, 0)
    out_q: queue.Queue[str] = queue.Queue()
    err_q: queue.Queue[str] = queue.Queue()
    assert process.stdout is not None and process.stderr is not None
    for stream, q in ((process.stdout, out_q), (process.stderr, err_q)):
        threading.Thread(target=_drain, args=(stream, server.log, q), daemon=True).start()

    def listening(line: str) -> int | None:
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("msg") == "listening":
                return int(entry["port"])
        return None

    try:
        if port_from.startswith("port:"):
            server.port = int(port_from.removeprefix("port:"))
        elif port_from == "stdout":
            server.port = _first(out_q, lambda line: int(line) if line.strip().isdigit() else None, 10, name)
        else:
            server.port = _first(err_q, listening, 10, name)
    except BaseException:
        stop(server)
        raise
    return server


def stop(server: Server) -> None:
    """SIGTERM, then SIGKILL after 5 s; never waits longer than that."""
    p = server.process
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


def wait_ready(url: str, timeout: float, path: str = "/ready") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, urllib.error.URLError):
            with urllib.request.urlopen(f"{url}{path}", timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(0.05)
    raise RuntimeError(f"{url}{path} did not answer 200 within {timeout} s")


# ---------------------------------------------------------------- memory


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (kB, as /proc says), threads and open file descriptors of `pid`."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key.lower() + "_kb"] = int(value.split()[0])
        elif key == "Threads":
            out["threads"] = int(value)
    with contextlib.suppress(OSError):
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def mb(kb: int) -> float:
    """/proc's kB (KiB) as MB (10^6 bytes), the target's unit."""
    return round(kb * 1024 / 1e6, 2)


class Sampler:
    """Samples a process's memory every `period` seconds, tagged with the phase running then."""

    def __init__(self, pid: int, period: float = 0.1) -> None:
        self.pid, self.period = pid, period
        self.phase = "start-up"
        self.samples: list[tuple[str, float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.samples.append((self.phase, time.monotonic() - self._started, memory(self.pid)))
            self._stop.wait(self.period)

    def by_phase(self) -> dict[str, dict[str, Any]]:
        phases: dict[str, dict[str, Any]] = {}
        for phase, _, m in self.samples:
            p = phases.setdefault(phase, {"samples": 0, "max_rss_kb": 0, "max_fds": 0, "max_threads": 0})
            p["samples"] += 1
            p["max_rss_kb"] = max(p["max_rss_kb"], m.get("vmrss_kb", 0))
            p["max_fds"] = max(p["max_fds"], m.get("fds", 0))
            p["max_threads"] = max(p["max_threads"], m.get("threads", 0))
        for p in phases.values():
            p["max_rss_mb"] = mb(p["max_rss_kb"])
        return phases


# ---------------------------------------------------------------- CPU time


def machine_cpu_s() -> dict[str, float]:
    """The whole machine's CPU time (all cores) from /proc/stat: in processes, in interrupts (loopback
    networking runs there, charged to no process), and stolen by the hypervisor."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return {"processes": (user + nice + system) / tick, "irq": (irq + softirq) / tick, "steal": steal / tick}


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
