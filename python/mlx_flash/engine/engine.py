"""One engine thread per model: requests arrive on a queue, tokens leave as events.

Async handlers never touch MLX; they submit a `GenerationRequest` and iterate the handle's events.
Generation is sequential for now; continuous batching replaces `_generate` behind the same seam.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from mlx_flash import metrics
from mlx_flash.engine.logprobs import TokenBytes, token_logprob
from mlx_flash.engine.request import (
    Event,
    Failed,
    Finished,
    FinishReason,
    GenerationRequest,
    TextDelta,
    TokenLogprob,
)
from mlx_flash.engine.stops import Piece, StopMatcher
from mlx_flash.models.loader import LoadedModel

log = logging.getLogger(__name__)

# Presence/frequency penalties look at the whole sequence, as OpenAI's do; mlx-lm defaults to 20.
PENALTY_CONTEXT = 1 << 30


class RequestHandle:
    """The async side of one request: iterate `events()`; `cancel()` stops generation."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.request = request
        self.submitted = time.perf_counter()
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def emit(self, event: Event) -> None:
        """Called from the engine thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancel()

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, Finished | Failed):
                return


class Engine:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._token_bytes = TokenBytes(loaded.tokenizer)
        self.vocab_size = int(loaded.config.get("vocab_size") or len(loaded.tokenizer))
        self._jobs: queue.Queue[RequestHandle | None] = queue.Queue()
        self._in_flight = metrics.REQUESTS_IN_FLIGHT.labels(model=loaded.id)
        self._thread = threading.Thread(target=self._run, name=f"engine:{loaded.id}", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest) -> RequestHandle:
        handle = RequestHandle(request, asyncio.get_running_loop())
        self._in_flight.inc()
        self._jobs.put(handle)
        return handle

    def close(self, timeout: float = 10.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (handle := self._jobs.get()) is not None:
            try:
                if not handle.cancelled:
                    self._generate(handle)
            except Exception:
                log.exception("generation failed", extra={"model": self.loaded.id})
                handle.emit(Failed("internal error during generation"))
            finally:
                self._in_flight.dec()

    def _generate(self, handle: RequestHandle) -> None:
        req, model_id = handle.request, self.loaded.id
        s = req.sampling
        if s.seed is not None:
            mx.random.seed(s.seed)
        sampler = make_sampler(
            temp=s.temperature, top_p=s.top_p if s.top_p < 1.0 else 0.0, min_p=s.min_p, top_k=s.top_k
        )
        processors = make_logits_processors(
            logit_bias=s.logit_bias or None,
            repetition_penalty=s.repetition_penalty,
            presence_penalty=s.presence_penalty,
            presence_context_size=PENALTY_CONTEXT,
            frequency_penalty=s.frequency_penalty,
            frequency_context_size=PENALTY_CONTEXT,
        )
        metrics.QUEUE_SECONDS.labels(model=model_id).observe(time.perf_counter() - handle.submitted)
        metrics.PROMPT_TOKENS.labels(model=model_id).inc(len(req.prompt_tokens))
        # Label lookups cost a lock and a dict each; resolve them once, not once per token.
        generated = metrics.GENERATION_TOKENS.labels(model=model_id)
        inter_token = metrics.INTER_TOKEN_SECONDS.labels(model=model_id)
        matcher: StopMatcher[TokenLogprob | None] = StopMatcher(req.stop)
        reason: FinishReason = "length"
        completion = 0
        last = 0.0
        responses = stream_generate(
            self.loaded.model,
            self.loaded.tokenizer,
            mx.array(req.prompt_tokens),
            max_tokens=req.max_tokens,
            sampler=sampler,
            logits_processors=processors,
        )
        for resp in responses:
            if handle.cancelled:  # the client went away: stop within one token
                break
            now = time.perf_counter()
            if last:
                inter_token.observe(now - last)
            else:
                metrics.TTFT_SECONDS.labels(model=model_id).observe(now - handle.submitted)
            last = now
            item = None
            if resp.finish_reason != "stop":  # "stop" here means EOS, which is not output
                completion += 1
                generated.inc()
                if req.logprobs:
                    item = token_logprob(
                        resp.logprobs, resp.token, resp.text, req.top_logprobs, self._token_bytes
                    )
            pieces, stopped = matcher.push(resp.text, item)
            _emit(handle, pieces)
            if stopped:
                reason = "stop"
                break
            if resp.finish_reason is not None:
                reason = "stop" if resp.finish_reason == "stop" else "length"
        else:
            _emit(handle, matcher.flush())
        responses.close()
        handle.emit(Finished(reason, len(req.prompt_tokens), completion))


def _emit(handle: RequestHandle, pieces: list[Piece[TokenLogprob | None]]) -> None:
    text = "".join(p.text for p in pieces)
    items = tuple(p.item for p in pieces if p.item is not None)
    if text or items:
        handle.emit(TextDelta(text, items))
