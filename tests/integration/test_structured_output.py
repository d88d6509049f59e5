"""Structured output on every surface, enforced by constrained decoding against the demo model:
what comes back parses and validates, whether or not the model would have produced it by itself."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any, Literal

import httpx
import jsonschema
import ollama
import openai
import pydantic
import pytest

from helpers import Worker

STORY = [{"role": "user", "content": "Tell me a story"}]
ARITH = [{"role": "user", "content": "What is 17+25? Answer in JSON."}]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "mood": {"enum": ["happy", "sad"]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "maxItems": 3},
    },
    "required": ["name", "age", "mood", "tags"],
    "additionalProperties": False,
}


class Answer(pydantic.BaseModel):
    answer: int


class Pet(pydantic.BaseModel):
    kind: Literal["cat", "dog"]
    name: str = pydantic.Field(max_length=10)
    legs: int = pydantic.Field(ge=0, le=8)


@pytest.fixture(scope="module")
def client(demo_worker: Worker) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{demo_worker.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    for messages, model in ((ARITH, Answer), (STORY, Answer), (STORY, Pet)):
        r = client.chat.completions.parse(
            model="demo", messages=messages, response_format=model, temperature=0, max_tokens=80
        )
        choice = r.choices[0]
        assert choice.finish_reason == "stop", choice
        assert isinstance(choice.message.parsed, model), choice.message
    # The demo model answers this one in JSON by itself: enforcement leaves its answer alone.
    r = client.chat.completions.parse(model="demo", messages=ARITH, response_format=Answer, temperature=0)
    assert r.choices[0].message.parsed == Answer(answer=42)


def test_json_schema_output_validates_sampled_or_greedy(client: openai.OpenAI) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in range(4):
        r = client.chat.completions.create(
            model="demo", messages=STORY, response_format=fmt, temperature=1.0, seed=seed, max_tokens=120
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), PERSON)


def test_json_object_mode_and_an_honest_length_finish(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="demo", messages=ARITH, response_format={"type": "json_object"}, temperature=0, max_tokens=60
    )
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    # Cut off mid-object by max_tokens: said so, never passed off as complete.
    r = client.chat.completions.create(
        model="demo", messages=STORY, response_format={"type": "json_object"}, temperature=0, max_tokens=5
    )
    assert r.choices[0].finish_reason == "length"
    assert (r.choices[0].message.content or "").startswith("{")


def test_streamed_json_concatenates_to_valid_json(demo_worker: Worker) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    body = {"model": "demo", "messages": STORY, "response_format": fmt, "stream": True, "temperature": 0}
    text, finish = "", None
    with httpx.stream("POST", f"{demo_worker.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_constrained_and_free_requests_batched_together(client: openai.OpenAI, demo_worker: Worker) -> None:
    """A constrained request in the batch leaves the others' greedy output unchanged."""
    free = {"model": "demo", "messages": STORY, "temperature": 0, "max_tokens": 40}
    solo = client.chat.completions.create(**free).choices[0].message.content  # type: ignore[call-overload]

    async def both() -> list[Any]:
        fmt: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
        async with openai.AsyncOpenAI(base_url=f"{demo_worker.url}/v1", api_key="-", max_retries=0) as c:
            constrained = [
                c.chat.completions.create(model="demo", messages=STORY, response_format=fmt, temperature=0)
                for _ in range(3)
            ]
            return await asyncio.gather(*constrained, c.chat.completions.create(**free))  # type: ignore[call-overload]

    *constrained, unconstrained = asyncio.run(both())
    assert unconstrained.choices[0].message.content == solo
    for r in constrained:
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_responses_text_format(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model="demo",
        input="Tell me a story",
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}},
        temperature=0,
    )
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), PERSON)
    parsed = client.responses.parse(model="demo", input="Tell me a story", text_format=Pet, temperature=0)
    assert isinstance(parsed.output_parsed, Pet)
    streamed = ""
    with client.responses.stream(
        model="demo", input="Tell me a story", text={"format": {"type": "json_object"}}, temperature=0
    ) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                streamed += event.delta
    assert isinstance(json.loads(streamed), dict)


def test_ollama_format_json_and_schema(demo_worker: Worker) -> None:
    with ollama.Client(host=demo_worker.url) as c:
        _ollama_formats(c)


def _ollama_formats(c: ollama.Client) -> None:
    r = c.chat(model="demo", messages=STORY, format="json", options={"temperature": 0, "num_predict": 120})
    assert isinstance(json.loads(r.message.content or ""), dict)
    r = c.chat(model="demo", messages=STORY, format=Pet.model_json_schema(), options={"temperature": 0})
    Pet.model_validate_json(r.message.content or "")
    text = "".join(
        part.response
        for part in c.generate(
            model="demo", prompt="Tell me a story", format=PERSON, stream=True, options={"temperature": 0}
        )
    )
    jsonschema.validate(json.loads(text), PERSON)


UNSUPPORTED = {"type": "array", "uniqueItems": True}


def test_an_unsupported_schema_is_a_400_on_every_surface(client: openai.OpenAI, demo_worker: Worker) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": UNSUPPORTED}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=STORY, response_format=fmt, stream=True)
    assert e.value.param == "response_format" and "uniqueItems" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(
            model="demo",
            input="hi",
            text={"format": {"type": "json_schema", "name": "x", "schema": UNSUPPORTED}},
        )
    assert e.value.param == "text.format" and "uniqueItems" in str(e.value)
    for path in ("/api/chat", "/api/generate"):
        body = {"model": "demo", "messages": STORY, "prompt": "hi", "format": UNSUPPORTED}
        r = httpx.post(f"{demo_worker.url}{path}", json=body, timeout=30)
        assert r.status_code == 400 and "uniqueItems" in r.json()["error"], r.text
    r = httpx.post(f"{demo_worker.url}/api/chat", json={"model": "demo", "messages": STORY, "format": "yaml"})
    assert r.status_code == 400 and "format" in r.json()["error"]
