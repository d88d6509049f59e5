"""OpenAI Responses: POST /v1/responses (whole or streamed), GET and DELETE /v1/responses/{id}
(wire facts: docs/API.md, Responses section). Codex CLI speaks only this API. Errors are OpenAI's."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from mlx_flash.api.errors import ApiError, InvalidRequest, generation_failed
from mlx_flash.api.fields import Fields
from mlx_flash.api.openai import SSE_HEADERS, _with_model, budget, error_body, parse_arguments
from mlx_flash.api.response_store import ResponseStore
from mlx_flash.api.structured import constraint, openai_format
from mlx_flash.api.tools import openai_tools, prepare
from mlx_flash.api.turn import gather
from mlx_flash.engine.engine import RequestHandle
from mlx_flash.engine.prompt import encode_chat
from mlx_flash.engine.request import (
    Finished,
    GenerationRequest,
    ReasoningDelta,
    SamplingParams,
    TextDelta,
    ToolCall,
)
from mlx_flash.models.scheduler import Lease

ROLES = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
TEXT_PARTS = {"input_text", "output_text", "text"}


class ResponseNotFound(ApiError):
    status = 404
    code = "not_found"


def store(request: Request) -> ResponseStore:
    app_state = request.app.state
    if not hasattr(app_state, "responses"):
        app_state.responses = ResponseStore()
    responses: ResponseStore = app_state.responses
    return responses


# ---------------------------------------------------------------- request parsing


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise InvalidRequest(f"{where} must be a string or an array of content parts", param=where)
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise InvalidRequest(
                f"{where}[{j}]: only text content parts are supported by this model (got {kind!r})",
                param=f"{where}[{j}]",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def parse_input(value: Any) -> list[dict[str, Any]]:
    """`input` (a string or an array of items) as OpenAI-shaped chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise InvalidRequest("input must be a string or a non-empty array of items", param="input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = ROLES.get(item.get("role"))  # type: ignore[arg-type]
            if role is None:
                raise InvalidRequest(f"{where}.role must be one of {sorted(ROLES)}", param=f"{where}.role")
            out.append({"role": role, "content": _content(item.get("content"), f"{where}.content")})
        elif kind == "reasoning":
            continue  # earlier reasoning is not part of the prompt, as the chat templates do
        elif kind == "function_call":
            for key in ("call_id", "name"):
                if not isinstance(item.get(key), str) or not item[key]:
                    raise InvalidRequest(f"{where}.{key} must be a string", param=f"{where}.{key}")
            arguments = parse_arguments(item.get("arguments"), f"{where}.arguments")
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": arguments},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise InvalidRequest(f"{where}.call_id must be a string", param=f"{where}.call_id")
            output = _content(item.get("output", ""), f"{where}.output")
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        else:
            raise InvalidRequest(f"{where}.type {kind!r} is not supported", param=f"{where}.type")
    return out


def _sampling(f: Fields) -> SamplingParams:
    temperature = f.number("temperature", 1.0, 0.0, 2.0)
    top_p = f.number("top_p", 1.0, 0.0, 1.0, lo_open=True)
    return SamplingParams(
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=f.integer("top_k", 0, lo=0) or 0,
    )


# ---------------------------------------------------------------- response objects


class Draft:
    """The response object of one request, as it is built up."""

    def __init__(self, body: dict[str, Any], f: Fields, model: str, previous: str | None) -> None:
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created_at = int(time.time())
        self.model = model
        text = f.obj("text") or {}
        self.params: dict[str, Any] = {
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "previous_response_id": previous,
            "temperature": body.get("temperature", 1.0),
            "top_p": body.get("top_p", 1.0),
            "tools": body.get("tools") or [],
            "tool_choice": body.get("tool_choice", "auto"),
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "text": {"format": {"type": "text"}, **text},
            "metadata": body.get("metadata") or {},
            "store": f.boolean("store", True),
            "truncation": "disabled",
        }

    def object(
        self,
        status: str,
        output: list[dict[str, Any]],
        fin: Finished | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        incomplete = {"reason": "max_output_tokens"} if fin is not None and fin.reason == "length" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": output,
            "error": error,
            "incomplete_details": incomplete,
            "usage": _usage(fin) if fin is not None else None,
            **self.params,
        }

    def finished(self, output: list[dict[str, Any]], fin: Finished) -> dict[str, Any]:
        return self.object("incomplete" if fin.reason == "length" else "completed", output, fin)


def _usage(fin: Finished) -> dict[str, Any]:
    return {
        "input_tokens": fin.prompt_tokens,
        "input_tokens_details": {"cached_tokens": fin.cached_tokens},
        "output_tokens": fin.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
    }


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _reasoning_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if text else []
    return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}


def _call_item(call: ToolCall, status: str = "completed") -> dict[str, Any]:
    arguments = call.arguments if status == "completed" else ""
    return {
        "type": "function_call",
        "id": f"fc_{call.id.removeprefix('call_')}",
        "call_id": call.id,
        "name": call.name,
        "arguments": arguments,
        "status": status,
    }


# ---------------------------------------------------------------- endpoints


async def create(request: Request) -> Response:
    return await _with_model(request, _create)


async def _create(request: Request, body: dict[str, Any], f: Fields, lease: Lease) -> Response:
    engine = lease.engine
    stream = f.boolean("stream", False)
    sampling = _sampling(f)
    max_tokens = f.integer("max_output_tokens", None, lo=1)
    tools = openai_tools(body, flat=True)
    previous = f.string("previous_response_id")
    history: list[dict[str, Any]] = []
    if previous is not None:
        stored = store(request).get(previous)
        if stored is None:
            raise ResponseNotFound(
                f"Previous response with id '{previous}' not found: it expired, was never stored "
                "(store: false), or was made by another worker.",
                param="previous_response_id",
            )
        history = stored.messages
    if body.get("input") is None:
        raise InvalidRequest("input is required", param="input")
    conversation = history + parse_input(body["input"])
    instructions = f.string("instructions")
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + conversation
    tokenizer = engine.loaded.tokenizer
    prompt = await run_in_threadpool(encode_chat, tokenizer, messages, tools.template_kwargs())
    limit = budget(engine, len(prompt), max_tokens, "input")
    text = f.obj("text") or {}
    schema = openai_format(text.get("format"), "text.format", nested=False)
    masker = await prepare(engine, tools, await constraint(engine, schema, "text.format"))
    gen = GenerationRequest(
        prompt, limit, sampling, constraint=masker, tools=tools.request_tools(), reply=True
    )
    handle = await lease.start(gen, "max_output_tokens" if max_tokens is not None else None, "input")
    draft = Draft(body, f, engine.loaded.id, previous)

    def keep(response: dict[str, Any], text: str, calls: list[ToolCall]) -> None:
        if draft.params["store"]:
            reply: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                reply["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": orjson.loads(c.arguments)},
                    }
                    for c in calls
                ]
            store(request).put(response, [*conversation, reply])

    if stream:
        return StreamingResponse(
            _events(draft, handle, keep), media_type="text/event-stream", headers=SSE_HEADERS
        )
    turn = await gather(handle, request)
    thought = "".join(e.text for e in turn.events if isinstance(e, ReasoningDelta))
    output = [_reasoning_item(f"rs_{uuid.uuid4().hex}", thought)] if thought else []
    output += (
        [_message_item(f"msg_{uuid.uuid4().hex}", turn.text)]
        if turn.text or not (turn.calls or thought)
        else []
    )
    output += [_call_item(c) for c in turn.calls]
    response = draft.finished(output, turn.finished)
    keep(response, turn.text, turn.calls)
    return JSONResponse(response)


async def _events(draft: Draft, handle: RequestHandle, keep: Any) -> AsyncIterator[bytes]:
    seq = 0

    def event(kind: str, payload: dict[str, Any]) -> bytes:
        nonlocal seq
        data = {"type": kind, "sequence_number": seq, **payload}
        seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"

    output: list[dict[str, Any]] = []  # finished items
    texts: list[str] = []
    calls: list[ToolCall] = []
    message: dict[str, Any] | None = None  # where the open message item's text goes
    reasoning: dict[str, Any] | None = None  # where the open reasoning item's text goes
    thought: list[str] = []

    def open_reasoning() -> list[bytes]:
        nonlocal reasoning
        item_id = f"rs_{uuid.uuid4().hex}"
        reasoning = {"item_id": item_id, "output_index": len(output), "content_index": 0}
        item = _reasoning_item(item_id, "", "in_progress")
        return [event("response.output_item.added", {"output_index": len(output), "item": item})]

    def close_reasoning() -> list[bytes]:
        nonlocal reasoning
        if reasoning is None:
            return []
        where, reasoning = reasoning, None
        text = "".join(thought)
        thought.clear()
        item = _reasoning_item(where["item_id"], text)
        output.append(item)
        return [
            event("response.reasoning_text.done", {**where, "text": text}),
            event("response.output_item.done", {"output_index": where["output_index"], "item": item}),
        ]

    def open_message() -> list[bytes]:
        nonlocal message
        item_id = f"msg_{uuid.uuid4().hex}"
        message = {"item_id": item_id, "output_index": len(output), "content_index": 0}
        item = {**_message_item(item_id, "", "in_progress"), "content": []}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            event("response.output_item.added", {"output_index": len(output), "item": item}),
            event("response.content_part.added", {**message, "part": part}),
        ]

    def close_message() -> list[bytes]:
        nonlocal message
        assert message is not None
        where, message = message, None
        text = "".join(texts)
        texts.clear()
        item = _message_item(where["item_id"], text)
        output.append(item)
        return [
            event("response.output_text.done", {**where, "text": text, "logprobs": []}),
            event("response.content_part.done", {**where, "part": item["content"][0]}),
            event("response.output_item.done", {"output_index": where["output_index"], "item": item}),
        ]

    def call_events(call: ToolCall) -> list[bytes]:
        index, item = len(output), _call_item(call)
        output.append(item)
        at = {"item_id": item["id"], "output_index": index}
        return [
            event(
                "response.output_item.added", {"output_index": index, "item": _call_item(call, "in_progress")}
            ),
            event("response.function_call_arguments.delta", {**at, "delta": call.arguments}),
            event("response.function_call_arguments.done", {**at, "arguments": call.arguments}),
            event("response.output_item.done", {"output_index": index, "item": item}),
        ]

    try:
        yield event("response.created", {"response": draft.object("in_progress", [])})
        yield event("response.in_progress", {"response": draft.object("in_progress", [])})
        async for ev in handle.events():
            if isinstance(ev, ReasoningDelta):
                if ev.text:
                    for chunk in open_reasoning() if reasoning is None else []:
                        yield chunk
                    thought.append(ev.text)
                    assert reasoning is not None
                    yield event("response.reasoning_text.delta", {**reasoning, "delta": ev.text})
                continue
            for chunk in close_reasoning():
                yield chunk
            if isinstance(ev, TextDelta):
                if ev.text:
                    for chunk in open_message() if message is None else []:
                        yield chunk
                    texts.append(ev.text)
                    assert message is not None
                    yield event("response.output_text.delta", {**message, "delta": ev.text, "logprobs": []})
            elif isinstance(ev, ToolCall):
                for chunk in [*(close_message() if message is not None else []), *call_events(ev)]:
                    yield chunk
                calls.append(ev)
            elif isinstance(ev, Finished):
                if message is None and not output:  # nothing was said: still one (empty) message
                    for chunk in open_message():
                        yield chunk
                for chunk in close_message() if message is not None else []:
                    yield chunk
                response = draft.finished(output, ev)
                said = "".join(i["content"][0]["text"] for i in output if i["type"] == "message")
                keep(response, said, calls)
                kind = "response.incomplete" if ev.reason == "length" else "response.completed"
                yield event(kind, {"response": response})
                return
            else:
                err = error_body(generation_failed(ev, started=True))["error"]
                failed = draft.object("failed", [], error={"code": "server_error", "message": err["message"]})
                yield event("response.failed", {"response": failed})
                return
    finally:  # normal end, or the client went away and the server cancelled us
        handle.cancel()


def _stored(request: Request) -> dict[str, Any]:
    response_id = request.path_params["id"]
    stored = store(request).get(response_id)
    if stored is None:
        raise ResponseNotFound(f"Response with id '{response_id}' not found.", param="response_id")
    return stored.response


async def retrieve(request: Request) -> Response:
    return JSONResponse(_stored(request))


async def delete(request: Request) -> Response:
    response = _stored(request)
    store(request).delete(response["id"])
    return JSONResponse({"id": response["id"], "object": "response", "deleted": True})


def routes() -> list[BaseRoute]:
    return [
        route
        for prefix in ("/v1", "")
        for route in (
            Route(f"{prefix}/responses", create, methods=["POST"]),
            Route(f"{prefix}/responses/{{id}}", retrieve, methods=["GET"]),
            Route(f"{prefix}/responses/{{id}}", delete, methods=["DELETE"]),
        )
    ]
