"""OpenAI chat completions, completions and models (wire facts: docs/API.md, OpenAI section)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from mlx_flash import metrics
from mlx_flash.api.body import read_json_object
from mlx_flash.api.errors import (
    ApiError,
    ContextLengthExceeded,
    InternalError,
    InvalidRequest,
    generation_failed,
)
from mlx_flash.api.fields import Fields
from mlx_flash.api.structured import constraint, openai_format
from mlx_flash.api.tools import openai_tools, prepare
from mlx_flash.engine.engine import Engine, RequestHandle
from mlx_flash.engine.prompt import encode_chat, encode_text
from mlx_flash.engine.request import (
    Failed,
    Finished,
    GenerationRequest,
    ReasoningDelta,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    ToolCall,
)
from mlx_flash.models.scheduler import Entry, Lease, Scheduler
from mlx_flash.worker_state import WorkerState

ROLES = {"system", "developer", "user", "assistant", "tool"}
# apply_chat_template's own arguments: the server sets them, so chat_template_kwargs may not.
TEMPLATE_ARGUMENTS = {
    "conversation",
    "tools",
    "documents",
    "chat_template",
    "add_generation_prompt",
    "continue_final_message",
    "tokenize",
    "padding",
    "truncation",
    "max_length",
    "return_tensors",
    "return_dict",
    "return_assistant_tokens_mask",
    "tokenizer_kwargs",
}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def error_body(err: ApiError) -> dict[str, Any]:
    """The OpenAI error object; every error a client sees, before or after a response started, is
    rendered here, so here it is counted."""
    metrics.ERRORS.labels(reason=err.code or err.type).inc()
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=err.status, headers=err.headers())


# ---------------------------------------------------------------- request parsing


@dataclass(frozen=True)
class Common:
    """Fields shared by chat and text completions."""

    stream: bool
    include_usage: bool
    max_tokens: int | None
    sampling: SamplingParams
    stop: tuple[str, ...]


def parse_common(f: Fields, vocab_size: int) -> Common:
    n = f.integer("n", 1, lo=1)
    if n != 1:
        raise InvalidRequest("n > 1 is not supported; send separate requests instead", param="n")
    stream = f.boolean("stream", False)
    options = f.obj("stream_options")
    include_usage = Fields(options, "stream_options.").boolean("include_usage", False) if options else False
    max_tokens = f.integer("max_completion_tokens", None, lo=1)
    if max_tokens is None:
        max_tokens = f.integer("max_tokens", None, lo=1)
    sampling = SamplingParams(
        temperature=_num(f, "temperature", 1.0, 0.0, 2.0),
        top_p=_num(f, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=f.integer("top_k", 0, lo=0) or 0,
        min_p=_num(f, "min_p", 0.0, 0.0, 1.0),
        seed=f.integer("seed", None),
        repetition_penalty=f.number("repetition_penalty", None, 0.0, None, lo_open=True),
        presence_penalty=f.number("presence_penalty", None, -2.0, 2.0),
        frequency_penalty=f.number("frequency_penalty", None, -2.0, 2.0),
        logit_bias=_logit_bias(f, vocab_size),
    )
    return Common(stream, include_usage, max_tokens, sampling, _stop(f))


def _num(f: Fields, key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = f.number(key, default, lo, hi, lo_open=lo_open)
    return default if value is None else value


def _stop(f: Fields) -> tuple[str, ...]:
    value = f.body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise InvalidRequest("stop must be a string or a list of strings", param="stop")
    if len(value) > 4:
        raise InvalidRequest("stop may hold at most 4 strings", param="stop")
    return tuple(s for s in value if s)


def _logit_bias(f: Fields, vocab_size: int) -> dict[int, float]:
    value = f.obj("logit_bias")
    if not value:
        return {}
    bias: dict[int, float] = {}
    for key, amount in value.items():
        if not (key.isascii() and key.isdigit()) or not int(key) < vocab_size:
            raise InvalidRequest(f"logit_bias key {key!r} is not a token id of this model", "logit_bias")
        if isinstance(amount, bool) or not isinstance(amount, int | float) or not -100 <= amount <= 100:
            raise InvalidRequest("logit_bias values must be numbers in [-100, 100]", "logit_bias")
        bias[int(key)] = float(amount)
    return bias


def parse_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest("messages is required", param="messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"{where}.role must be one of {sorted(ROLES)}", param=f"{where}.role")
        msg = {k: v for k, v in m.items() if v is not None}
        msg["role"] = "system" if role == "developer" else role
        calls = m.get("tool_calls") if role == "assistant" else None
        msg["content"] = _content(m.get("content"), f"{where}.content", optional=role == "assistant")
        if calls is not None:
            msg["tool_calls"] = _message_calls(calls, f"{where}.tool_calls")
        out.append(msg)
    return out


def _message_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's earlier tool calls, their arguments parsed (chat templates render them
    as objects, as mlx-lm's server does)."""
    if not isinstance(calls, list):
        raise InvalidRequest(f"{where} must be an array", param=where)
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise InvalidRequest(f"{at}.function.name must be a string", param=f"{at}.function.name")
        out.append(
            {
                **call,
                "function": {
                    **fn,
                    "arguments": parse_arguments(fn.get("arguments"), f"{at}.function.arguments"),
                },
            }
        )
    return out


def parse_arguments(value: Any, where: str) -> dict[str, Any]:
    """A tool call's arguments as sent back by a client: the JSON text of an object (or the object)."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            raise InvalidRequest(f"{where} must be the JSON text of an object", param=where) from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where} must be the JSON text of an object", param=where)
    return value


def _content(value: Any, where: str, *, optional: bool) -> str:
    if value is None:
        if optional:
            return ""
        raise InvalidRequest(f"{where} is required", param=where)
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise InvalidRequest(f"{where} must be a string or an array of content parts", param=where)
    texts = []
    for j, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise InvalidRequest(
                f"{where}[{j}]: only text content parts are supported by this model (got {kind!r})",
                param=f"{where}[{j}]",
            )
        if not isinstance(part.get("text"), str):
            raise InvalidRequest(f"{where}[{j}].text must be a string", param=f"{where}[{j}].text")
        texts.append(part["text"])
    return "\n".join(texts)


def budget(engine: Engine, prompt_len: int, requested: int | None, param: str) -> int:
    """max_tokens for the request, refusing prompts that do not fit the context."""
    ctx = engine.loaded.context_length
    if prompt_len >= ctx or (requested is not None and prompt_len + requested > ctx):
        asked = f"{prompt_len + (requested or 0)} tokens ({prompt_len} in the prompt"
        asked += f", {requested} for the completion)" if requested else ")"
        raise ContextLengthExceeded(
            f"This model's maximum context length is {ctx} tokens. However, you requested {asked}. "
            "Please reduce the length of the prompt or the completion.",
            param=param,
        )
    return requested if requested is not None else ctx - prompt_len


# ---------------------------------------------------------------- responses


def _lp(item: TokenLogprob) -> dict[str, Any]:
    return {
        "token": item.token,
        "logprob": item.logprob,
        "bytes": item.bytes,
        "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes} for t in item.top],
    }


def usage(fin: Finished) -> dict[str, Any]:
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": fin.cached_tokens},
    }


def sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


@dataclass
class Collected:
    text: str
    reasoning: str
    logprobs: list[TokenLogprob]
    calls: list[ToolCall]
    finished: Finished


async def collect(handle: RequestHandle, request: Request) -> Collected:
    """The whole generation; a client that disconnects meanwhile cancels it."""

    async def watch_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        handle.cancel()

    watcher = asyncio.create_task(watch_disconnect())
    texts: list[str] = []
    items: list[TokenLogprob] = []
    calls: list[ToolCall] = []
    thought: list[str] = []
    try:
        async for ev in handle.events():
            if isinstance(ev, TextDelta):
                texts.append(ev.text)
                items.extend(ev.logprobs)
            elif isinstance(ev, ReasoningDelta):
                thought.append(ev.text)
            elif isinstance(ev, ToolCall):
                calls.append(ev)
            elif isinstance(ev, Failed):
                raise generation_failed(ev)
            else:
                return Collected("".join(texts), "".join(thought), items, calls, ev)
        raise InternalError()  # events() always ends with Finished or Failed
    finally:
        watcher.cancel()
        handle.cancel()


@dataclass(frozen=True)
class Envelope:
    """The fields every response object and stream chunk of one request carries."""

    id: str
    object: str  # of the whole response; chunks of chat responses say "chat.completion.chunk"
    model: str
    include_usage: bool
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = f"{self.object}.chunk" if chunk and self.object == "chat.completion" else self.object
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self, choice: dict[str, Any], fin: Finished) -> JSONResponse:
        return JSONResponse({**self._head(False), "choices": [choice], "usage": usage(fin)})

    def chunk(self, choice: dict[str, Any]) -> bytes:
        extra = {"usage": None} if self.include_usage else {}
        return sse({**self._head(True), "choices": [choice], **extra})

    def usage_chunk(self, fin: Finished) -> bytes:
        return sse({**self._head(True), "choices": [], "usage": usage(fin)})


def streaming(
    env: Envelope,
    handle: RequestHandle,
    first: dict[str, Any] | None,
    on_delta: Callable[[TextDelta], dict[str, Any]],
    on_finish: Callable[[Finished], dict[str, Any]],
    on_call: Callable[[ToolCall], list[dict[str, Any]]] | None = None,
    on_reasoning: Callable[[ReasoningDelta], dict[str, Any]] | None = None,
) -> StreamingResponse:
    """SSE of one generation: a chunk per delta (tool calls: the chunks `on_call` makes), the final
    chunk, usage if asked, then [DONE]."""

    async def events() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield env.chunk(first)
            async for ev in handle.events():
                if isinstance(ev, TextDelta):
                    yield env.chunk(on_delta(ev))
                elif isinstance(ev, ToolCall):
                    for choice in on_call(ev) if on_call else ():
                        yield env.chunk(choice)
                elif isinstance(ev, ReasoningDelta):
                    if on_reasoning is not None:
                        yield env.chunk(on_reasoning(ev))
                elif isinstance(ev, Finished):
                    yield env.chunk(on_finish(ev))
                    if env.include_usage:
                        yield env.usage_chunk(ev)
                else:
                    yield sse(error_body(generation_failed(ev, started=True)))
                    return
            yield b"data: [DONE]\n\n"
        finally:  # normal end, or the client went away and the server cancelled us
            handle.cancel()

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


# ---------------------------------------------------------------- endpoints


Handler = Callable[[Request, dict[str, Any], Fields, Lease], Awaitable[Response]]


async def _with_model(request: Request, handler: Handler) -> Response:
    """Read the body, hold the model it names (loaded now if need be), and run `handler`; the hold
    passes to the engine once the request starts, and is released here if it fails before."""
    state: WorkerState = request.app.state.worker
    body = await read_json_object(request, state.config.max_body_bytes)
    f = Fields(body)
    lease = await state.scheduler.lease(f.string("model", required=True) or "")
    with lease.held():
        return await handler(request, body, f, lease)


async def chat_completions(request: Request) -> Response:
    return await _with_model(request, _chat)


async def completions(request: Request) -> Response:
    return await _with_model(request, _completion)


async def _chat(request: Request, body: dict[str, Any], f: Fields, lease: Lease) -> Response:
    engine = lease.engine
    common = parse_common(f, engine.vocab_size)
    messages = parse_messages(body)
    tools = openai_tools(body, flat=False)
    extra = f.obj("chat_template_kwargs") or {}
    if reserved := sorted(TEMPLATE_ARGUMENTS & extra.keys()):
        raise InvalidRequest(
            f"chat_template_kwargs may only hold variables for the chat template (such as "
            f"enable_thinking), not {', '.join(reserved)}",
            param="chat_template_kwargs",
        )
    kwargs = {**extra, **tools.template_kwargs()}
    logprobs = f.boolean("logprobs", False)
    top = f.integer("top_logprobs", 0, lo=0, hi=20) or 0
    if top and not logprobs:
        raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
    tokenizer = engine.loaded.tokenizer
    prompt = await run_in_threadpool(encode_chat, tokenizer, messages, kwargs)
    max_tokens = budget(engine, len(prompt), common.max_tokens, "messages")
    schema = openai_format(body.get("response_format"), "response_format", nested=True)
    masker = await prepare(engine, tools, await constraint(engine, schema, "response_format"))
    gen = GenerationRequest(
        prompt, max_tokens, common.sampling, common.stop, logprobs, top, masker, tools.request_tools(), True
    )
    limit_param = "max_completion_tokens" if f.present("max_completion_tokens") else "max_tokens"
    handle = await lease.start(gen, limit_param if common.max_tokens is not None else None)
    env = Envelope(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", engine.loaded.id, common.include_usage)

    def lp_obj(items: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        return {"content": [_lp(i) for i in items], "refusal": None} if logprobs else None

    if not common.stream:
        got = await collect(handle, request)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": got.text if got.text or not got.calls else None,
            "refusal": None,
        }
        if got.reasoning:  # vLLM's and DeepSeek's name for it
            message["reasoning_content"] = got.reasoning
        if got.calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in got.calls
            ]
        choice_obj = {
            "index": 0,
            "message": message,
            "logprobs": lp_obj(got.logprobs),
            "finish_reason": got.finished.reason,
        }
        return env.response(choice_obj, got.finished)

    def choice(delta: dict[str, Any], lps: Any = None, finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": lps, "finish_reason": finish}

    return streaming(
        env,
        handle,
        first=choice({"role": "assistant", "content": ""}),
        on_delta=lambda ev: choice({"content": ev.text}, lp_obj(ev.logprobs)),
        on_finish=lambda fin: choice({}, None, fin.reason),
        on_call=lambda call: [choice({"tool_calls": [part]}) for part in call_fragments(call)],
        on_reasoning=lambda ev: choice({"reasoning_content": ev.text}),
    )


def call_fragments(call: ToolCall) -> list[dict[str, Any]]:
    """A streamed tool call (docs/API.md): the first fragment names it, with empty arguments; the next
    carries only the index and the argument text."""
    head = {"name": call.name, "arguments": ""}
    first = {"index": call.index, "id": call.id, "type": "function", "function": head}
    return [first, {"index": call.index, "function": {"arguments": call.arguments}}]


async def _completion(request: Request, body: dict[str, Any], f: Fields, lease: Lease) -> Response:
    engine = lease.engine
    common = parse_common(f, engine.vocab_size)
    if f.present("suffix"):
        raise InvalidRequest("suffix is not supported by this server", param="suffix")
    if f.boolean("echo", False):
        raise InvalidRequest("echo is not supported by this server", param="echo")
    if (f.integer("best_of", 1, lo=1) or 1) > 1:
        raise InvalidRequest("best_of > 1 is not supported", param="best_of")
    top = f.integer("logprobs", None, lo=0, hi=20)
    prompt = await run_in_threadpool(_completion_prompt, engine, body.get("prompt"))
    max_tokens = budget(engine, len(prompt), common.max_tokens or 16, "prompt")
    gen = GenerationRequest(prompt, max_tokens, common.sampling, common.stop, top is not None, top or 0)
    handle = await lease.start(gen, "max_tokens", "prompt")
    env = Envelope(f"cmpl-{uuid.uuid4().hex}", "text_completion", engine.loaded.id, common.include_usage)
    offset = 0

    def lp_obj(items: Sequence[TokenLogprob], start: int) -> dict[str, Any] | None:
        if top is None:
            return None
        starts = [start + sum(len(i.token) for i in items[:n]) for n in range(len(items))]
        return {
            "tokens": [i.token for i in items],
            "token_logprobs": [i.logprob for i in items],
            "top_logprobs": [{t.token: t.logprob for t in i.top} for i in items],
            "text_offset": starts,
        }

    def choice(text: str, lps: Any = None, finish: str | None = None) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": lps, "finish_reason": finish}

    if not common.stream:
        got = await collect(handle, request)
        return env.response(choice(got.text, lp_obj(got.logprobs, 0), got.finished.reason), got.finished)

    def on_delta(ev: TextDelta) -> dict[str, Any]:
        nonlocal offset
        out = choice(ev.text, lp_obj(ev.logprobs, offset))
        offset += len(ev.text)
        return out

    return streaming(env, handle, None, on_delta, lambda fin: choice("", None, fin.reason))


def _completion_prompt(engine: Engine, prompt: Any) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        return encode_text(engine.loaded.tokenizer, prompt)
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        if not all(0 <= t < engine.vocab_size for t in prompt):
            raise InvalidRequest("prompt holds token ids outside this model's vocabulary", "prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise InvalidRequest("only one prompt per request is supported", param="prompt")
    raise InvalidRequest("prompt must be a string or an array of token ids", param="prompt")


def _model_card(scheduler: Scheduler, entry: Entry) -> dict[str, Any]:
    card = {
        "id": entry.id,
        "object": "model",
        "created": entry.engine.loaded.created if entry.engine else scheduler.created,
        "owned_by": "mlx-flash",
        "status": entry.status,
    }
    if entry.engine:
        card["context_length"] = entry.engine.loaded.context_length
    return card


async def list_models(request: Request) -> Response:
    scheduler: Scheduler = request.app.state.worker.scheduler
    data = [_model_card(scheduler, e) for e in scheduler.models()]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request) -> Response:
    scheduler: Scheduler = request.app.state.worker.scheduler
    return JSONResponse(_model_card(scheduler, scheduler.lookup(request.path_params["model"])))


def routes() -> list[BaseRoute]:
    endpoints: list[tuple[str, Callable[[Request], Awaitable[Response]], list[str]]] = [
        ("/chat/completions", chat_completions, ["POST"]),
        ("/completions", completions, ["POST"]),
        ("/models", list_models, ["GET"]),
        ("/models/{model:path}", get_model, ["GET"]),
    ]
    return [
        Route(prefix + path, endpoint, methods=methods)
        for prefix in ("/v1", "")
        for path, endpoint, methods in endpoints
    ]
