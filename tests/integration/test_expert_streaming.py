"""Streamed experts give the resident model's greedy output, byte for byte: every supported
architecture, f32 and 4-bit checkpoints with bf16 scales, every capacity from one expert per layer to
all of them, and across a live shrink and grow in the middle of a generation."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step, stream_generate
from mlx_lm.utils import load

from helpers import MOE_ARCHS, build_model, quantize_checkpoint
from mlx_flash.experts.streamer import ExpertStreamer

# Long enough that the prompt pass routes over 64 (token, expert) pairs: mlx-lm then sorts them.
PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs far away. " * 3
TOKENS = 20


def greedy(model: Any, tokenizer: Any) -> list[int]:
    return [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=TOKENS)]


def streamed(path: Path, experts_per_layer: int) -> tuple[Any, Any, ExpertStreamer]:
    model, tokenizer = load(str(path), lazy=True)
    streamer = ExpertStreamer(model, path, path.name)
    streamer.start_empty(experts_per_layer * streamer.unit_bytes)
    mx.eval(model.parameters())
    return model, tokenizer, streamer


@pytest.fixture(scope="module", params=[(a, q) for a in MOE_ARCHS for q in (False, True)], ids=str)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch, quantized = request.param
    path = build_model(arch, tmp_path_factory.mktemp(arch) / ("q4" if quantized else "f32"))
    return quantize_checkpoint(path) if quantized else path


def test_every_capacity_gives_the_resident_output(checkpoint: Path) -> None:
    model, tokenizer = load(str(checkpoint))
    want = greedy(model, tokenizer)
    model, tokenizer, streamer = streamed(checkpoint, 1)
    with streamer:
        experts = streamer.pools[0].num_experts
        for capacity in range(1, experts + 1):
            streamer.set_budget(capacity * streamer.unit_bytes)
            assert streamer.capacity == capacity
            assert greedy(model, tokenizer) == want, f"{capacity} of {experts} experts per layer"
        c = streamer.counters
        assert c.misses > 0 and c.hits > 0 and c.evictions > 0 and c.bytes_read > 0
        assert streamer.pools[0].full  # all of them: mlx-lm's own layout again


def test_streaming_reads_no_expert_until_needed_and_holds_only_its_slots(tmp_path: Path) -> None:
    path = quantize_checkpoint(build_model("qwen3_moe", tmp_path / "moe"))
    full, _ = load(str(path))
    full_bytes = sum(v.nbytes for _, v in tree_flatten(full.parameters()))
    model, tokenizer, streamer = streamed(path, 2)
    with streamer:
        held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        assert held == full_bytes - streamer.all_bytes + 2 * streamer.unit_bytes
        assert streamer.counters.bytes_read == 0 and streamer.store.bytes_read == 0
        greedy(model, tokenizer)
        assert streamer.store.bytes_read == streamer.counters.bytes_read > 0


@pytest.mark.parametrize("quantized", [False, True])
def test_a_live_shrink_and_grow_mid_generation_keeps_the_output(tmp_path: Path, quantized: bool) -> None:
    path = build_model("qwen3_moe", tmp_path / "moe")
    if quantized:
        quantize_checkpoint(path)
    model, tokenizer = load(str(path))
    prompt = mx.array(tokenizer.encode(PROMPT))
    want = [int(t) for t, _ in generate_step(prompt, model, max_tokens=TOKENS)]
    model, tokenizer, streamer = streamed(path, 8)  # starts with every expert resident
    assert streamer.pools[0].full
    # Each budget takes effect while tokens are being generated: full -> 3 -> 1 -> 5 -> full.
    budgets = {4: 3, 8: 1, 12: 5, 16: 8}
    got = []
    with streamer:
        for i, (token, _) in enumerate(generate_step(prompt, model, max_tokens=TOKENS)):
            got.append(int(token))
            if i in budgets:
                streamer.set_budget(budgets[i] * streamer.unit_bytes)
                assert streamer.capacity == budgets[i]
    assert got == want


def test_a_resize_does_not_wait_for_the_work_in_flight(tmp_path: Path) -> None:
    """The memory follower resizes from its own thread while the engine has long operations queued:
    MLX would hold any evaluation from that thread back until one of them finishes (seconds, for a
    CPU's LM head), so a resize must not evaluate anything."""
    path = quantize_checkpoint(build_model("qwen3_moe", tmp_path / "moe"))
    model, tokenizer = load(str(path))
    want = greedy(model, tokenizer)
    model, tokenizer, streamer = streamed(path, 6)
    with streamer:
        greedy(model, tokenizer)
        a = mx.random.normal((768, 768)) / 30
        mx.eval(a)
        busy = [a @ a for _ in range(20)]  # more operations in flight than MLX lets run unthrottled
        took: list[float] = []

        def resize() -> None:
            for experts in (2, 5, 8, 3):
                started = time.perf_counter()
                streamer.set_budget(experts * streamer.unit_bytes)
                took.append(time.perf_counter() - started)

        started = time.perf_counter()
        mx.async_eval(busy)
        thread = threading.Thread(target=resize)
        thread.start()
        thread.join(60)
        mx.eval(busy)
        busy_s = time.perf_counter() - started
        assert len(took) == 4 and max(took) < 0.2 * busy_s, (took, busy_s)
        assert streamer.capacity == 3
        assert greedy(model, tokenizer) == want


def test_checkpoints_not_saved_by_mlx_lm_are_refused(tmp_path: Path) -> None:
    path = build_model("qwen3_moe", tmp_path / "moe")
    model, _ = load(str(path), lazy=True)
    model.set_dtype(mx.float16)  # the model no longer holds what the file does
    with pytest.raises(ValueError, match="only checkpoints saved by mlx-lm"):
        ExpertStreamer(model, path, "moe")
    model, _ = load(str(path), lazy=True)
    dense, _ = load(str(build_model("qwen3", tmp_path / "dense")), lazy=True)
    with pytest.raises(ValueError, match="switch_mlp.*only checkpoints saved by mlx-lm"):
        ExpertStreamer(model, tmp_path / "dense", "moe")  # its files lack the stacked experts
    with pytest.raises(ValueError, match="no mlx-lm expert layers"):
        ExpertStreamer(dense, tmp_path / "dense", "dense")


def test_a_failed_read_leaves_the_pools_consistent(tmp_path: Path) -> None:
    path = quantize_checkpoint(build_model("qwen3_moe", tmp_path / "moe"))
    model, tokenizer = load(str(path))
    want = greedy(model, tokenizer)
    model, tokenizer, streamer = streamed(path, 2)
    with streamer:
        read, calls = streamer.store.read, [0]

        def failing_once(names: Any, experts: Any) -> Any:
            calls[0] += 1
            if calls[0] == 3:
                raise OSError("a read error")
            return read(names, experts)

        streamer.store.read = failing_once  # type: ignore[method-assign]
        with pytest.raises(OSError, match="a read error"):
            greedy(model, tokenizer)
        for pool in streamer.pools:  # every expert the policy holds has a slot
            assert all(pool.slot_of[e] >= 0 for e in pool.policy.resident)
            assert len(pool.free) + len(pool.policy.resident) == pool.capacity
        assert greedy(model, tokenizer) == want
