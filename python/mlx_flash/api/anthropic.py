"""Anthropic Messages: POST /v1/messages (whole or streamed) and /v1/messages/count_tokens
(wire facts: docs/API.md, Anthropic section). Claude Code speaks this with ANTHROPIC_BASE_URL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from mlx_flash.api.error_shapes import anthropic_body
from mlx_flash.api.errors import InvalidRequest, generation_failed
from mlx_flash.api.fields import Fields
from mlx_flash.api.openai import SSE_HEADERS, _with_model, budget
from mlx_flash.api.tools import ToolSpec, anthropic_tools, prepare
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

STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}
# The model's own thinking carries no signature (Anthropic signs theirs); the SDK needs the key.
THINKING_BLOCK = {"type": "thinking", "thinking": "", "signature": ""}


@dataclass(frozen=True)
class Prompt:
    messages: list[dict[str, Any]]  # OpenAI-shaped, for the chat template
    template_kwargs: dict[str, Any]
    tools: ToolSpec


def _text_blocks(value: Any, where: str) -> str:
    """A string, or an array of text blocks, as one string."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise InvalidRequest(f"{where} must be a string or an array of text blocks", param=where)
    texts = []
    for j, block in enumerate(value):
        if (
            not isinstance(block, dict)
            or block.get("type") != "text"
            or not isinstance(block.get("text"), str)
        ):
            kind = block.get("type") if isinstance(block, dict) else None
            raise InvalidRequest(f"{where}.{j}: expected a text block (got {kind!r})", param=f"{where}.{j}")
        texts.append(block["text"])
    return "\n".join(texts)


def _message(m: Any, i: int) -> list[dict[str, Any]]:
    """One Anthropic message as OpenAI-shaped messages (each tool_result is its own `tool` message)."""
    where = f"messages.{i}"
    if not isinstance(m, dict):
        raise InvalidRequest(f"{where} must be an object", param=where)
    role = m.get("role")
    if role not in ("user", "assistant"):
        raise InvalidRequest(f"{where}.role must be 'user' or 'assistant'", param=f"{where}.role")
    content = m.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or an array of blocks", f"{where}.content")
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(content):
        at = f"{where}.content.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # earlier reasoning is not part of the prompt, as the chat templates do
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input"), dict):
                raise InvalidRequest(f"{at}: tool_use needs a string name and an object input", at)
            function = {"name": block["name"], "arguments": block["input"]}
            calls.append({"id": str(block.get("id", "")), "type": "function", "function": function})
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise InvalidRequest(f"{at}.tool_use_id must be a string", f"{at}.tool_use_id")
            result = block.get("content", "")
            text = _text_blocks(result, f"{at}.content")
            out.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
        else:
            raise InvalidRequest(f"{at}: {kind!r} blocks are not supported in {role} messages", at)
    if texts or calls or not out:
        msg: dict[str, Any] = {"role": role, "content": "\n".join(texts)}
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    return out


def parse_prompt(body: dict[str, Any], f: Fields) -> Prompt:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty array", param="messages")
    out: list[dict[str, Any]] = []
    if body.get("system") is not None:
        system = _text_blocks(body["system"], "system")
        if system:
            out.append({"role": "system", "content": system})
    for i, m in enumerate(messages):
        out.extend(_message(m, i))
    if out[-1]["role"] == "assistant":
        raise InvalidRequest(
            "The last message must be a user message: prefilling the assistant's reply is not supported.",
            param=f"messages.{len(messages) - 1}",
        )
    tools = anthropic_tools(body)
    kwargs: dict[str, Any] = tools.template_kwargs()
    thinking = f.obj("thinking")
    if thinking is not None:
        kind = thinking.get("type")
        if kind not in ("enabled", "disabled", "adaptive"):
            raise InvalidRequest("thinking.type must be 'enabled' or 'disabled'", param="thinking.type")
        # Templates of reasoning models read enable_thinking; the others ignore it.
        kwargs["enable_thinking"] = kind != "disabled"
    return Prompt(out, kwargs, tools)


def _sampling(f: Fields) -> SamplingParams:
    temperature = f.number("temperature", 1.0, 0.0, 1.0)
    top_p = f.number("top_p", 1.0, 0.0, 1.0, lo_open=True)
    return SamplingParams(
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=f.integer("top_k", 0, lo=0) or 0,
    )


def _stops(body: dict[str, Any]) -> tuple[str, ...]:
    value = body.get("stop_sequences")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise InvalidRequest("stop_sequences must be an array of strings", param="stop_sequences")
    return tuple(s for s in value if s)


def _usage(fin: Finished) -> dict[str, Any]:
    # Anthropic counts prompt tokens read from the cache apart from input_tokens.
    return {
        "input_tokens": fin.prompt_tokens - fin.cached_tokens,
        "output_tokens": fin.completion_tokens,
        "cache_read_input_tokens": fin.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def _stop_reason(fin: Finished) -> str:
    if fin.reason == "stop" and fin.stop_sequence is not None:
        return "stop_sequence"
    return STOP_REASONS.get(fin.reason, "end_turn")


# ---------------------------------------------------------------- endpoints


async def messages(request: Request) -> Response:
    return await _with_model(request, _messages)


async def count_tokens(request: Request) -> Response:
    return await _with_model(request, _count_tokens)


async def _encode(lease: Lease, prompt: Prompt) -> list[int]:
    tokenizer = lease.engine.loaded.tokenizer
    return await run_in_threadpool(encode_chat, tokenizer, prompt.messages, prompt.template_kwargs)


async def _count_tokens(request: Request, body: dict[str, Any], f: Fields, lease: Lease) -> Response:
    try:
        tokens = await _encode(lease, parse_prompt(body, f))
    finally:
        lease.release()
    return JSONResponse({"input_tokens": len(tokens)})


async def _messages(request: Request, body: dict[str, Any], f: Fields, lease: Lease) -> Response:
    engine = lease.engine
    max_tokens = f.integer("max_tokens", None, lo=1)
    if max_tokens is None:
        raise InvalidRequest("max_tokens is required", param="max_tokens")
    stream = f.boolean("stream", False)
    sampling = _sampling(f)
    stops = _stops(body)
    parsed = parse_prompt(body, f)
    prompt = await _encode(lease, parsed)
    max_tokens = budget(engine, len(prompt), max_tokens, "messages")
    masker = await prepare(engine, parsed.tools, None)
    gen = GenerationRequest(
        prompt,
        max_tokens,
        sampling,
        stops,
        constraint=masker,
        tools=parsed.tools.request_tools(),
        reply=True,
    )
    handle = await lease.start(gen, "max_tokens")
    head = {
        "id": f"msg_{uuid.uuid4().hex}",
        "type": "message",
        "role": "assistant",
        "model": engine.loaded.id,
    }
    if stream:
        return StreamingResponse(
            _events(head, handle, len(prompt)), media_type="text/event-stream", headers=SSE_HEADERS
        )
    turn = await gather(handle, request)
    fin = turn.finished
    content: list[dict[str, Any]] = []
    for ev in turn.events:
        if isinstance(ev, TextDelta | ReasoningDelta) and ev.text:
            kind, key = ("text", "text") if isinstance(ev, TextDelta) else ("thinking", "thinking")
            if content and content[-1]["type"] == kind:
                content[-1][key] += ev.text
            else:
                block = {"type": kind, key: ev.text}
                content.append(block if kind == "text" else {**block, "signature": ""})
        elif isinstance(ev, ToolCall):
            content.append(_tool_use(ev))
    return JSONResponse(
        {
            **head,
            "content": content,
            "stop_reason": _stop_reason(fin),
            "stop_sequence": fin.stop_sequence,
            "usage": _usage(fin),
        }
    )


def _tool_use(call: ToolCall, whole: bool = True) -> dict[str, Any]:
    """A `tool_use` block (streamed, its input starts empty and arrives as `input_json_delta`)."""
    return {
        "type": "tool_use",
        "id": call.id,
        "name": call.name,
        "input": orjson.loads(call.arguments) if whole else {},
    }


def event(kind: str, payload: dict[str, Any]) -> bytes:
    """One SSE event; the SDK drops events without an `event:` line."""
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **payload}) + b"\n\n"


async def _events(head: dict[str, Any], handle: RequestHandle, prompt_len: int) -> AsyncIterator[bytes]:
    start = {
        **head,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": prompt_len, "output_tokens": 0, "cache_read_input_tokens": 0},
    }
    index, open_kind = -1, None  # the last content block, and the kind of the open one (text, thinking)
    try:
        yield event("message_start", {"message": start})
        yield event("ping", {})
        async for ev in handle.events():
            if isinstance(ev, TextDelta | ReasoningDelta):
                if not ev.text:
                    continue
                kind = "text" if isinstance(ev, TextDelta) else "thinking"
                if open_kind != kind:
                    if open_kind is not None:
                        yield event("content_block_stop", {"index": index})
                    index, open_kind = index + 1, kind
                    block = {"type": "text", "text": ""} if kind == "text" else THINKING_BLOCK
                    yield event("content_block_start", {"index": index, "content_block": block})
                delta = (
                    {"type": "text_delta", "text": ev.text}
                    if kind == "text"
                    else {"type": "thinking_delta", "thinking": ev.text}
                )
                yield event("content_block_delta", {"index": index, "delta": delta})
            elif isinstance(ev, ToolCall):
                if open_kind is not None:
                    yield event("content_block_stop", {"index": index})
                index, open_kind = index + 1, None
                yield event(
                    "content_block_start", {"index": index, "content_block": _tool_use(ev, whole=False)}
                )
                delta = {"type": "input_json_delta", "partial_json": ev.arguments}
                yield event("content_block_delta", {"index": index, "delta": delta})
                yield event("content_block_stop", {"index": index})
            elif isinstance(ev, Finished):
                if open_kind is not None:
                    yield event("content_block_stop", {"index": index})
                end = {"stop_reason": _stop_reason(ev), "stop_sequence": ev.stop_sequence}
                yield event("message_delta", {"delta": end, "usage": _usage(ev)})
                yield event("message_stop", {})
                return
            else:
                err = anthropic_body(generation_failed(ev, started=True))
                yield event("error", {"error": err["error"]})
                return
    finally:  # normal end, or the client went away and the server cancelled us
        handle.cancel()


def routes() -> list[BaseRoute]:
    return [
        Route(prefix + path, endpoint, methods=["POST"])
        for prefix in ("/v1", "")
        for path, endpoint in (("/messages", messages), ("/messages/count_tokens", count_tokens))
    ]
