"""The Ollama API on a real worker with the demo model, through the official `ollama` client."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator

import httpx
import ollama
import orjson
import pytest

from helpers import Worker

ASK = [{"role": "user", "content": "What is 12+30?"}]
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def client(demo_worker: Worker) -> Iterator[ollama.Client]:
    with ollama.Client(host=demo_worker.url) as c:
        yield c


def test_root_and_version(demo_worker: Worker) -> None:
    assert httpx.get(demo_worker.url + "/", timeout=10).text == "Ollama is running"
    assert httpx.get(demo_worker.url + "/api/version", timeout=10).json()["version"]


def test_list_shows_the_model_with_details(client: ollama.Client) -> None:
    models = client.list().models
    assert [m.model for m in models] == ["demo"]
    assert models[0].details is not None and models[0].details.family == "qwen3_moe"
    assert models[0].size and models[0].size > 1_000_000 and models[0].digest


def test_show_has_model_info_capabilities_and_parameters(client: ollama.Client, demo_worker: Worker) -> None:
    shown = client.show("demo")
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "qwen3_moe"
    assert shown.modelinfo["qwen3_moe.context_length"] > 0
    assert shown.capabilities == ["completion", "tools"]
    assert shown.parameters is not None and "temperature" in shown.parameters
    assert shown.template and "<|im_start|>" in shown.template
    by_name = httpx.post(f"{demo_worker.url}/api/show", json={"name": "demo"}, timeout=30)
    assert by_name.status_code == 200 and by_name.json()["model_info"] == shown.modelinfo


def test_chat_whole_and_streamed_agree(client: ollama.Client) -> None:
    whole = client.chat(model="demo", messages=ASK, options=GREEDY, stream=False)
    parts = list(client.chat(model="demo", messages=ASK, options=GREEDY, stream=True))
    assert whole.message.role == "assistant" and whole.message.content == "42"
    assert "".join(p.message.content or "" for p in parts) == "42"
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    last = parts[-1]
    assert last.done_reason == "stop" and last.eval_count == whole.eval_count == 2
    assert last.prompt_eval_count == whole.prompt_eval_count and whole.prompt_eval_count
    assert whole.total_duration and whole.eval_duration and whole.prompt_eval_duration is not None
    # Nanoseconds: a real generation takes more than a microsecond and less than a minute.
    assert 1_000 < whole.total_duration < 60 * 10**9
    assert whole.total_duration >= whole.eval_duration + whole.prompt_eval_duration


def test_generate_whole_and_streamed_agree(client: ollama.Client) -> None:
    whole = client.generate(model="demo", prompt="Repeat after me: apple river stone", options=GREEDY)
    parts = list(
        client.generate(
            model="demo", prompt="Repeat after me: apple river stone", options=GREEDY, stream=True
        )
    )
    assert whole.response == "".join(p.response or "" for p in parts) == "apple river stone"
    assert parts[-1].done and parts[-1].done_reason == "stop"


def test_options_map_onto_sampling_and_limits(client: ollama.Client) -> None:
    prompt = "Repeat after me: apple river stone"
    short = client.generate(model="demo", prompt=prompt, options={**GREEDY, "num_predict": 1})
    assert short.done_reason == "length" and short.eval_count == 1
    stopped = client.generate(model="demo", prompt=prompt, options={**GREEDY, "stop": ["river"]})
    assert stopped.response == "apple "
    system = client.generate(model="demo", prompt="What is 12+30?", system="Answer briefly.", options=GREEDY)
    bare = client.generate(model="demo", prompt="What is 12+30?", options=GREEDY)
    assert system.prompt_eval_count is not None and bare.prompt_eval_count is not None
    assert system.prompt_eval_count > bare.prompt_eval_count


def test_stream_is_the_default_and_is_ndjson(demo_worker: Worker) -> None:
    body = {"model": "demo", "messages": ASK, "options": GREEDY}
    r = httpx.post(f"{demo_worker.url}/api/chat", json=body, timeout=60)
    assert r.headers["content-type"] == "application/x-ndjson"
    assert r.content.endswith(b"\n")
    lines = [orjson.loads(line) for line in r.content.splitlines()]
    assert len(lines) >= 2 and lines[-1]["done"] is True
    assert all(line["done"] is False for line in lines[:-1])
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(lines[-1][key], int)
    datetime.datetime.fromisoformat(lines[0]["created_at"])


def test_keep_alive_zero_unloads_and_an_empty_prompt_loads(client: ollama.Client) -> None:
    loaded = client.generate(model="demo", prompt="")
    assert loaded.done and loaded.done_reason == "load"
    assert [m.model for m in client.ps().models] == ["demo"]
    unloaded = client.generate(model="demo", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert client.ps().models == []
    again = client.chat(model="demo", messages=[], keep_alive="10m")
    assert again.done_reason == "load"
    (running,) = client.ps().models
    assert running.expires_at is not None
    left = running.expires_at.timestamp() - time.time()
    assert 9 * 60 < left <= 10 * 60 and running.size_vram and running.context_length


def test_keep_alive_expiry_unloads_after_the_request(client: ollama.Client) -> None:
    client.chat(model="demo", messages=ASK, options=GREEDY, keep_alive="1s", stream=False)
    deadline = time.monotonic() + 15
    while client.ps().models and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.ps().models == []
    assert client.chat(model="demo", messages=ASK, options=GREEDY).message.content == "42"  # loads again


def test_unknown_model_is_a_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="nope", messages=ASK)
    assert e.value.status_code == 404 and "nope" in e.value.error


def test_think_on_a_model_that_does_not_reason_is_a_400(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="demo", messages=ASK, think=True)
    assert e.value.status_code == 400 and "does not support thinking" in e.value.error
    assert client.chat(model="demo", messages=ASK, think=False, options=GREEDY).message.content == "42"


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/api/chat", {"messages": [{"role": "robot", "content": "x"}]}, "role"),
        ("/api/chat", {"messages": "hi"}, "messages must be an array"),
        ("/api/chat", {"messages": ASK, "options": {"temperature": "hot"}}, "options.temperature"),
        ("/api/chat", {"messages": ASK, "options": {"num_predict": 0}}, "num_predict"),
        ("/api/generate", {"prompt": "x", "keep_alive": "soon"}, "keep_alive"),
        ("/api/generate", {"prompt": "x", "keep_alive": "99999999h"}, "keep_alive"),
        ("/api/generate", {"prompt": "x", "keep_alive": "nan"}, "keep_alive"),
        ("/api/generate", {"prompt": "x", "keep_alive": 1e300}, "keep_alive"),
        ("/api/generate", {"prompt": "x", "images": ["aGk="]}, "images"),
        ("/api/show", {}, "model is required"),
    ],
)
def test_bad_fields_are_400s_with_an_error_string(
    demo_worker: Worker, path: str, body: dict[str, object], needle: str
) -> None:
    r = httpx.post(demo_worker.url + path, json={"model": "demo", **body} if path != "/api/show" else body)
    assert r.status_code == 400
    assert set(r.json()) == {"error"} and needle in r.json()["error"]


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "pull"), ("POST", "push"), ("POST", "create"), ("DELETE", "delete")]
)
def test_model_management_is_a_clear_501(demo_worker: Worker, method: str, path: str) -> None:
    r = httpx.request(method, f"{demo_worker.url}/api/{path}", json={"model": "demo"}, timeout=10)
    assert r.status_code == 501 and "not supported" in r.json()["error"]


def test_unknown_api_route_is_an_ollama_404(demo_worker: Worker) -> None:
    r = httpx.post(f"{demo_worker.url}/api/embed", json={"model": "demo", "input": "x"}, timeout=10)
    assert r.status_code == 404 and set(r.json()) == {"error"}
