"""One generation as the non-OpenAI surfaces consume it: the engine's events, watched for a client that
goes away, and (for whole responses) gathered into one `Turn`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request

from mlx_flash.api.errors import InternalError, generation_failed
from mlx_flash.engine.engine import RequestHandle
from mlx_flash.engine.request import Event, Failed, Finished, TextDelta, ToolCall


@dataclass
class Clock:
    """When a generation was submitted, produced its first event, and ended (perf_counter seconds)."""

    submitted: float
    first: float | None = None
    end: float | None = None

    def saw_event(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def ended(self) -> None:
        self.end = time.perf_counter()
        self.saw_event()


@dataclass
class Turn:
    text: str
    finished: Finished
    clock: Clock
    events: list[Event] = field(default_factory=list)  # everything, in order (tool calls, reasoning)

    @property
    def calls(self) -> list[ToolCall]:
        return [e for e in self.events if isinstance(e, ToolCall)]


async def watched(handle: RequestHandle, request: Request) -> AsyncIterator[Event]:
    """The events of a whole (non-streamed) response; a client that disconnects cancels generation."""

    async def watch_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        handle.cancel()

    watcher = asyncio.create_task(watch_disconnect())
    try:
        async for ev in handle.events():
            yield ev
    finally:
        watcher.cancel()
        handle.cancel()


async def gather(handle: RequestHandle, request: Request) -> Turn:
    """The whole generation; a failure in the engine is a 500 in the caller's error shape."""
    clock = Clock(handle.submitted)
    texts: list[str] = []
    events: list[Event] = []
    async for ev in watched(handle, request):
        clock.saw_event()
        if isinstance(ev, Failed):
            raise generation_failed(ev)
        if isinstance(ev, Finished):
            clock.ended()
            return Turn("".join(texts), ev, clock, events)
        if isinstance(ev, TextDelta):
            texts.append(ev.text)
        events.append(ev)
    raise InternalError()  # events() always ends with Finished or Failed
