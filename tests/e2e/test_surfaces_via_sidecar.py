"""Anthropic, Responses and Ollama clients through `mlx-flash serve` (the Rust sidecar and a real
worker), with an API key: the SDKs authenticate as they do against the real services."""

from __future__ import annotations

import re
from collections.abc import Iterator

import anthropic
import httpx
import ollama
import openai
import pytest

from helpers import Sidecar, run_sidecar
from mlx_flash.demo.data import TOOLS

KEY = "sekret"
ASK = [{"role": "user", "content": "What is 12+30?"}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    log = tmp_path_factory.mktemp("surfaces") / "sidecar.log"
    with run_sidecar(log, "--model", "demo", f"--api-key={KEY}", workers=1) as s:
        yield s


def direct(sidecar: Sidecar) -> httpx.Client:
    """A client talking straight to the worker's Unix socket, bypassing the sidecar."""
    (worker,) = sidecar.workers({"Authorization": f"Bearer {KEY}"})
    transport = httpx.HTTPTransport(uds=worker["url"].removeprefix("unix:"))
    return httpx.Client(transport=transport, base_url="http://w", timeout=60)


def test_anthropic_sdk_with_x_api_key(sidecar: Sidecar) -> None:
    # Claude Code's ANTHROPIC_BASE_URL has no /v1; the SDK sends the key as x-api-key.
    with anthropic.Anthropic(base_url=sidecar.url, api_key=KEY, max_retries=0) as client:
        _anthropic_text_paths(client)


def _anthropic_text_paths(client: anthropic.Anthropic) -> None:
    whole = client.messages.create(model="demo", max_tokens=8, messages=ASK, extra_body={"temperature": 0})
    with client.messages.stream(model="demo", max_tokens=8, messages=ASK, extra_body={"temperature": 0}) as s:
        text = "".join(s.text_stream)
    assert text == whole.content[0].text == "42"  # type: ignore[union-attr]
    assert client.messages.count_tokens(model="demo", messages=ASK).input_tokens > 10


def test_anthropic_sdk_with_a_wrong_key_gets_an_authentication_error(sidecar: Sidecar) -> None:
    with (
        anthropic.Anthropic(base_url=sidecar.url, api_key="wrong", max_retries=0) as client,
        pytest.raises(anthropic.AuthenticationError) as e,
    ):
        client.messages.create(model="demo", max_tokens=8, messages=ASK)
    assert isinstance(e.value.body, dict) and e.value.body["type"] == "error"


def test_openai_sdk_responses_through_the_sidecar(sidecar: Sidecar) -> None:
    with openai.OpenAI(base_url=f"{sidecar.url}/v1", api_key=KEY, max_retries=0) as client:
        _responses_paths(client)


def _responses_paths(client: openai.OpenAI) -> None:
    whole = client.responses.create(model="demo", input="What is 12+30?", temperature=0)
    with client.responses.stream(model="demo", input="What is 12+30?", temperature=0) as s:
        final = s.get_final_response()
    assert final.output_text == whole.output_text == "42"
    follow = client.responses.create(
        model="demo", input="What is 1+2?", previous_response_id=whole.id, temperature=0
    )
    assert follow.status == "completed"


def test_ollama_client_through_the_sidecar(sidecar: Sidecar) -> None:
    with ollama.Client(host=sidecar.url, headers={"Authorization": f"Bearer {KEY}"}) as client:
        assert [m.model for m in client.list().models] == ["demo"]
        parts = list(client.chat(model="demo", messages=ASK, options={"temperature": 0}, stream=True))
        assert "".join(p.message.content or "" for p in parts) == "42" and parts[-1].done
        assert (
            client.generate(model="demo", prompt="What is 12+30?", options={"temperature": 0}).response
            == "42"
        )
        assert client.show("demo").modelinfo
        with pytest.raises(ollama.ResponseError) as e:
            client.chat(model="nope", messages=ASK)
        assert e.value.status_code == 404


def normalized(body: bytes) -> bytes:
    """Values that differ between two requests: ids, times, durations, the prefix cache's share."""
    body = re.sub(rb'"(id|item_id|created_at)":"[^"]+"', rb'"\1":"X"', body)
    body = re.sub(rb'"(\w+_duration|created_at|created)":\d+', rb'"\1":0', body)
    return re.sub(rb'"(input_tokens|cache_read_input_tokens|cached_tokens)":\d+', rb'"\1":0', body)


ANTHROPIC_TOOLS = [
    {"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS
]
TOOL_CALL_BYTES = {
    "/v1/chat/completions": (b'"tool_calls":[{"index":0,"id":', b'"finish_reason":"tool_calls"'),
    "/v1/messages": (b'"type":"tool_use","id":"X","name":"get_weather"', b'"stop_reason":"tool_use"'),
    "/api/chat": (b'"name":"get_weather","arguments":{"city":"Paris"}', b'"done_reason":"stop"'),
}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/messages", {"max_tokens": 8, "stream": True, "messages": ASK}),
        ("/v1/responses", {"stream": True, "input": "What is 12+30?"}),
        ("/api/chat", {"messages": ASK}),
        ("/api/generate", {"prompt": "What is 12+30?"}),
        ("/v1/chat/completions", {"stream": True, "messages": WEATHER, "tools": TOOLS}),
        ("/v1/messages", {"max_tokens": 60, "stream": True, "messages": WEATHER, "tools": ANTHROPIC_TOOLS}),
        ("/api/chat", {"messages": WEATHER, "tools": TOOLS}),
    ],
)
def test_stream_bytes_pass_through_unchanged(sidecar: Sidecar, path: str, body: dict[str, object]) -> None:
    body = {"model": "demo", "temperature": 0, "options": {"temperature": 0}, **body}
    through = httpx.post(sidecar.url + path, json=body, headers={"x-api-key": KEY}, timeout=60)
    with direct(sidecar) as client:
        straight = client.post(path, json=body)
    assert through.status_code == straight.status_code == 200
    assert through.headers["content-type"] == straight.headers["content-type"]
    assert normalized(through.content) == normalized(straight.content)
    if "tools" not in body:
        assert through.content.count(b"\n") >= 3
        return
    # A streamed call, as each surface writes one (Ollama's whole, in one line), and why the reply ended.
    for marker in TOOL_CALL_BYTES[path]:
        assert marker in normalized(through.content), through.content


def test_ollama_root_through_the_sidecar(sidecar: Sidecar) -> None:
    r = httpx.get(sidecar.url + "/", headers={"x-api-key": KEY}, timeout=10)
    assert r.status_code == 200 and r.text == "Ollama is running"
