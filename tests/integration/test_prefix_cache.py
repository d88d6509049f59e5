"""The prefix cache: later requests reuse earlier KV, report it, and still match mlx_lm.generate."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from mlx_lm import generate, load

from helpers import Worker, run_worker

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
