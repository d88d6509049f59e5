"""Ollama generation: POST /api/generate and /api/chat (wire facts: docs/API.md, Ollama section).

NDJSON streamed unless `stream: false`, durations in nanoseconds, `options` mapped onto the one
`GenerationRequest`, `keep_alive` through the scheduler (an empty prompt loads, `keep_alive: 0` unloads).
The model endpoints (tags, show, ps, ...) are in `ollama_models`."""

from __future__ import annotations

import datetime
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from mlx_flash.api import ollama_models
from mlx_flash.api.body import read_json_object
from mlx_flash.api.error_shapes import ollama_body
from mlx_flash.api.errors import InvalidRequest, generation_failed
from mlx_flash.api.fields import Fields
from mlx_flash.api.ollama_models import DEFAULT_OPTIONS, keep_alive, parse_keep_alive
from mlx_flash.api.openai import budget
from mlx_flash.api.structured import constraint, ollama_format
from mlx_flash.api.tools import NO_TOOLS, ToolSpec, ollama_tools, prepare
from mlx_flash.api.turn import Clock, gather
from mlx_flash.engine.engine import Engine, RequestHandle
from mlx_flash.engine.prompt import encode_chat, encode_text
from mlx_flash.engine.request import (
    Failed,
    Finished,
    GenerationRequest,
    ReasoningDelta,
    SamplingParams,
    TextDelta,
    ToolCall,
)
from mlx_flash.models.scheduler import Lease
from mlx_flash.worker_state import WorkerState

NDJSON = "application/x-ndjson"
ROLES = {"system", "user", "assistant", "tool"}
DEFAULT_TEMPERATURE = DEFAULT_OPTIONS["temperature"]
DEFAULT_TOP_P = DEFAULT_OPTIONS["top_p"]
DEFAULT_TOP_K = int(DEFAULT_OPTIONS["top_k"])


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def line(payload: dict[str, Any]) -> bytes:
    return orjson.dumps(payload) + b"\n"


# ---------------------------------------------------------------- request parsing


@dataclass(frozen=True)
class Options:
    sampling: SamplingParams
    max_tokens: int | None
    stop: tuple[str, ...]


def parse_options(body: dict[str, Any]) -> Options:
    """`options` (Ollama's runtime parameters); the ones that tune llama.cpp (num_ctx, num_gpu, ...)
    are ignored, as Ollama ignores options a runner does not know."""
    o = Fields(Fields(body).obj("options") or {}, "options.")
    temperature = o.number("temperature", DEFAULT_TEMPERATURE, 0.0, None)
    top_p = o.number("top_p", DEFAULT_TOP_P, 0.0, 1.0, lo_open=True)
    sampling = SamplingParams(
        temperature=DEFAULT_TEMPERATURE if temperature is None else temperature,
        top_p=DEFAULT_TOP_P if top_p is None else top_p,
        top_k=o.integer("top_k", DEFAULT_TOP_K, lo=0) or 0,
        min_p=o.number("min_p", 0.0, 0.0, 1.0) or 0.0,
        seed=o.integer("seed", None),
        repetition_penalty=o.number("repeat_penalty", None, 0.0, None, lo_open=True),
        presence_penalty=o.number("presence_penalty", None, -2.0, 2.0),
        frequency_penalty=o.number("frequency_penalty", None, -2.0, 2.0),
    )
    num_predict = o.integer("num_predict", None)
    if num_predict is not None and (num_predict == 0 or num_predict < -2):
        raise InvalidRequest("options.num_predict must be -1 (no limit), -2 (fill the context) or at least 1")
    stop = o.body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise InvalidRequest("options.stop must be an array of strings")
    max_tokens = num_predict if num_predict is not None and num_predict > 0 else None
    return Options(sampling, max_tokens, tuple(s for s in stop or () if s))


def _think(body: dict[str, Any], engine: Engine) -> dict[str, Any]:
    """Chat template kwargs for `think` (a boolean, or a level some models take)."""
    think = body.get("think")
    if think is None:
        return {}
    if not isinstance(think, bool | str):
        raise InvalidRequest('think must be a boolean or one of "low", "medium", "high"')
    if not engine.loaded.tokenizer.has_thinking:
        if think:
            raise InvalidRequest(f'"{engine.loaded.id}" does not support thinking')
        return {}
    return {"enable_thinking": bool(think)}


def _reject_unsupported(body: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        if body.get(key):
            raise InvalidRequest(f"{key} is not supported by this server")


def _chat_messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise InvalidRequest("messages must be an array")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"{where} must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"{where}.role must be one of {sorted(ROLES)}")
        if m.get("images"):
            raise InvalidRequest(f"{where}.images: this model does not take images")
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise InvalidRequest(f"{where}.content must be a string")
        msg: dict[str, Any] = {"role": role, "content": content}
        calls = m.get("tool_calls")
        if calls:
            msg["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        if role == "tool" and isinstance(m.get("tool_name"), str):
            msg["name"] = m["tool_name"]
        out.append(msg)
    return out


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """An Ollama tool call (arguments an object) as the OpenAI-shaped one chat templates read."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequest(f"{where}.function.name must be a string")
    arguments = function.get("arguments") or {}
    if not isinstance(arguments, dict):
        raise InvalidRequest(f"{where}.function.arguments must be an object")
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}


# ---------------------------------------------------------------- responses


class Reply:
    """The lines of one answer: `/api/generate` puts text in `response`, `/api/chat` in `message`."""

    def __init__(self, chat: bool, model: str, arrived: float) -> None:
        self.chat = chat
        self.model = model
        self.arrived = arrived

    def chunk(
        self, text: str, done: bool = False, calls: Sequence[ToolCall] = (), thinking: str = ""
    ) -> dict[str, Any]:
        head = {"model": self.model, "created_at": now()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if calls:  # arguments as an object, each call whole in one line
                message["tool_calls"] = [
                    {"function": {"index": c.index, "name": c.name, "arguments": orjson.loads(c.arguments)}}
                    for c in calls
                ]
            return {**head, "message": message, "done": done}
        return {**head, "response": text, **({"thinking": thinking} if thinking else {}), "done": done}

    def final(
        self, text: str, fin: Finished, clock: Clock, calls: Sequence[ToolCall] = (), thinking: str = ""
    ) -> dict[str, Any]:
        end = clock.end or time.perf_counter()
        first = clock.first or end

        def ns(seconds: float) -> int:
            return max(0, int(seconds * 1e9))

        return {
            **self.chunk(text, done=True, calls=calls, thinking=thinking),
            "done_reason": "length" if fin.reason == "length" else "stop",
            "total_duration": ns(end - self.arrived),
            "load_duration": ns(clock.submitted - self.arrived),
            "prompt_eval_count": fin.prompt_tokens,
            "prompt_eval_duration": ns(first - clock.submitted),
            "eval_count": fin.completion_tokens,
            "eval_duration": ns(end - first),
        }

    def lifecycle(self, reason: str) -> JSONResponse:
        """The answer to a request that only loads or unloads the model."""
        return JSONResponse({**self.chunk("", done=True), "done_reason": reason})


async def _lines(reply: Reply, handle: RequestHandle) -> AsyncIterator[bytes]:
    clock = Clock(handle.submitted)
    try:
        async for ev in handle.events():
            clock.saw_event()
            if isinstance(ev, TextDelta):
                if ev.text:
                    yield line(reply.chunk(ev.text))
            elif isinstance(ev, ToolCall):
                yield line(reply.chunk("", calls=[ev]))
            elif isinstance(ev, ReasoningDelta):
                if ev.text:
                    yield line(reply.chunk("", thinking=ev.text))
            elif isinstance(ev, Finished):
                clock.ended()
                yield line(reply.final("", ev, clock))
                return
            elif isinstance(ev, Failed):
                yield line(ollama_body(generation_failed(ev, started=True)))
                return
    finally:  # normal end, or the client went away and the server cancelled us
        handle.cancel()


# ---------------------------------------------------------------- endpoints

Build = Callable[[dict[str, Any], Lease], Awaitable[tuple[list[int], ToolSpec]]]


async def _serve(
    request: Request, chat: bool, empty: Callable[[dict[str, Any]], bool], build: Build
) -> Response:
    """Lease the model, apply keep_alive, and answer with the generation `build` prompts (or only load
    or unload the model when the request holds no prompt)."""
    arrived = time.perf_counter()
    state: WorkerState = request.app.state.worker
    scheduler = state.scheduler
    body = await read_json_object(request, state.config.max_body_bytes)
    f = Fields(body)
    name = f.string("model", required=True) or ""
    seconds = parse_keep_alive(body.get("keep_alive"))
    stream = f.boolean("stream", True)
    if empty(body) and seconds == 0:
        entry = scheduler.lookup(name)
        if entry.engine is not None:
            await scheduler.unload(name)
        return Reply(chat, entry.id, arrived).lifecycle("unload")
    lease = await scheduler.lease(name)
    with lease.held():
        engine = lease.engine
        reply = Reply(chat, engine.loaded.id, arrived)
        if empty(body):
            lease.release()
            if seconds is not None:
                keep_alive(request).set(scheduler, lease.entry, seconds)
            return reply.lifecycle("load")
        options = parse_options(body)
        prompt, tools = await build(body, lease)
        max_tokens = budget(engine, len(prompt), options.max_tokens, "messages" if chat else "prompt")
        masker = await prepare(
            engine, tools, await constraint(engine, ollama_format(body.get("format")), "format")
        )
        gen = GenerationRequest(
            prompt,
            max_tokens,
            options.sampling,
            options.stop,
            constraint=masker,
            tools=tools.request_tools(),
            reply=not body.get("raw"),
        )
        handle = await lease.start(
            gen,
            "num_predict" if options.max_tokens is not None else None,
            "messages" if chat else "prompt",
        )
    if seconds is not None:
        keep_alive(request).set(scheduler, lease.entry, seconds)
    if stream:
        return StreamingResponse(_lines(reply, handle), media_type=NDJSON)
    turn = await gather(handle, request)
    thinking = "".join(e.text for e in turn.events if isinstance(e, ReasoningDelta))
    return JSONResponse(reply.final(turn.text, turn.finished, turn.clock, turn.calls, thinking))


async def _generate_prompt(body: dict[str, Any], lease: Lease) -> tuple[list[int], ToolSpec]:
    f = Fields(body)
    _reject_unsupported(body, ("suffix", "images", "template", "context", "tools"))
    prompt = f.string("prompt") or ""
    tokenizer = lease.engine.loaded.tokenizer
    if f.boolean("raw", False):
        return await run_in_threadpool(encode_text, tokenizer, prompt), NO_TOOLS
    system = f.string("system")
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    kwargs = _think(body, lease.engine)
    return await run_in_threadpool(encode_chat, tokenizer, messages, kwargs), NO_TOOLS


async def _chat_prompt(body: dict[str, Any], lease: Lease) -> tuple[list[int], ToolSpec]:
    messages = _chat_messages(body.get("messages"))
    tools = ollama_tools(body)
    kwargs = {**_think(body, lease.engine), **tools.template_kwargs()}
    return await run_in_threadpool(encode_chat, lease.engine.loaded.tokenizer, messages, kwargs), tools


async def generate(request: Request) -> Response:
    return await _serve(request, False, lambda body: not body.get("prompt"), _generate_prompt)


async def chat(request: Request) -> Response:
    return await _serve(request, True, lambda body: not body.get("messages"), _chat_prompt)


def routes() -> list[BaseRoute]:
    return [
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]),
        *ollama_models.routes(),
    ]
