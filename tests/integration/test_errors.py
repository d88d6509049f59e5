"""Bad input gets OpenAI's error shape and the right status; the worker keeps serving after each."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from helpers import Worker

OK_MESSAGES = [{"role": "user", "content": "What is 1+1?"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def post(worker: Worker, body: Any, path: str = "/v1/chat/completions", **kw: Any) -> httpx.Response:
    if isinstance(body, bytes | str):
        return httpx.post(
            worker.url + path, content=body, timeout=30, headers={"content-type": "application/json"}, **kw
        )
    return httpx.post(worker.url + path, json=body, timeout=30, **kw)


def assert_error(r: httpx.Response, status: int, param: str | None, code: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["code"] == code
    assert "Traceback" not in r.text
    assert err["message"]
    return str(err["message"])


@pytest.fixture(autouse=True)
def still_serving(demo_worker: Worker) -> Any:
    yield
    r = post(demo_worker, {"model": "demo", "messages": OK_MESSAGES, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, "the worker stopped serving after bad input"


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b'"text"', '{"model": "demo", \u00ff'])
def test_malformed_body_is_400(demo_worker: Worker, raw: bytes | str) -> None:
    assert_error(post(demo_worker, raw), 400, None)


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"model": None}, "model"),
        ({"model": 3}, "model"),
        ({"messages": None}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0]",
        ),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "ten"}, "max_tokens"),
        ({"max_completion_tokens": -5}, "max_completion_tokens"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"seed": 1.5}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 7}, "stop"),
        ({"logprobs": "true"}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"999999": 5}}, "logit_bias"),
        ({"logit_bias": {"5": 500}}, "logit_bias"),
        ({"logit_bias": {"\u00b2": 1}}, "logit_bias"),  # a digit to str.isdigit, not to int()
        ({"logit_bias": {"-5": 1}}, "logit_bias"),
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"description": "f"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": {"type": "function"}}, "tools"),
        ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tool_choice.function.name",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [TOOL], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": "json"}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": []}}},
            "response_format.json_schema.schema",
        ),
        ({"chat_template_kwargs": "x"}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"chat_template": "{{ 1/0 }}"}}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"return_tensors": "np"}}, "chat_template_kwargs"),
    ],
)
def test_invalid_field_is_400_naming_param(demo_worker: Worker, patch: dict[str, Any], param: str) -> None:
    body = {"model": "demo", "messages": OK_MESSAGES, **patch}
    body = {k: v for k, v in body.items() if v is not None}
    msg = assert_error(post(demo_worker, body), 400, param)
    assert param.split(".")[-1].split("[")[0] in msg


def test_unenforceable_tool_parameters_are_400_without_the_internal_grammar(demo_worker: Worker) -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": "x"}}}
    body = {"model": "demo", "messages": OK_MESSAGES, "tools": [bad], "tool_choice": "required"}
    msg = assert_error(post(demo_worker, body), 400, "tools")
    assert "properties must be an object" in msg
    assert "x-guidance" not in msg and "\n" not in msg


def test_harmless_unknown_fields_are_ignored(demo_worker: Worker) -> None:
    body = {
        "model": "demo",
        "messages": OK_MESSAGES,
        "max_tokens": 2,
        "user": "u1",
        "metadata": {"a": "b"},
        "store": False,
        "service_tier": "auto",
        "prompt_cache_key": "k",
        "parallel_tool_calls": True,
        "stream_options": None,
        "response_format": {"type": "text"},
        "made_up": 1,
    }
    assert post(demo_worker, body).status_code == 200


def test_unknown_model_is_404_model_not_found(demo_worker: Worker) -> None:
    r = post(demo_worker, {"model": "gpt-9", "messages": OK_MESSAGES})
    assert "gpt-9" in assert_error(r, 404, "model", "model_not_found")
    c = openai.OpenAI(base_url=f"{demo_worker.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-9", prompt="hi")


def test_body_over_the_limit_is_413(demo_worker: Worker) -> None:
    big = (
        b'{"model": "demo", "messages": [{"role": "user", "content": "' + b"a" * (17 * 1024 * 1024) + b'"}]}'
    )
    assert_error(post(demo_worker, big), 413, None, "request_too_large")


def test_chunked_body_over_the_limit_is_413(demo_worker: Worker) -> None:
    def body() -> Any:
        yield b'{"model": "demo", "prompt": "'
        for _ in range(17):
            yield b"a" * (1024 * 1024)
        yield b'"}'

    r = httpx.post(demo_worker.url + "/v1/completions", content=body(), timeout=30)
    assert_error(r, 413, None, "request_too_large")


def test_prompt_longer_than_context_is_400_context_length_exceeded(demo_worker: Worker) -> None:
    long = " ".join(["apple"] * 1100)  # the demo context is 1024 tokens
    r = post(demo_worker, {"model": "demo", "messages": [{"role": "user", "content": long}]})
    assert "1024" in assert_error(r, 400, "messages", "context_length_exceeded")
    r = post(demo_worker, {"model": "demo", "messages": OK_MESSAGES, "max_tokens": 1020})
    assert_error(r, 400, "messages", "context_length_exceeded")
    r = post(demo_worker, {"model": "demo", "prompt": long}, path="/v1/completions")
    assert_error(r, 400, "prompt", "context_length_exceeded")


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 99999]}, "prompt"),
        ({"echo": True}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": 30}, "logprobs"),
    ],
)
def test_invalid_completions_fields_are_400(demo_worker: Worker, patch: dict[str, Any], param: str) -> None:
    assert_error(post(demo_worker, {"model": "demo", "prompt": "hi", **patch}, "/v1/completions"), 400, param)


def test_unknown_route_and_wrong_method_use_the_error_shape(demo_worker: Worker) -> None:
    assert_error(httpx.get(demo_worker.url + "/v1/nope", timeout=10), 404, None, "unknown_url")
    assert_error(
        httpx.get(demo_worker.url + "/v1/chat/completions", timeout=10), 405, None, "method_not_allowed"
    )


def test_sdk_raises_bad_request_without_retrying(demo_worker: Worker) -> None:
    c = openai.OpenAI(base_url=f"{demo_worker.url}/v1", api_key="x", max_retries=2)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="demo", messages=OK_MESSAGES, temperature=9)  # type: ignore[arg-type]
    assert e.value.param == "temperature"
