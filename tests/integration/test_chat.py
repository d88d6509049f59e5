"""OpenAI chat semantics through the official SDK, against a real worker and real models."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from helpers import Worker

MSG = [{"role": "user", "content": "Hello there, tell me a story"}]


def client(worker: Worker) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0)


def model_id(worker: Worker) -> str:
    return client(worker).models.list().data[0].id


@pytest.fixture(scope="module")
def qwen3(workers: dict[str, Worker]) -> Worker:
    return workers["qwen3"]


def test_non_stream_has_required_keys_and_usage(qwen3: Worker) -> None:
    r = client(qwen3).chat.completions.create(
        model=model_id(qwen3), messages=MSG, max_tokens=8, temperature=0
    )
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.refusal is None
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # The worker is shared: an earlier test's chat may have left the template's first tokens cached.
    details = r.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert 0 <= details.cached_tokens < r.usage.prompt_tokens


def test_max_tokens_reached_finishes_with_length(qwen3: Worker) -> None:
    c = client(qwen3)
    eos = 2  # <|im_end|> in the demo tokenizer the tiny models share
    r = c.chat.completions.create(
        model=model_id(qwen3),
        messages=MSG,
        max_completion_tokens=5,
        temperature=0,
        logit_bias={str(eos): -100},
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 5


def test_stream_equals_non_stream_and_reports_usage(qwen3: Worker) -> None:
    c, m = client(qwen3), model_id(qwen3)
    full = c.chat.completions.create(model=m, messages=MSG, max_tokens=24, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model=m,
            messages=MSG,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason


def test_stop_string_is_honoured_and_excluded(qwen3: Worker) -> None:
    c, m = client(qwen3), model_id(qwen3)
    eos_bias = {"2": -100}
    full = (
        c.chat.completions.create(model=m, messages=MSG, max_tokens=40, temperature=0, logit_bias=eos_bias)
        .choices[0]
        .message.content
    )
    assert full is not None and len(full) > 12
    stop = full[8:11]  # picked from the model's own greedy output, so it may span tokens
    expected = full[: full.index(stop)]
    for stream in (False, True):
        if stream:
            chunks = c.chat.completions.create(
                model=m,
                messages=MSG,
                max_tokens=40,
                temperature=0,
                logit_bias=eos_bias,
                stop=[stop],
                stream=True,
            )
            parts = [(ch.choices[0].delta.content or "", ch.choices[0].finish_reason) for ch in chunks]
            text, finish = "".join(p for p, _ in parts), parts[-1][1]
        else:
            r = c.chat.completions.create(
                model=m, messages=MSG, max_tokens=40, temperature=0, logit_bias=eos_bias, stop=stop
            )
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert (text, finish) == (expected, "stop")


def test_logprobs_concatenate_to_content(qwen3: Worker) -> None:
    r = client(qwen3).chat.completions.create(
        model=model_id(qwen3), messages=MSG, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content is not None
    assert "".join(t.token for t in lp.content) == r.choices[0].message.content
    assert r.usage is not None and len(lp.content) == r.usage.completion_tokens
    for t in lp.content:
        assert len(t.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob <= 0


def test_streamed_logprobs_travel_with_their_text(qwen3: Worker) -> None:
    chunks = client(qwen3).chat.completions.create(
        model=model_id(qwen3),
        messages=MSG,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        logit_bias={"2": -100},
    )
    n = 0
    for ch in chunks:
        delta, lp = ch.choices[0].delta, ch.choices[0].logprobs
        if delta.content:
            assert lp is not None and lp.content is not None
            assert "".join(t.token for t in lp.content) == delta.content
            n += len(lp.content)
    assert n == 12


def test_seed_makes_sampling_reproducible(qwen3: Worker) -> None:
    c, m = client(qwen3), model_id(qwen3)

    def sample(seed: int) -> str | None:
        return (
            c.chat.completions.create(
                model=m,
                messages=MSG,
                max_tokens=16,
                temperature=1.0,
                top_p=0.95,
                seed=seed,
                extra_body={"top_k": 50, "min_p": 0.01},
            )
            .choices[0]
            .message.content
        )

    assert sample(1) == sample(1)
    assert len({sample(s) for s in range(2, 6)}) > 1


def test_penalties_change_greedy_output(qwen3: Worker) -> None:
    c, m = client(qwen3), model_id(qwen3)
    base = dict(model=m, messages=MSG, max_tokens=32, temperature=0, logit_bias={"2": -100})
    plain = c.chat.completions.create(**base).choices[0].message.content  # type: ignore[call-overload]
    for extra in (
        {"frequency_penalty": 2.0},
        {"presence_penalty": 2.0},
        {"extra_body": {"repetition_penalty": 1.8}},
    ):
        out = c.chat.completions.create(**base, **extra).choices[0].message.content  # type: ignore[call-overload]
        assert out != plain, extra


def test_chat_template_kwargs_reach_the_template(qwen3: Worker) -> None:
    c, m = client(qwen3), model_id(qwen3)
    plain = c.chat.completions.create(model=m, messages=MSG, max_tokens=1)
    noted = c.chat.completions.create(
        model=m, messages=MSG, max_tokens=1, extra_body={"chat_template_kwargs": {"note": "a b c d e f"}}
    )
    assert plain.usage is not None and noted.usage is not None
    assert noted.usage.prompt_tokens > plain.usage.prompt_tokens


def test_content_parts_and_system_messages_are_accepted(demo_worker: Worker) -> None:
    r = client(demo_worker).chat.completions.create(
        model="demo",
        temperature=0,
        max_tokens=8,
        messages=[
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "What is 2+3?"}]},
        ],
    )
    assert r.choices[0].message.content == "5"


def test_models_are_listed_and_retrievable(demo_worker: Worker) -> None:
    c = client(demo_worker)
    (card,) = c.models.list().data
    assert (card.id, card.object, card.owned_by) == ("demo", "model", "mlx-flash") and card.created > 0
    assert c.models.retrieve("demo").id == "demo"
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("nope")
    assert e.value.code == "model_not_found"


def test_text_completion_logprobs_line_up_with_the_text(qwen3: Worker) -> None:
    r = client(qwen3).completions.create(
        model=model_id(qwen3), prompt="Hello there", max_tokens=10, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.text_offset is not None
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.top_logprobs is not None and all(len(top) == 2 for top in lp.top_logprobs)


def test_routes_answer_without_the_v1_prefix(demo_worker: Worker) -> None:
    c = openai.OpenAI(base_url=demo_worker.url, api_key="x", max_retries=0)
    assert c.models.list().data[0].id == "demo"
    r = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert r.choices[0].message.role == "assistant"


def test_concurrent_requests_each_get_their_own_answer(demo_worker: Worker) -> None:
    async def ask(c: openai.AsyncOpenAI, a: int, b: int, stream: bool) -> str | None:
        msgs: Any = [{"role": "user", "content": f"What is {a}+{b}?"}]
        if not stream:
            r = await c.chat.completions.create(model="demo", messages=msgs, temperature=0)
            return r.choices[0].message.content
        chunks = await c.chat.completions.create(model="demo", messages=msgs, temperature=0, stream=True)
        return "".join([ch.choices[0].delta.content or "" async for ch in chunks if ch.choices])

    async def ask_all() -> list[str | None]:
        async with openai.AsyncOpenAI(base_url=f"{demo_worker.url}/v1", api_key="x", max_retries=0) as c:
            return await asyncio.gather(*(ask(c, a, a + 7, a % 2 == 0) for a in range(10, 18)))

    assert asyncio.run(ask_all()) == [str(2 * a + 7) for a in range(10, 18)]
