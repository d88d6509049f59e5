"""Responses kept for `previous_response_id` and `GET /v1/responses/{id}`: in memory, bounded in count
and age, so a long-running worker does not grow without limit. Per worker: a follow-up that lands on
another worker (or after a restart) gets a clear 404."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MAX_RESPONSES = 1000
TTL_SECONDS = 3600.0


@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]  # the response object as the client got it
    messages: list[dict[str, Any]]  # the conversation through this response, OpenAI-shaped
    at: float


class ResponseStore:
    def __init__(self, max_responses: int = MAX_RESPONSES, ttl: float = TTL_SECONDS) -> None:
        self.max_responses = max_responses
        self.ttl = ttl
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def put(self, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        self._expire()
        self._items[response["id"]] = Stored(response, messages, time.monotonic())
        while len(self._items) > self.max_responses:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> Stored | None:
        self._expire()
        return self._items.get(response_id)

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl
        while self._items and next(iter(self._items.values())).at < cutoff:
            self._items.popitem(last=False)
