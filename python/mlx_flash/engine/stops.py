"""Stop strings across token boundaries: hold back text that could still become a stop string."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Piece(Generic[T]):
    """The text one token added, and what travels with it (its logprob)."""

    text: str
    item: T


class StopMatcher(Generic[T]):
    """Feed it token texts; it releases pieces that can no longer be part of a stop string.

    Pieces are released whole (never split) unless a stop string cuts one, so every released
    item keeps exactly the text its token produced.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending: list[Piece[T]] = []
        self.matched: str | None = None  # the stop string that ended the text, once one has

    def push(self, text: str, item: T) -> tuple[list[Piece[T]], bool]:
        """Add one token's text; return the pieces safe to emit and whether a stop matched."""
        self._pending.append(Piece(text, item))
        joined = "".join(p.text for p in self._pending)
        hits = [(i, s) for s in self._stops if (i := joined.find(s)) >= 0]
        if hits:
            index, self.matched = min(hits, key=lambda hit: hit[0])
            return self._cut(index), True
        limit = len(joined) - self._holdback(joined)
        released, pos = 0, 0
        for p in self._pending:
            if pos + len(p.text) > limit:
                break
            pos += len(p.text)
            released += 1
        # A trailing empty piece (half of a UTF-8 character) waits for the text that completes it.
        while released and not self._pending[released - 1].text:
            released -= 1
        out, self._pending = self._pending[:released], self._pending[released:]
        return out, False

    def flush(self) -> list[Piece[T]]:
        """Generation ended without a stop: everything held back is real output."""
        out, self._pending = self._pending, []
        return out

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _cut(self, index: int) -> list[Piece[T]]:
        out: list[Piece[T]] = []
        pos = 0
        for p in self._pending:
            if pos >= index:
                break
            out.append(Piece(p.text[: index - pos], p.item))
            pos += len(p.text)
        self._pending = []
        return out
