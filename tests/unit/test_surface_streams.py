"""What each surface sends when generation fails after its stream has started, and the bounds of the
Responses store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import orjson

from mlx_flash.api import anthropic, ollama, responses
from mlx_flash.api.fields import Fields
from mlx_flash.api.response_store import ResponseStore
from mlx_flash.engine.engine import RequestHandle
from mlx_flash.engine.request import Failed, GenerationRequest, TextDelta


def failing_stream(render: Callable[[RequestHandle], AsyncIterator[bytes]]) -> bytes:
    """The bytes `render` sends for a generation that streams one delta, then fails."""

    async def run() -> bytes:
        handle = RequestHandle(GenerationRequest([1, 2], 8), asyncio.get_running_loop())
        handle.emit(TextDelta("hi"))
        handle.emit(Failed("boom"))
        return b"".join([chunk async for chunk in render(handle)])

    return asyncio.run(run())


def test_anthropic_stream_ends_with_an_error_event() -> None:
    out = failing_stream(lambda h: anthropic._events({"id": "msg_1"}, h, 2))
    last = out.split(b"\n\n")[-2]
    head, data = last.split(b"\n")
    assert head == b"event: error"
    assert orjson.loads(data.removeprefix(b"data: "))["error"]["type"] == "api_error"
    assert b"message_stop" not in out


def test_ollama_stream_ends_with_an_error_line() -> None:
    reply = ollama.Reply(True, "demo", time.perf_counter())
    lines = failing_stream(lambda h: ollama._lines(reply, h)).splitlines()
    assert orjson.loads(lines[0])["message"]["content"] == "hi"
    assert set(orjson.loads(lines[-1])) == {"error"}


def test_responses_stream_ends_with_response_failed() -> None:
    draft = responses.Draft({}, Fields({}), "demo", None)
    out = failing_stream(lambda h: responses._events(draft, h, lambda *_: None))
    head, data = out.split(b"\n\n")[-2].split(b"\n")
    assert head == b"event: response.failed"
    failed = orjson.loads(data.removeprefix(b"data: "))["response"]
    assert failed["status"] == "failed" and failed["error"]["message"]


def test_store_keeps_the_newest_responses() -> None:
    store = ResponseStore(max_responses=2, ttl=60)
    for i in range(3):
        store.put({"id": f"resp_{i}"}, [])
    assert store.get("resp_0") is None
    assert store.get("resp_1") is not None and store.get("resp_2") is not None


def test_store_forgets_responses_after_their_ttl() -> None:
    store = ResponseStore(ttl=0.05)
    store.put({"id": "resp_old"}, [])
    time.sleep(0.1)
    store.put({"id": "resp_new"}, [])
    assert store.get("resp_old") is None and store.get("resp_new") is not None
