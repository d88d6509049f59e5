"""Which resident expert to evict: LRU, LFU and frequency with decay, and Belady's optimum for replay.

A policy tracks one layer's resident experts. `access(needed)` is called once per forward pass of the
layer with the experts its tokens use; it returns the experts that missed and, to make room for them,
the experts evicted. Experts needed by the current pass are never evicted for each other: a pass needing
more experts than the capacity is the caller's to split.

A bulk pass (a prompt chunk: many tokens touching most experts) must not flush the working set of
decoding: its hits leave the policy's order unchanged and its misses enter as the first to be evicted.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

POLICIES = ("lru", "lfu", "decay")
# Frequency with decay: each access adds 1, and every score is multiplied by this per pass of the layer.
DECAY = 0.99


@dataclass
class Outcome:
    hits: int = 0
    misses: list[int] = field(default_factory=list)
    evicted: list[int] = field(default_factory=list)


class Policy:
    """A layer's resident set of at most `capacity` experts; subclasses choose the victim."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("an expert cache needs room for at least one expert")
        self.capacity = capacity
        self.resident: set[int] = set()

    def access(self, needed: Iterable[int], bulk: bool = False) -> Outcome:
        want = list(dict.fromkeys(needed))
        if len(want) > self.capacity:
            raise ValueError(f"{len(want)} experts needed at once, room for {self.capacity}")
        out = Outcome()
        for e in want:
            if e in self.resident:
                out.hits += 1
            else:
                out.misses.append(e)
        keep = set(want)
        for e in out.misses:
            if len(self.resident) >= self.capacity:
                victim = self._victim(self.resident - keep)
                self.resident.discard(victim)
                self._forget(victim)
                out.evicted.append(victim)
            self.resident.add(e)
        if bulk:
            self._insert_cold(out.misses)
        else:
            self._touch(want)
        return out

    def resize(self, capacity: int) -> list[int]:
        """Change the capacity; the experts evicted to fit it."""
        if capacity < 1:
            raise ValueError("an expert cache needs room for at least one expert")
        self.capacity = capacity
        evicted = []
        while len(self.resident) > capacity:
            victim = self._victim(self.resident)
            self.resident.discard(victim)
            self._forget(victim)
            evicted.append(victim)
        return evicted

    def drop(self, experts: Iterable[int]) -> None:
        """Experts that could not be loaded after `access` admitted them: not resident after all."""
        for e in experts:
            self.resident.discard(e)
            self._forget(e)

    def _victim(self, candidates: set[int]) -> int:
        raise NotImplementedError

    def _touch(self, experts: Sequence[int]) -> None:
        raise NotImplementedError

    def _insert_cold(self, experts: Sequence[int]) -> None:
        """Experts entered for a bulk pass: next in line for eviction."""

    def _forget(self, expert: int) -> None:
        """An expert left the cache."""


class LRU(Policy):
    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[int, None] = OrderedDict()

    def _touch(self, experts: Sequence[int]) -> None:
        for e in experts:
            self._order[e] = None
            self._order.move_to_end(e)

    def _insert_cold(self, experts: Sequence[int]) -> None:
        for e in experts:
            self._order[e] = None
            self._order.move_to_end(e, last=False)

    def _victim(self, candidates: set[int]) -> int:
        never_used = candidates - self._order.keys()
        if never_used:
            return min(never_used)
        return next(e for e in self._order if e in candidates)

    def _forget(self, expert: int) -> None:
        self._order.pop(expert, None)


class LFU(Policy):
    """Least frequently used, counting every access since the start (ties: least recently used)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._count: dict[int, float] = {}
        self._last: dict[int, int] = {}
        self._clock = 0

    def _touch(self, experts: Sequence[int]) -> None:
        self._clock += 1
        for e in experts:
            self._count[e] = self._count.get(e, 0.0) + 1.0
            self._last[e] = self._clock

    def _victim(self, candidates: set[int]) -> int:
        return min(candidates, key=lambda e: (self._count.get(e, 0.0), self._last.get(e, 0)))


class Decay(LFU):
    """Frequency with decay: recent use counts more than old use, so the set follows the workload."""

    def _touch(self, experts: Sequence[int]) -> None:
        for e in self._count:
            self._count[e] *= DECAY
        super()._touch(experts)


def groups(needed: Sequence[int], capacity: int, resident: set[int]) -> list[list[int]]:
    """How a pool serves a pass needing these experts: at most `capacity` at a time, the resident ones
    first (served before anything is evicted for the others)."""
    want = list(dict.fromkeys(needed))
    if len(want) > capacity:
        want.sort(key=lambda e: e not in resident)
    return [want[i : i + capacity] for i in range(0, len(want), capacity)]


def make_policy(name: str, capacity: int) -> Policy:
    kinds: dict[str, type[Policy]] = {"lru": LRU, "lfu": LFU, "decay": Decay}
    if name not in kinds:
        raise ValueError(f"unknown expert cache policy {name!r}: use one of {', '.join(POLICIES)}")
    return kinds[name](capacity)


def hit_rate(passes: Sequence[tuple[bool, Sequence[int]]], policy: Policy) -> float:
    """Fraction of expert uses served from the cache over one layer's (bulk, experts) passes, each
    served in `groups` as the pools do."""
    hits = uses = 0
    for bulk, needed in passes:
        for group in groups(needed, policy.capacity, policy.resident):
            out = policy.access(group, bulk)
            hits += out.hits
            uses += out.hits + len(out.misses)
    return hits / uses if uses else 1.0


def belady_hit_rate(passes: Sequence[Sequence[int]], capacity: int) -> float:
    """The optimum, served in the same groups: on a miss, evict the resident expert needed furthest in
    the future (an expert a later group of the same pass needs is needed now)."""
    uses_at: dict[int, list[int]] = {}
    for i, needed in enumerate(passes):
        for e in dict.fromkeys(needed):
            uses_at.setdefault(e, []).append(i)
    cursor = dict.fromkeys(uses_at, 0)
    resident: set[int] = set()
    hits = uses = 0
    for i, needed in enumerate(passes):
        parts = groups(needed, capacity, resident)
        for e in dict.fromkeys(needed):
            cursor[e] += 1  # uses_at[e][cursor[e]] is now e's next use after this pass
        for n, group in enumerate(parts):
            later = {e for g in parts[n + 1 :] for e in g}

            def next_use(x: int, later: set[int] = later, now: int = i) -> int:
                if x in later:
                    return now
                after = uses_at[x]
                return after[cursor[x]] if cursor[x] < len(after) else len(passes) + 1

            for e in group:
                uses += 1
                if e in resident:
                    hits += 1
                    continue
                if len(resident) >= capacity:
                    resident.discard(max(resident - set(group), key=next_use))
                resident.add(e)
    return hits / uses if uses else 1.0


def static_hit_rate(passes: Sequence[Sequence[int]], capacity: int) -> float:
    """Hindsight's best fixed set: the `capacity` experts used most over all the passes, never evicted.
    What frequency alone can reach; Belady's optimum beyond it is what knowing the order buys."""
    uses = Counter(e for needed in passes for e in dict.fromkeys(needed))
    total = sum(uses.values())
    return sum(n for _, n in uses.most_common(capacity)) / total if total else 1.0
