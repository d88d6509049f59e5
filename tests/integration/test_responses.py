"""OpenAI Responses on a real worker with the demo model, through the official `openai` SDK."""

from __future__ import annotations

import httpx
import openai
import orjson
import pytest

from helpers import Worker


@pytest.fixture(scope="module")
def client(demo_worker: Worker) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{demo_worker.url}/v1", api_key="unused", max_retries=0)


def test_create_from_a_string(client: openai.OpenAI) -> None:
    r = client.responses.create(model="demo", input="What is 12+30?", temperature=0)
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.output_text == "42"
    assert [item.type for item in r.output] == ["message"]
    assert r.usage is not None and r.usage.output_tokens == 2
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_items_and_instructions_make_the_same_prompt_as_chat(client: openai.OpenAI) -> None:
    items = client.responses.create(
        model="demo",
        instructions="Answer briefly.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "What is 12+30?"}]}],
        temperature=0,
    )
    chat = client.chat.completions.create(
        model="demo",
        messages=[
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is 12+30?"},
        ],
        temperature=0,
    )
    assert items.output_text == chat.choices[0].message.content
    assert items.usage is not None and chat.usage is not None
    assert items.usage.input_tokens == chat.usage.prompt_tokens


def test_stream_events_build_the_same_text(client: openai.OpenAI) -> None:
    whole = client.responses.create(model="demo", input="Repeat after me: apple river stone", temperature=0)
    with client.responses.stream(
        model="demo", input="Repeat after me: apple river stone", temperature=0
    ) as s:
        kinds = [ev.type for ev in s]
        final = s.get_final_response()
    assert final.output_text == whole.output_text == "apple river stone"
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "response.output_text.delta" in kinds


def test_max_output_tokens_makes_it_incomplete(client: openai.OpenAI) -> None:
    r = client.responses.create(model="demo", input="Repeat after me: apple river stone", max_output_tokens=1)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(model="demo", input="What is 12+30?", temperature=0)
    follow = client.responses.create(
        model="demo", input="What is 1+2?", previous_response_id=first.id, temperature=0
    )
    # The same conversation sent whole to chat completions.
    chat = client.chat.completions.create(
        model="demo",
        messages=[
            {"role": "user", "content": "What is 12+30?"},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "What is 1+2?"},
        ],
        temperature=0,
    )
    assert follow.previous_response_id == first.id
    assert follow.output_text == chat.choices[0].message.content
    assert follow.usage is not None and chat.usage is not None
    assert follow.usage.input_tokens == chat.usage.prompt_tokens


def test_retrieve_and_delete_a_stored_response(client: openai.OpenAI) -> None:
    r = client.responses.create(model="demo", input="What is 12+30?", temperature=0)
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == "42"
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_unstored_or_unknown_previous_response_is_a_clear_404(client: openai.OpenAI) -> None:
    unstored = client.responses.create(model="demo", input="What is 12+30?", store=False, temperature=0)
    for rid in (unstored.id, "resp_missing"):
        with pytest.raises(openai.NotFoundError) as e:
            client.responses.create(model="demo", input="hi", previous_response_id=rid)
        assert rid in e.value.message and e.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_stream_bytes_carry_event_lines_and_sequence_numbers(demo_worker: Worker) -> None:
    body = {"model": "demo", "input": "What is 12+30?", "temperature": 0, "stream": True}
    r = httpx.post(f"{demo_worker.url}/v1/responses", json=body, timeout=60)
    assert r.headers["content-type"].startswith("text/event-stream")
    seq = []
    for raw in r.content.split(b"\n\n")[:-1]:
        head, data = raw.split(b"\n")
        payload = orjson.loads(data.removeprefix(b"data: "))
        assert head == b"event: " + payload["type"].encode()
        seq.append(payload["sequence_number"])
    assert seq == list(range(len(seq))) and len(seq) >= 9


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": []}, "input"),
        ({"input": [{"type": "message", "role": "robot", "content": "x"}]}, "input[0].role"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content[0]"),
        ({"input": "x", "temperature": 3}, "temperature"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_bad_fields_are_openai_400s(demo_worker: Worker, body: dict[str, object], param: str) -> None:
    r = httpx.post(f"{demo_worker.url}/v1/responses", json={"model": "demo", **body}, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_unknown_model_is_model_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="nope", input="hi")
    assert e.value.code == "model_not_found"
