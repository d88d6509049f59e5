"""A MoE layer whose experts live on disk: a pool of slots in memory, an expert -> slot lookup, and the
layer that feeds the lookup to mlx-lm's own SwitchGLU/SwitchMLP, so `gather_qmm`/`gather_mm` run on the
slots.

Each per-expert tensor of the layer (weights, quantization scales and biases, linear biases) is held
as a slot array of shape (capacity, ...). Before the layer runs, its router's choice is read, the
experts it needs and lacks are loaded (a miss blocks: the pass never runs with a missing expert), and
the expert indices are mapped to slots. A pass needing more experts than there are slots runs in
groups of at most `capacity` experts, resident ones first, and each (token, expert) result is taken
from its group: the output is exactly the resident model's.

With every expert resident in order (`full`), the layer is mlx-lm's, untouched: no lookup, no wait.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

from mlx_flash.experts.policy import groups, make_policy
from mlx_flash.experts.store import DTYPES, ExpertStore, host_array

# The per-expert arrays of SwitchLinear / QuantizedSwitchLinear (mlx-lm names).
EXPERT_ARRAYS = ("weight", "scales", "biases", "bias", "global_scale")


@dataclass
class Counters:
    """What one model's pools did, summed over layers."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes_read: int = 0
    read_seconds: float = 0.0


@dataclass(frozen=True)
class ExpertArray:
    """One per-expert array of a layer: the module holding it, its attribute, its tensor on disk."""

    module: Any
    attribute: str
    tensor: str


def moe_layers(model: Any) -> list[tuple[Any, str, Any]]:
    """(parent, attribute, expert module) for each mlx-lm expert layer, in model order: the
    SwitchGLU/SwitchMLP itself, or what already stands in for it."""
    found = []
    for _, parent in model.named_modules():
        if isinstance(parent, StreamedExperts) or getattr(parent, "stands_in", False):
            continue
        for name, child in parent.children().items():
            if isinstance(child, SwitchGLU | SwitchMLP) or getattr(child, "stands_in", False):
                found.append((parent, name, child))
    return found


def is_bulk(x: mx.array) -> bool:
    """Whether a layer's input (batch, tokens, hidden) is a prompt chunk rather than a decode step."""
    return x.ndim >= 3 and x.shape[-2] > 1


def experts_of(layer: Any) -> int:
    """Experts of an expert layer (a SwitchGLU/SwitchMLP or what stands in for it)."""
    if isinstance(layer, StreamedExperts):
        return layer.num_experts
    first = expert_arrays("", layer)[0]
    return int(first.module[first.attribute].shape[0])


def expert_arrays(path: str, switch: Any) -> list[ExpertArray]:
    """The per-expert arrays of a SwitchGLU/SwitchMLP at `path` in the model, named as saved."""
    out = []
    for name, linear in switch.children().items():
        if isinstance(linear, nn.Module):  # type: ignore[attr-defined]
            for attr in EXPERT_ARRAYS:
                if isinstance(linear.get(attr), mx.array):
                    out.append(ExpertArray(linear, attr, f"{path}.{name}.{attr}"))
    return out


class ExpertPool:
    """One MoE layer's experts in memory: `capacity` slots, which expert is in which, and the policy
    choosing what to evict. Every method runs under the model's `lock`."""

    def __init__(
        self,
        arrays: list[ExpertArray],
        store: ExpertStore,
        policy: str,
        counters: Counters,
        lock: threading.RLock,
    ) -> None:
        self.arrays = arrays
        self.store = store
        self.counters = counters
        self.lock = lock
        self.num_experts = store.tensors[arrays[0].tensor].num_experts
        self.expert_bytes = store.expert_bytes([a.tensor for a in arrays])
        self.policy_name = policy
        self.policy = make_policy(policy, self.num_experts)
        self.policy.resident = set(range(self.num_experts))
        # Every expert, in order, in the arrays mlx-lm loaded.
        self.full = True
        self.capacity = self.num_experts
        self.slot_of = np.arange(self.num_experts, dtype=np.int32)
        self.free: list[int] = []
        self.lookup = mx.array(self.slot_of)
        self.dtypes = {a.tensor: store.tensors[a.tensor].location.dtype for a in arrays}
        # A resize ran off the engine thread: `settle` finishes it on the engine thread.
        self.unsettled = False

    @property
    def resident_bytes(self) -> int:
        return self.capacity * self.expert_bytes

    def run(self, inner: Any, x: mx.array, indices: mx.array, ids: np.ndarray[Any, Any]) -> mx.array:
        """The layer's output for `x` routed to `indices` (`ids`, evaluated), loading what is missing
        first. Under the lock."""
        needed = [int(e) for e in np.unique(ids)]
        bulk = is_bulk(x)
        if len(needed) <= self.capacity:
            self._load(needed, bulk)
            return inner(x, self.lookup[indices])  # type: ignore[no-any-return]
        out: mx.array | None = None
        for group in groups(needed, self.capacity, self.policy.resident):
            self._load(group, bulk)
            mask = mx.array(np.isin(ids, group))
            y = inner(x, mx.where(mask, self.lookup[indices], 0))
            out = y if out is None else mx.where(mask[..., None], y, out)
            mx.eval(out)  # before the next group overwrites slots this one reads
        assert out is not None
        return out

    def _load(self, experts: list[int], bulk: bool) -> None:
        outcome = self.policy.access(experts, bulk)
        c = self.counters
        c.hits += outcome.hits
        c.misses += len(outcome.misses)
        c.evictions += len(outcome.evicted)
        for victim in outcome.evicted:
            self.free.append(int(self.slot_of[victim]))
            self.slot_of[victim] = -1
        if not outcome.misses:
            return
        slots = [self.free.pop() for _ in outcome.misses]
        started = time.perf_counter()
        try:
            data = self.store.read([a.tensor for a in self.arrays], outcome.misses)
        except BaseException:
            # Nothing was loaded: the misses are not resident, their slots are free again (and the
            # victims' stay free), so a later pass reads them instead of computing with a stale slot.
            self.policy.drop(outcome.misses)
            self.free.extend(slots)
            self.lookup = mx.array(self.slot_of)
            raise
        c.read_seconds += time.perf_counter() - started
        c.bytes_read += len(outcome.misses) * self.expert_bytes
        for a in self.arrays:
            held, read = a.module[a.attribute], data[a.tensor]
            for i, slot in enumerate(slots):  # one slice update per slot: ~10x a scatter on CPU
                held[slot] = read[i]
        mx.eval([a.module[a.attribute] for a in self.arrays])
        self.slot_of[outcome.misses] = slots
        self.lookup = mx.array(self.slot_of)

    def start_empty(self, capacity: int) -> None:
        """Hold `capacity` empty slots instead of the arrays mlx-lm made, which are never read."""
        for a in self.arrays:
            old = a.module[a.attribute]
            a.module[a.attribute] = mx.zeros((capacity, *old.shape[1:]), dtype=old.dtype)
        self.policy = make_policy(self.policy_name, capacity)
        self.full, self.capacity = False, capacity
        self.slot_of = np.full(self.num_experts, -1, dtype=np.int32)
        self.free = list(range(capacity - 1, -1, -1))
        self.lookup = mx.array(self.slot_of)

    def resize(self, capacity: int) -> None:
        """Hold `capacity` experts from now on (all of them: back to mlx-lm's own layout). Output never
        changes; what is dropped is read again when needed.

        Resizing runs on whatever thread follows memory pressure, so it copies rows on the host (the
        arrays are in unified or CPU memory) instead of queueing MLX operations: an MLX evaluation from
        a second thread waits while the engine has many operations in flight, for as long as the one
        running takes (seconds for a CPU's LM head), and memory has to be freed now."""
        capacity = max(1, min(capacity, self.num_experts))
        if capacity == self.capacity and not (capacity == self.num_experts and not self.full):
            return
        if capacity == self.num_experts:
            self._become_full()
            return
        self.policy.resize(capacity)
        keep = sorted(self.policy.resident)
        for a in self.arrays:
            old = host_array(a.module[a.attribute], self.dtypes[a.tensor])
            rows = np.zeros((capacity, *old.shape[1:]), dtype=old.dtype)
            rows[: len(keep)] = old[self.slot_of[keep]]
            del old
            self._hold(a, rows)  # one array at a time: the old one goes before the next
        self.slot_of[:] = -1
        self.slot_of[keep] = np.arange(len(keep), dtype=np.int32)
        self.free = list(range(capacity - 1, len(keep) - 1, -1))
        self.full, self.capacity, self.unsettled = False, capacity, True
        self.lookup = mx.array(self.slot_of)

    def _become_full(self) -> None:
        missing = [e for e in range(self.num_experts) if self.slot_of[e] < 0]
        resident = [e for e in range(self.num_experts) if self.slot_of[e] >= 0]
        started = time.perf_counter()
        data = self.store.read_host([a.tensor for a in self.arrays], missing) if missing else {}
        self.counters.read_seconds += time.perf_counter() - started
        self.counters.bytes_read += len(missing) * self.expert_bytes
        for a in self.arrays:
            old = host_array(a.module[a.attribute], self.dtypes[a.tensor])
            rows = np.empty((self.num_experts, *old.shape[1:]), dtype=old.dtype)
            rows[resident] = old[self.slot_of[resident]]
            if missing:
                rows[missing] = data[a.tensor]
            del old
            self._hold(a, rows)
        self.policy.resize(self.num_experts)
        self.policy.resident = set(range(self.num_experts))
        self.full, self.capacity, self.free = True, self.num_experts, []
        self.slot_of = np.arange(self.num_experts, dtype=np.int32)
        self.lookup = mx.array(self.slot_of)
        self.unsettled = True

    def _hold(self, a: ExpertArray, rows: np.ndarray[Any, Any]) -> None:
        """`rows` become the layer's array `a` (raw bits where its dtype needs a view)."""
        a.module[a.attribute] = mx.array(rows)

    def settle(self) -> None:
        """On the engine thread, before a pass: view the raw bits a resize left as the layer's dtypes
        (an MLX operation belongs to the thread that made it), and return what it freed from MLX's
        buffer cache (`clear_cache` holds the GIL while the engine has work in flight, and here the
        engine has just waited for its router: nothing is)."""
        if not self.unsettled:
            return
        for a in self.arrays:
            held, dtype = a.module[a.attribute], DTYPES[self.dtypes[a.tensor]][1]
            if held.dtype != dtype:
                a.module[a.attribute] = held.view(dtype)
        mx.eval([a.module[a.attribute] for a in self.arrays])
        mx.clear_cache()
        self.unsettled = False


class StreamedExperts(nn.Module):  # type: ignore[misc,name-defined]  # mlx.nn has no type information
    """Stands in for a SwitchGLU/SwitchMLP whose experts are held by an `ExpertPool`."""

    stands_in = True

    def __init__(self, inner: Any, pool: ExpertPool) -> None:
        super().__init__()
        self.inner = inner
        self._pool = pool

    @property
    def num_experts(self) -> int:
        return self._pool.num_experts

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        pool = self._pool
        # Wait for the router (the model's work up to here) outside the lock: a resize never waits
        # for a forward pass, only for a layer's reads.
        ids = None if pool.full else np.array(indices)
        with pool.lock:
            pool.settle()
            if pool.full:
                return self.inner(x, indices)  # type: ignore[no-any-return]
            if ids is None:  # the pool left the full layout meanwhile
                ids = np.array(indices)
            return pool.run(self.inner, x, indices, ids)
