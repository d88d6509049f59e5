"""`mlx-flash chat --url URL [--api-key K] [--model M] [--no-start]`: a terminal chat with a server.

When nothing answers at a loopback URL, chat starts `mlx-flash serve` there itself (its log in
~/.cache/mlx-flash/chat-server.log), waits for a worker, and stops it on the way out; `--no-start`
only talks to a server that is already running. Replies stream as they are generated. A line ending
in a backslash continues on the next line (paste-friendly multi-line input). Commands: /model NAME,
/models, /status, /clear, /exit (or EOF). History: GNU readline (standard library, no dependency),
kept in ~/.mlx_flash_history.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx

HISTORY = Path.home() / ".mlx_flash_history"
SERVER_LOG = Path.home() / ".cache" / "mlx-flash" / "chat-server.log"
START_TIMEOUT = 180.0  # seconds for a started server's first worker (it may download a model)
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _say(text: str, end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()


def _read_message() -> str | None:
    """One message; lines ending in a backslash continue it. None at EOF."""
    lines: list[str] = []
    prompt = ">>> "
    while True:
        try:
            line = input(prompt)
        except EOFError:
            return None
        if line.endswith("\\"):
            lines.append(line[:-1])
            prompt = "... "
            continue
        lines.append(line)
        return "\n".join(lines)


def _stream(
    client: httpx.Client, model: str, messages: list[dict[str, str]], temperature: float | None
) -> str:
    body: dict[str, object] = {"model": model, "messages": messages, "stream": True}
    if temperature is not None:
        body["temperature"] = temperature
    reply: list[str] = []
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.is_error:
            response.read()
            _say(f"error {response.status_code}: {response.text}")
            return ""
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            piece = (choices[0].get("delta") or {}).get("content") or ""
            reply.append(piece)
            _say(piece, end="")
    _say("")
    return "".join(reply)


def _models(client: httpx.Client) -> list[str]:
    return [str(m["id"]) for m in client.get("/v1/models").json()["data"]]


def run(client: httpx.Client, model: str | None, temperature: float | None = None) -> int:
    model = model or next(iter(_models(client)), "")
    messages: list[dict[str, str]] = []
    _say(f"mlx-flash chat with {model} (/models, /model NAME, /status, /clear, /exit)")
    while (text := _read_message()) is not None:
        command, _, arg = text.strip().partition(" ")
        if command in ("/exit", "/quit"):
            break
        if command == "/models":
            _say("\n".join(_models(client)))
        elif command == "/model":
            model = arg.strip() or model
            _say(f"model: {model}")
        elif command == "/status":
            _say(json.dumps(client.get("/admin/api/status").json(), indent=2))
        elif command == "/clear":
            messages.clear()
            _say("history cleared")
        elif text.strip():
            messages.append({"role": "user", "content": text})
            reply = _stream(client, model, messages, temperature)
            if reply:
                messages.append({"role": "assistant", "content": reply})
            else:
                messages.pop()
    return 0


def _answers(client: httpx.Client) -> bool:
    try:
        client.get("/health", timeout=2)
    except httpx.TransportError:
        return False
    return True


@contextlib.contextmanager
def _own_server(client: httpx.Client, url: str, model: str | None, api_key: str | None) -> Iterator[None]:
    """`mlx-flash serve` on `url`'s port (with the key, if one was given) until the block ends; ready
    when a worker is."""
    port = urlsplit(url).port or 80
    cmd = [
        str(Path(sys.executable).with_name("mlx-flash")),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if model:
        cmd += ["--model", model]
    SERVER_LOG.parent.mkdir(parents=True, exist_ok=True)
    _say(f"no server at {url}: starting one (log: {SERVER_LOG})")
    env = {**os.environ, "MLX_FLASH_API_KEY": api_key} if api_key else None  # not in argv: ps shows it
    with SERVER_LOG.open("ab") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _worker_ready(client):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = SERVER_LOG.read_text(errors="replace").splitlines()[-10:]
                raise RuntimeError("the server did not start:\n" + "\n".join(tail))
            time.sleep(0.25)
        yield
    finally:
        _stop(proc)


def _worker_ready(client: httpx.Client) -> bool:
    try:
        workers = client.get("/admin/api/workers", timeout=2).json()["workers"]
    except (httpx.TransportError, ValueError, KeyError):
        return False
    return any(w.get("state") == "ready" for w in workers)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's group (it drains, then stops its workers), SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mlx-flash chat", description="A terminal chat with a server.")
    p.add_argument("--url", default=os.environ.get("MLX_FLASH_URL", "http://127.0.0.1:8080"))
    p.add_argument("--api-key", default=os.environ.get("MLX_FLASH_API_KEY"))
    p.add_argument("--model", help="the model to talk to (default: the server's first)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the server's)")
    p.add_argument(
        "--no-start", action="store_true", help="never start a server when none answers at a loopback --url"
    )
    args = p.parse_args(argv)
    try:
        import readline

        if HISTORY.exists():
            readline.read_history_file(HISTORY)
    except (ImportError, OSError):
        readline = None  # type: ignore[assignment]
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        with contextlib.ExitStack() as stack:
            client = stack.enter_context(
                httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=600)
            )
            if not args.no_start and urlsplit(args.url).hostname in LOOPBACK and not _answers(client):
                stack.enter_context(_own_server(client, args.url, args.model, args.api_key))
            return run(client, args.model, args.temperature)
    except httpx.HTTPError as e:
        _say(f"mlx-flash chat: cannot reach {args.url}: {e}")
        return 1
    except RuntimeError as e:
        _say(f"mlx-flash chat: {e}")
        return 1
    except KeyboardInterrupt:
        _say("")
        return 130
    finally:
        if readline is not None:
            try:
                readline.write_history_file(HISTORY)
            except OSError:
                pass
