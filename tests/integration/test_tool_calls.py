"""Tool calls on every surface with the official clients, against the demo model (trained to call
`get_weather` and `add` in Qwen's `<tool_call>` format); raw stream bytes checked against API.md."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import jsonschema
import ollama
import openai
import pytest
from openai.types.chat import ChatCompletionMessage

from helpers import Worker
from mlx_flash.api.tools import anthropic_tools, openai_tools
from mlx_flash.demo.data import TOOLS
from mlx_flash.engine.reply import ReplyParser
from mlx_flash.engine.request import Tools
from mlx_flash.models.loader import resolve

WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
ADD = [{"role": "user", "content": "Use the add tool to add 12 and 30."}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ANTHROPIC_TOOLS = [
    {
        "name": t["function"]["name"],
        "description": t["function"]["description"],
        "input_schema": SCHEMAS[t["function"]["name"]],
    }
    for t in TOOLS
]
GREEDY = {"temperature": 0}  # the anthropic SDK has no argument for it
RESPONSES_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]


@pytest.fixture(scope="module")
def client(demo_worker: Worker) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{demo_worker.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def _valid(name: str, arguments: str | dict[str, Any]) -> dict[str, Any]:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, SCHEMAS[name])
    return args


def test_auto_call_and_round_trip(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="demo", messages=WEATHER, tools=TOOLS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and _valid("get_weather", call.function.arguments) == {
        "city": "Paris"
    }
    result = {
        "role": "tool",
        "tool_call_id": call.id,
        "content": json.dumps({"temperature": 21, "condition": "sunny"}),
    }
    messages: list[Any] = [*WEATHER, choice.message.model_dump(exclude_none=True), result]
    r = client.chat.completions.create(model="demo", messages=messages, tools=TOOLS, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    # The tool's result, in the sentence the demo model learned (which city it names is its own skill).
    assert (r.choices[0].message.content or "").startswith("It is 21 degrees and sunny in ")


def test_required_and_named_are_enforced(client: openai.OpenAI) -> None:
    story = [{"role": "user", "content": "Tell me a story"}]  # no reason to call anything
    for choice, name in (("required", None), ({"type": "function", "function": {"name": "add"}}, "add")):
        r = client.chat.completions.create(
            model="demo",
            messages=story,
            tools=TOOLS,
            tool_choice=choice,
            temperature=0,  # type: ignore[arg-type]
        )
        assert r.choices[0].finish_reason == "tool_calls"
        for call in r.choices[0].message.tool_calls or []:
            assert name is None or call.function.name == name
            _valid(call.function.name, call.function.arguments)
        assert r.choices[0].message.tool_calls
    none = client.chat.completions.create(
        model="demo", messages=WEATHER, tools=TOOLS, tool_choice="none", temperature=0
    )
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")


def test_sdk_stream_and_raw_fragments(client: openai.OpenAI, demo_worker: Worker) -> None:
    with client.chat.completions.stream(
        model="demo", messages=ADD, tools=TOOLS, tool_choice="required", temperature=0
    ) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    (call,) = final.choices[0].message.tool_calls or []
    assert call.function.name == "add" and _valid("add", call.function.arguments) == {"a": 12, "b": 30}
    assert final.choices[0].finish_reason == "tool_calls"

    body = {
        "model": "demo",
        "messages": ADD,
        "tools": TOOLS,
        "tool_choice": "required",
        "stream": True,
        "temperature": 0,
    }
    with httpx.stream("POST", f"{demo_worker.url}/v1/chat/completions", json=body, timeout=60) as r:
        raw = r.read().decode()
    chunks = [json.loads(e[6:]) for e in raw.split("\n\n") if e.startswith("data: {")]
    assert raw.endswith("data: [DONE]\n\n")
    fragments = [tc for c in chunks for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    first, *rest = fragments
    assert first == {
        "index": 0,
        "id": first["id"],
        "type": "function",
        "function": {"name": "add", "arguments": ""},
    }
    assert rest and all(set(f) == {"index", "function"} and set(f["function"]) == {"arguments"} for f in rest)
    assert json.loads("".join(f["function"]["arguments"] for f in rest)) == {"a": 12, "b": 30}
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "tool_calls",
    }
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_parallel_calls_from_mlx_lms_parser() -> None:
    """The demo model makes one call at a time; two in one reply go through the same detector."""
    from mlx_lm.utils import load

    _, tokenizer = load(str(resolve("demo")))[:2]
    detector = ReplyParser.for_request(tokenizer, TOOLS)
    assert detector is not None
    text = (
        'Sure.<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    )
    events = [e for i in range(0, len(text), 3) for e in detector.push(text[i : i + 3])] + detector.finish()
    texts = "".join(getattr(e, "text", "") for e in events)
    calls = [(e.index, e.name, json.loads(e.arguments)) for e in events if hasattr(e, "arguments")]
    assert texts == "Sure."
    assert calls == [(0, "add", {"a": 1, "b": 2}), (1, "get_weather", {"city": "Oslo"})]

    one = ReplyParser.for_request(tokenizer, TOOLS, parallel=False)
    assert one is not None
    events = [e for i in range(0, len(text), 3) for e in one.push(text[i : i + 3])] + one.finish()
    assert one.done and [e.name for e in events if hasattr(e, "arguments")] == ["add"]


# The demo model learned single calls only (after one, <|im_end|> has p > 0.999 on every prompt
# tried), so a logit bias keeps it going: it bans the end of the turn and favours opening a call.
KEEP_CALLING = {"2": -100, "826": 10}  # <|im_end|>, <tool_call> in the demo tokenizer


@pytest.mark.parametrize("stream", [False, True])
def test_no_parallel_calls_stops_after_the_first(client: openai.OpenAI, stream: bool) -> None:
    def reply(parallel: bool) -> tuple[Any, Any]:
        kwargs: dict[str, Any] = {
            "model": "demo",
            "messages": ADD,
            "tools": TOOLS,
            "parallel_tool_calls": parallel,
            "logit_bias": KEEP_CALLING,
            "max_tokens": 60,
            "temperature": 0,
        }
        if not stream:
            choice = client.chat.completions.create(**kwargs).choices[0]
            return choice.finish_reason, choice.message
        # By hand: the SDK's stream helper raises on a length finish.
        content, names, args, finish = "", [], [], None
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for fragment in delta.tool_calls or []:
                if fragment.id:
                    names.append(fragment.function.name)
                    args.append("")
                args[fragment.index] += fragment.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        calls = [
            {"function": {"name": n, "arguments": a}, "id": "", "type": "function"}
            for n, a in zip(names, args, strict=True)
        ]
        message = ChatCompletionMessage(role="assistant", content=content or None, tool_calls=calls or None)
        return finish, message

    finish, message = reply(parallel=True)
    # It makes its call, then opens more (they do not parse: the raw markup comes back as text).
    assert finish == "length" and "<tool_call>" in (message.content or ""), message
    assert [c.function.name for c in message.tool_calls or []][:1] == ["add"]
    finish, message = reply(parallel=False)
    assert finish == "tool_calls" and not message.content, message
    (call,) = message.tool_calls or []
    assert call.function.name == "add" and _valid("add", call.function.arguments) == {"a": 12, "b": 30}


def test_anthropic_tool_use_round_trip(demo_worker: Worker) -> None:
    c = anthropic.Anthropic(base_url=demo_worker.url, api_key="unused", max_retries=0)
    m = c.messages.create(
        model="demo", max_tokens=100, messages=WEATHER, tools=ANTHROPIC_TOOLS, extra_body=GREEDY
    )  # type: ignore[arg-type]
    assert m.stop_reason == "tool_use"
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    with c.messages.stream(
        model="demo",
        max_tokens=100,
        messages=ADD,
        tools=ANTHROPIC_TOOLS,
        tool_choice={"type": "tool", "name": "add"},  # type: ignore[arg-type]
    ) as s:
        streamed = s.get_final_message()
    (add,) = [b for b in streamed.content if b.type == "tool_use"]
    assert add.name == "add" and add.input == {"a": 12, "b": 30} and streamed.stop_reason == "tool_use"
    turns: list[Any] = [
        *WEATHER,
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": use.id,
                    "content": '{"temperature": 21, "condition": "sunny"}',
                }
            ],
        },
    ]
    final = c.messages.create(
        model="demo", max_tokens=100, messages=turns, tools=ANTHROPIC_TOOLS, extra_body=GREEDY
    )  # type: ignore[arg-type]
    assert final.stop_reason == "end_turn" and final.content[0].type == "text"
    assert final.content[0].text.startswith("It is 21 degrees and sunny in ")
    count = c.messages.count_tokens(model="demo", messages=WEATHER, tools=ANTHROPIC_TOOLS)  # type: ignore[arg-type]
    assert count.input_tokens > c.messages.count_tokens(model="demo", messages=WEATHER).input_tokens  # type: ignore[arg-type]


def test_anthropic_stream_bytes(demo_worker: Worker) -> None:
    body = {
        "model": "demo",
        "max_tokens": 100,
        "messages": ADD,
        "tools": ANTHROPIC_TOOLS,
        "tool_choice": {"type": "any"},
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", f"{demo_worker.url}/v1/messages", json=body, timeout=60) as r:
        raw = r.read().decode()
    events = [(e.split("\n")[0][7:], json.loads(e.split("\n")[1][6:])) for e in raw.strip().split("\n\n")]
    kinds = [k for k, _ in events]
    assert kinds[:2] == ["message_start", "ping"] and kinds[-2:] == ["message_delta", "message_stop"]
    start = next(d for k, d in events if k == "content_block_start")
    assert start["content_block"] == {
        "type": "tool_use",
        "id": start["content_block"]["id"],
        "name": "add",
        "input": {},
    }
    partial = "".join(d["delta"]["partial_json"] for k, d in events if k == "content_block_delta")
    assert json.loads(partial) == {"a": 12, "b": 30}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_responses_function_call_and_output(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model="demo", input="What is the weather in Paris?", tools=RESPONSES_TOOLS, temperature=0
    )  # type: ignore[arg-type]
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    follow = client.responses.create(
        model="demo",
        previous_response_id=r.id,
        input=[
            {
                "type": "function_call_output",
                "call_id": call.call_id,
                "output": '{"temperature": 21, "condition": "sunny"}',
            }
        ],
        tools=RESPONSES_TOOLS,  # type: ignore[arg-type]
        temperature=0,
    )
    assert follow.output_text.startswith("It is 21 degrees and sunny in ")
    kinds = []
    with client.responses.stream(
        model="demo",
        input="Use the add tool to add 12 and 30.",
        tools=RESPONSES_TOOLS,
        tool_choice="required",
    ) as s:  # type: ignore[arg-type]
        for event in s:
            kinds.append(event.type)
        final = s.get_final_response()
    (streamed,) = [o for o in final.output if o.type == "function_call"]
    assert streamed.name == "add" and json.loads(streamed.arguments) == {"a": 12, "b": 30}
    assert (
        "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    )
    assert kinds[-1] == "response.completed"


def test_ollama_tools_have_object_arguments(demo_worker: Worker) -> None:
    with ollama.Client(host=demo_worker.url) as c:
        r = c.chat(model="demo", messages=WEATHER, tools=TOOLS, stream=False, options={"temperature": 0})
        (call,) = r.message.tool_calls or []
        assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
        parts = list(c.chat(model="demo", messages=ADD, tools=TOOLS, stream=True, options={"temperature": 0}))
        (streamed,) = [tc for p in parts for tc in (p.message.tool_calls or [])]
        # The client writes a schema's keys in its own order ("required" first), which this small
        # model reads less well than the order it was trained on: the call is right, the numbers vary.
        assert streamed.function.name == "add"
        _valid("add", dict(streamed.function.arguments))
        assert parts[-1].done and parts[-1].done_reason == "stop"
    body = {"model": "demo", "messages": ADD, "tools": TOOLS, "options": {"temperature": 0}}
    lines = [
        json.loads(x)
        for x in httpx.post(f"{demo_worker.url}/api/chat", json=body, timeout=60).text.splitlines()
    ]
    (with_call,) = [x for x in lines if x["message"].get("tool_calls")]
    assert with_call["message"]["tool_calls"][0]["function"] == {
        "index": 0,
        "name": "add",
        "arguments": {"a": 12, "b": 30},
    }


@pytest.mark.parametrize(
    ("path", "body", "shape"),
    [
        (
            "/v1/chat/completions",
            {"messages": WEATHER, "tools": [{"type": "function", "function": {"name": 3}}]},
            "openai",
        ),
        ("/v1/responses", {"input": "hi", "tools": [{"type": "function"}]}, "openai"),
        ("/v1/messages", {"max_tokens": 5, "messages": WEATHER, "tools": [{"name": "f"}]}, "anthropic"),
        (
            "/v1/messages",
            {
                "max_tokens": 5,
                "messages": WEATHER,
                "tools": ANTHROPIC_TOOLS,
                "tool_choice": {"type": "tool", "name": "nope"},
            },
            "anthropic",
        ),
        (
            "/api/chat",
            {"messages": WEATHER, "tools": [{"type": "function", "function": {"name": "a b"}}]},
            "ollama",
        ),
        ("/api/generate", {"prompt": "hi", "tools": TOOLS}, "ollama"),
    ],
)
def test_bad_tools_are_400s_in_each_shape(
    demo_worker: Worker, path: str, body: dict[str, Any], shape: str
) -> None:
    r = httpx.post(f"{demo_worker.url}{path}", json={"model": "demo", **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()
    if shape == "openai":
        assert set(err["error"]) == {"message", "type", "param", "code"} and "tools" in err["error"]["param"]
    elif shape == "anthropic":
        assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    else:
        assert isinstance(err["error"], str) and "tools" in err["error"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": WEATHER}),
        ("/v1/responses", {"input": WEATHER}),
        ("/v1/messages", {"messages": WEATHER, "max_tokens": 32}),
        ("/api/chat", {"messages": WEATHER, "stream": False}),
    ],
)
def test_empty_tools_are_no_tools(demo_worker: Worker, path: str, body: dict[str, Any]) -> None:
    def reply(**tools: Any) -> Any:
        full = {"model": "demo", "temperature": 0, "options": {"temperature": 0}, **body, **tools}
        r = httpx.post(f"{demo_worker.url}{path}", json=full, timeout=60)
        assert r.status_code == 200, r.text
        return _scrubbed(r.json())

    without = reply()
    assert reply(tools=[]) == without
    # The same question with tools gets a call: the empty list really is no tools.
    tools = {"/v1/responses": RESPONSES_TOOLS, "/v1/messages": ANTHROPIC_TOOLS}.get(path, TOOLS)
    assert reply(tools=tools) != without


VARYING = {"id", "created", "created_at", "usage"} | {
    f"{d}_duration" for d in ("total", "load", "prompt_eval", "eval")
}


def _scrubbed(value: Any) -> Any:
    """A reply without what differs between two runs of one request (ids, times, durations)."""
    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in value.items() if k not in VARYING}
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    return value


@pytest.mark.parametrize(
    ("read", "body"),
    [
        (lambda b: openai_tools(b, flat=False), {"tools": TOOLS, "parallel_tool_calls": False}),
        (lambda b: openai_tools(b, flat=True), {"tools": RESPONSES_TOOLS, "parallel_tool_calls": False}),
        (
            anthropic_tools,
            {"tools": ANTHROPIC_TOOLS, "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}},
        ),
    ],
)
def test_each_surfaces_no_parallel_flag_reaches_the_engine(read: Any, body: dict[str, Any]) -> None:
    """The engine's one-call stop (tested above on chat) sees each surface's spelling of the flag."""
    assert read(body).request_tools() == Tools(tuple(TOOLS), parallel=False)
    assert read({**body, "parallel_tool_calls": True, "tool_choice": None}).request_tools().parallel
