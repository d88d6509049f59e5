"""Anthropic Messages on a real worker with the demo model, through the official `anthropic` SDK."""

from __future__ import annotations

import anthropic
import httpx
import orjson
import pytest

from helpers import Worker

ASK = [{"role": "user", "content": "What is 12+30?"}]
# The SDK has no sampling arguments any more (Claude Code sends none); the API still takes them.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def client(demo_worker: Worker) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=demo_worker.url, api_key="unused", max_retries=0)


def test_create_answers_with_a_text_block(client: anthropic.Anthropic) -> None:
    r = client.messages.create(model="demo", max_tokens=8, extra_body=GREEDY, messages=ASK)
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_")
    assert [(b.type, getattr(b, "text", None)) for b in r.content] == [("text", "42")]
    assert r.stop_reason == "end_turn" and r.stop_sequence is None
    assert r.usage.output_tokens == 2
    assert r.usage.input_tokens + (r.usage.cache_read_input_tokens or 0) > 10


def test_stream_text_equals_the_whole_answer(client: anthropic.Anthropic) -> None:
    prompt = [{"role": "user", "content": "Repeat after me: apple river stone"}]
    whole = client.messages.create(model="demo", max_tokens=16, extra_body=GREEDY, messages=prompt)
    with client.messages.stream(model="demo", max_tokens=16, extra_body=GREEDY, messages=prompt) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "apple river stone" == whole.content[0].text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == whole.usage.output_tokens


def test_stop_sequence_is_cut_and_reported(client: anthropic.Anthropic) -> None:
    prompt = [{"role": "user", "content": "Repeat after me: apple river stone"}]
    r = client.messages.create(
        model="demo",
        max_tokens=16,
        extra_body=GREEDY,
        stop_sequences=["zebra", "river"],
        messages=prompt,
    )
    assert r.content[0].text == "apple "
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == "river"


def test_max_tokens_stop_reason(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="demo", max_tokens=1, extra_body=GREEDY, messages=ASK) as s:
        final = s.get_final_message()
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 1


def test_count_tokens_counts_the_system_prompt(client: anthropic.Anthropic) -> None:
    bare = client.messages.count_tokens(model="demo", messages=ASK)
    system = client.messages.count_tokens(model="demo", system="Answer briefly.", messages=ASK)
    r = client.messages.create(model="demo", max_tokens=8, extra_body=GREEDY, messages=ASK)
    assert bare.input_tokens == r.usage.input_tokens + (r.usage.cache_read_input_tokens or 0)
    assert system.input_tokens > bare.input_tokens


def test_system_prompt_blocks_reach_the_template(client: anthropic.Anthropic) -> None:
    text = client.messages.count_tokens(model="demo", system="Answer briefly.", messages=ASK)
    blocks = client.messages.count_tokens(
        model="demo",
        system=[{"type": "text", "text": "Answer briefly."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is 12+30?"}]}],
    )
    assert blocks.input_tokens == text.input_tokens


def test_stream_bytes_are_named_events_in_order(demo_worker: Worker) -> None:
    body = {"model": "demo", "max_tokens": 8, "temperature": 0, "stream": True, "messages": ASK}
    r = httpx.post(f"{demo_worker.url}/v1/messages", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = []
    for raw in r.content.split(b"\n\n")[:-1]:
        head, data = raw.split(b"\n")
        assert head.startswith(b"event: ") and data.startswith(b"data: ")
        payload = orjson.loads(data.removeprefix(b"data: "))
        assert payload["type"] == head.removeprefix(b"event: ").decode()
        events.append(payload)
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"]
    assert kinds[-4:] == ["content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    deltas = [e["delta"]["text"] for e in events if e["type"] == "content_block_delta"]
    assert "".join(deltas) == "42"
    assert events[-2]["delta"]["stop_reason"] == "end_turn" and events[-2]["usage"]["output_tokens"] == 2


def test_unknown_model_is_a_not_found_error(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="nope", max_tokens=8, messages=ASK)
    body = e.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "not_found_error" and "'nope'" in body["error"]["message"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"messages": ASK}, "max_tokens is required"),
        ({"max_tokens": 8, "messages": []}, "messages must be a non-empty array"),
        ({"max_tokens": 8, "messages": [{"role": "system", "content": "x"}]}, "role"),
        ({"max_tokens": 8, "messages": ASK, "temperature": 1.5}, "temperature"),
        ({"max_tokens": 8, "messages": ASK, "stop_sequences": "x"}, "stop_sequences"),
        ({"max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "image"}]}]}, "image"),
        ({"max_tokens": 8, "messages": [*ASK, {"role": "assistant", "content": "4"}]}, "prefilling"),
        ({"max_tokens": 8, "messages": ASK, "tool_choice": {"type": "any"}}, "tool_choice 'any' needs tools"),
    ],
)
def test_bad_fields_are_invalid_request_errors(
    demo_worker: Worker, body: dict[str, object], needle: str
) -> None:
    r = httpx.post(f"{demo_worker.url}/v1/messages", json={"model": "demo", **body}, timeout=30)
    assert r.status_code == 400
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert needle in err["error"]["message"]


def test_worker_errors_keep_the_anthropic_shape(demo_worker: Worker) -> None:
    bad_json = httpx.post(f"{demo_worker.url}/v1/messages", content=b"{", timeout=30)
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
    wrong_method = httpx.get(f"{demo_worker.url}/v1/messages", timeout=30)
    assert wrong_method.status_code == 405 and wrong_method.json()["type"] == "error"
