"""Timed streaming requests to OpenAI-compatible servers (ours or `mlx_lm.server`), shared by the
serving benchmarks (concurrency.py, multi_turn.py, routing.py).

`stream()` posts one request with `stream: true` and records, as chunks arrive, the arrival time of every
chunk that carries text; the `Timed` it fills can be watched while the request runs (the head-of-line
measurement waits on it) and is complete when `stream()` returns. Cancelling the task closes the
connection, which is how a client abandons a stream.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from sidecar_overhead import pct


@dataclass
class Timed:
    """One streamed request, seen from the client (times are `time.perf_counter()`)."""

    start: float = 0.0
    chunks: list[float] = field(default_factory=list)  # arrival of each chunk with text
    texts: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    end: float | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    @property
    def ttft(self) -> float:
        """Request start to the first chunk with text."""
        if not self.chunks:
            raise RuntimeError("no text arrived")
        return self.chunks[0] - self.start

    @property
    def completion_tokens(self) -> int:
        return int((self.usage or {}).get("completion_tokens", 0))

    @property
    def prompt_tokens(self) -> int:
        return int((self.usage or {}).get("prompt_tokens", 0))

    @property
    def cached_tokens(self) -> int:
        details = (self.usage or {}).get("prompt_tokens_details") or {}
        return int(details.get("cached_tokens") or 0)

    def gaps(self) -> list[tuple[float, float]]:
        """(previous chunk, this chunk) for every chunk after the first: the inter-token intervals."""
        return list(zip(self.chunks, self.chunks[1:], strict=False))

    def sample(self) -> dict[str, Any]:
        """The raw record kept in results files: times relative to the request's start, in seconds."""
        return {
            "ttft_s": round(self.ttft, 6) if self.chunks else None,
            "chunk_s": [round(t - self.start, 5) for t in self.chunks],
            "usage": self.usage,
        }


async def stream(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], into: Timed | None = None
) -> Timed:
    """POST `body` (made a stream with a usage chunk) to `url`; fills and returns `into`."""
    timed = into if into is not None else Timed()
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    timed.start = time.perf_counter()
    async with client.stream("POST", url, json=payload) as r:
        if r.status_code != 200:
            raise RuntimeError(
                f"{url} answered {r.status_code}: {(await r.aread()).decode(errors='replace')}"
            )
        async for line in r.aiter_lines():
            now = time.perf_counter()
            if not line.startswith("data: "):  # blank separators, SSE comments (mlx_lm's keepalives)
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"{url}: error mid-stream: {chunk['error']}")
            if chunk.get("usage"):
                timed.usage = chunk["usage"]
            text = "".join(_text(c) for c in chunk.get("choices") or [])
            if text:
                timed.chunks.append(now)
                timed.texts.append(text)
    timed.end = time.perf_counter()
    if timed.usage is None:
        raise RuntimeError(f"{url}: the stream ended without a usage chunk")
    return timed


def _text(choice: dict[str, Any]) -> str:
    """Text of a completion choice or of a chat delta."""
    if "text" in choice:
        return str(choice.get("text") or "")
    return str((choice.get("delta") or {}).get("content") or "")


def percentiles_ms(seconds: list[float]) -> dict[str, float | int]:
    """Count, p50/p90/p99 (nearest rank, as sidecar_overhead) and max of `seconds`, in ms."""
    if not seconds:
        return {"count": 0}
    ms = [s * 1e3 for s in seconds]
    return {
        "count": len(ms),
        "p50": round(pct(ms, 0.5), 3),
        "p90": round(pct(ms, 0.9), 3),
        "p99": round(pct(ms, 0.99), 3),
        "max": round(max(ms), 3),
    }
