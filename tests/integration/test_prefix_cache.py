"""The prefix cache: later requests reuse earlier KV, report it, and still match mlx_lm.generate."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import openai
import pytest
from mlx_lm import generate, load

from helpers import Worker, run_worker
from mlx_flash.engine.disk_cache import model_key

SYSTEM = "You are a careful assistant. " * 12


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_second_turn_reuses_the_first_and_matches_mlx_lm(
    arch: str, workers: dict[str, Worker], model_path: dict[str, Path]
) -> None:
    model, tokenizer = load(str(model_path[arch]))
    worker, name = workers[arch], str(model_path[arch])
    reused = "mlx_flash_prefix_cache_tokens_reused_total"
    reused_before = worker.metric(reused, 0.0, model=name, tier="ram")
    with openai.OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0) as c:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Hi from {arch}"}]
        first = c.chat.completions.create(model=name, messages=messages, max_tokens=24, temperature=0)  # type: ignore[arg-type]
        assert first.usage is not None and first.usage.prompt_tokens_details is not None
        # Earlier requests to this worker share at most the chat template's opening tokens.
        first_cached = first.usage.prompt_tokens_details.cached_tokens
        assert first_cached is not None and first_cached < 8
        messages += [
            {"role": "assistant", "content": first.choices[0].message.content or ""},
            {"role": "user", "content": "And then?"},
        ]
        second = c.chat.completions.create(model=name, messages=messages, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert second.choices[0].message.content == generate(model, tokenizer, ids, max_tokens=24)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and first.usage.prompt_tokens - 8 < cached < second.usage.prompt_tokens
    assert worker.metric(reused, 0.0, model=name, tier="ram") - reused_before == first_cached + cached


def test_identical_prompt_reuses_all_but_the_last_token(
    workers: dict[str, Worker], model_path: dict[str, Path]
) -> None:
    worker, name = workers["llama"], str(model_path["llama"])
    prompt = "An identical prompt, sent twice, " * 8
    with openai.OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0) as c:
        a = c.completions.create(model=name, prompt=prompt, max_tokens=16, temperature=0)
        b = c.completions.create(model=name, prompt=prompt, max_tokens=16, temperature=0)
    assert a.choices[0].text == b.choices[0].text
    assert b.usage is not None and b.usage.prompt_tokens_details is not None
    assert b.usage.prompt_tokens_details.cached_tokens == b.usage.prompt_tokens - 1


def test_a_zero_budget_turns_the_cache_off(tmp_path: Path, model_path: dict[str, Path]) -> None:
    name = str(model_path["llama"])
    with (
        run_worker(name, tmp_path / "worker.log", "--prefix-cache-bytes", "0") as worker,
        openai.OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0) as c,
    ):
        for _ in range(2):
            r = c.completions.create(model=name, prompt="Same prompt again", max_tokens=4, temperature=0)
            assert r.usage is not None and r.usage.prompt_tokens_details is not None
            assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_the_ram_tier_evicts_least_recently_used_entries_within_its_budget(
    tmp_path: Path, model_path: dict[str, Path]
) -> None:
    name, budget = str(model_path["llama"]), 100_000  # about two entries
    with (
        run_worker(name, tmp_path / "worker.log", "--prefix-cache-bytes", str(budget)) as worker,
        openai.OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0) as c,
    ):

        def cached(prompt: str) -> int:
            r = c.completions.create(model=name, prompt=prompt, max_tokens=4, temperature=0)
            assert r.usage is not None and r.usage.prompt_tokens_details is not None
            return r.usage.prompt_tokens_details.cached_tokens or 0

        prompts = [f"{i} distinct topic number {i} " * 6 for i in "ABCDE"]
        for p in prompts:
            cached(p)
        assert worker.metric("mlx_flash_prefix_cache_evictions_total", model=name, tier="ram") >= 2
        assert 0 < worker.metric("mlx_flash_prefix_cache_bytes", model=name, tier="ram") <= budget
        assert cached(prompts[-1]) > 0  # the newest entry is still there
        assert cached(prompts[0]) < 4  # the oldest was evicted


def _entries(root: Path) -> list[Path]:
    """Data files of complete entries: the index is written last, after the data is in place."""
    return sorted(index.with_suffix(".safetensors") for index in root.glob("v*/*/[!.]*.json"))


def _wait_for_entries(root: Path, count: int) -> list[Path]:
    deadline = time.monotonic() + 30
    while len(found := _entries(root)) < count:
        assert time.monotonic() < deadline, f"{count} entries never reached {root}"
        time.sleep(0.05)
    return found


def test_ssd_tier_serves_the_first_request_after_a_restart(
    tmp_path: Path, model_path: dict[str, Path]
) -> None:
    name, root = str(model_path["qwen3"]), tmp_path / "kv"
    model, tokenizer = load(name)
    prompt = "A long shared document that the next request repeats. " * 6
    flags = ("--prefix-cache-dir", str(root))
    with (
        run_worker(name, tmp_path / "first.log", *flags) as worker,
        openai.OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0) as c,
    ):
        c.completions.create(model=name, prompt=prompt, max_tokens=4, temperature=0)
        _wait_for_entries(root, 1)
    follow_up = prompt + "And a question about it:"
    with (
        run_worker(name, tmp_path / "second.log", *flags) as worker,
        openai.OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0) as c,
    ):
        r = c.completions.create(model=name, prompt=follow_up, max_tokens=16, temperature=0)
        hits = worker.metric("mlx_flash_prefix_cache_hits_total", 0.0, model=name, tier="ssd")
    assert r.choices[0].text == generate(model, tokenizer, follow_up, max_tokens=16)
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    assert (r.usage.prompt_tokens_details.cached_tokens or 0) > 40
    assert hits == 1


def test_corrupt_partial_and_foreign_files_are_dropped_not_used(
    tmp_path: Path, model_path: dict[str, Path]
) -> None:
    name, root = str(model_path["qwen3"]), tmp_path / "kv"
    model, tokenizer = load(name)
    prompts = [f"Document number {i} that will be damaged on disk. " * 6 for i in range(3)]
    flags = ("--prefix-cache-dir", str(root))
    with (
        run_worker(name, tmp_path / "first.log", *flags) as worker,
        openai.OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0) as c,
    ):
        for p in prompts:
            c.completions.create(model=name, prompt=p, max_tokens=4, temperature=0)
        truncated, garbled, flipped = _wait_for_entries(root, 3)
    truncated.write_bytes(truncated.read_bytes()[:100])  # a write cut short
    garbled.write_bytes(b"\x00" * garbled.stat().st_size)  # right size, wrong bytes
    data = bytearray(flipped.read_bytes())  # a valid file whose KV bytes changed
    for i in range(len(data) - 400, len(data), 2):
        data[i] ^= 0x55
    flipped.write_bytes(bytes(data))
    (truncated.parent / ".half-written.tmp.safetensors").write_bytes(b"partial")
    old_version = root / "v0" / "model"
    old_version.mkdir(parents=True)
    (old_version / "entry.safetensors").write_bytes(b"old")
    # Not ours, though named like it: a directory given by mistake keeps them.
    for mine in (
        root / "vacation" / "photo.jpg",
        root / "v7" / "notes.txt",
        truncated.parent / "x.json" / "y",
    ):
        mine.parent.mkdir(parents=True)
        mine.write_text("keep")
    with (
        run_worker(name, tmp_path / "second.log", *flags) as worker,
        openai.OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0) as c,
    ):
        for p in prompts:
            follow_up = p + "Question:"
            r = c.completions.create(model=name, prompt=follow_up, max_tokens=12, temperature=0)
            assert r.choices[0].text == generate(model, tokenizer, follow_up, max_tokens=12)
        log = worker.log()
    assert not truncated.exists() and not garbled.exists() and not flipped.exists()
    assert (root / "vacation" / "photo.jpg").exists() and (root / "v7" / "notes.txt").exists()
    assert (truncated.parent / "x.json" / "y").exists()
    assert not (truncated.parent / ".half-written.tmp.safetensors").exists()
    assert not old_version.parent.exists()
    assert "dropping" in log and "Traceback" not in log


def test_weights_rewritten_in_place_make_another_model_key(
    tmp_path: Path, model_path: dict[str, Path]
) -> None:
    copy = tmp_path / "model"
    shutil.copytree(model_path["qwen3"], copy)
    config = json.loads((copy / "config.json").read_text())
    before = model_key(copy, config)
    assert model_key(copy, config) == before
    weights = next(copy.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same size, new bytes
    assert model_key(copy, config) != before
