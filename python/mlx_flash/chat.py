"""`mlx-flash chat --url URL [--api-key K] [--model M]`: a terminal chat with a running server.

Replies stream as they are generated. A line ending in a backslash continues on the next line
(paste-friendly multi-line input). Commands: /model NAME, /models, /status, /clear, /exit (or EOF).
History: GNU readline (standard library, no dependency), kept in ~/.mlx_flash_history.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import httpx

HISTORY = Path.home() / ".mlx_flash_history"


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


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mlx-flash chat", description="A terminal chat with a running server.")
    p.add_argument("--url", default=os.environ.get("MLX_FLASH_URL", "http://127.0.0.1:8080"))
    p.add_argument("--api-key", default=os.environ.get("MLX_FLASH_API_KEY"))
    p.add_argument("--model", help="the model to talk to (default: the server's first)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the server's)")
    args = p.parse_args(argv)
    try:
        import readline

        if HISTORY.exists():
            readline.read_history_file(HISTORY)
    except (ImportError, OSError):
        readline = None  # type: ignore[assignment]
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        with httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=600) as client:
            return run(client, args.model, args.temperature)
    except httpx.HTTPError as e:
        _say(f"mlx-flash chat: cannot reach {args.url}: {e}")
        return 1
    finally:
        if readline is not None:
            try:
                readline.write_history_file(HISTORY)
            except OSError:
                pass
