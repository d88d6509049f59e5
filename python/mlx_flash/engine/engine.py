"""One engine thread per model: requests arrive on a queue, tokens leave as events.

Async handlers never touch MLX; they submit a `GenerationRequest` and iterate the handle's events.
The engine thread runs every request of its model in one continuous batch (mlx-lm's
`BatchGenerator`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START, BatchGenerator, GenerationBatch, generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import LogitsProcessor, Sampler, make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer, StreamingDetokenizer

from mlx_flash import logging as json_logging
from mlx_flash import metrics
from mlx_flash.config import DEFAULT_PREFILL_BUDGET, DEFAULT_PREFILL_STEP, DEFAULT_PREFIX_CACHE_BYTES
from mlx_flash.engine.constrain import Grammars
from mlx_flash.engine.logprobs import TokenBytes, token_logprob
from mlx_flash.engine.pacing import PrefillPacer
from mlx_flash.engine.prefix_cache import PrefixCache
from mlx_flash.engine.reply import ReplyParser
from mlx_flash.engine.request import (
    Event,
    Failed,
    Finished,
    FinishReason,
    GenerationRequest,
    SamplingParams,
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

    def __init__(
        self,
        request: GenerationRequest,
        loop: asyncio.AbstractEventLoop,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.request = request
        self.submitted = time.perf_counter()
        # The engine thread logs about this request with these (request_id, model).
        self.log_fields = json_logging.request_fields()
        self._loop = loop
        self._on_close = on_close
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

    def closed(self) -> None:
        """Called from the engine thread once the request holds no more engine resources."""
        if self._on_close is not None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone
                self._loop.call_soon_threadsafe(self._on_close)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, Finished | Failed):
                return


class Engine:
    """Continuous batching over mlx-lm's `BatchGenerator` on one thread per model.

    Requests join the batch as they arrive and leave at token boundaries. Prompts are prefilled in
    chunks between decode steps, of at most `prefill_step` tokens and, while other streams decode,
    sized to take about `prefill_budget` decode steps, so running streams keep flowing.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        prefix_cache: PrefixCache | None = None,
        max_batch: int = 32,
        prefill_step: int = DEFAULT_PREFILL_STEP,
        prefill_budget: float = DEFAULT_PREFILL_BUDGET,
        kv_quantization: KvQuantization | None = None,
    ) -> None:
        self.loaded = loaded
        self.prefix_cache = prefix_cache or PrefixCache(loaded.id, DEFAULT_PREFIX_CACHE_BYTES)
        # Why generation cannot go on (the model's files became unreadable): reload it.
        self.broken: str | None = None
        self.max_batch = max_batch
        self.prefill_step = prefill_step
        self.prefill_budget = prefill_budget
        self.kv_quantization = kv_quantization
        self.token_bytes = TokenBytes(loaded.tokenizer)
        self.vocab_size = int(loaded.config.get("vocab_size") or len(loaded.tokenizer))
        tokenizer = loaded.tokenizer
        self.grammars = Grammars(tokenizer._tokenizer, self.vocab_size, sorted(tokenizer.eos_token_ids))
        self._jobs: queue.Queue[RequestHandle | None] = queue.Queue()
        self._waiting = metrics.REQUESTS_WAITING.labels(model=loaded.id)
        self._chunk_tokens = metrics.PREFILL_CHUNK_TOKENS.labels(model=loaded.id)
        run = self._run_serial if kv_quantization else self._run
        self._thread = threading.Thread(target=run, name=f"engine:{loaded.id}", daemon=True)
        self._thread.start()

    def submit(self, request: GenerationRequest, on_close: Callable[[], None] | None = None) -> RequestHandle:
        """Queue a request; `on_close` runs on the event loop when the engine is done with it."""
        handle = RequestHandle(request, asyncio.get_running_loop(), on_close)
        self._waiting.inc()
        self._jobs.put(handle)
        return handle

    def close(self, timeout: float = 10.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)
        self.prefix_cache.close()

    def _new_generator(self) -> BatchGenerator:
        return BatchGenerator(
            self.loaded.model,
            stop_tokens=[[t] for t in self.loaded.tokenizer.eos_token_ids],
            completion_batch_size=self.max_batch,
            prefill_batch_size=min(8, self.max_batch),
            prefill_step_size=self.prefill_step,
        )

    def _run(self) -> None:
        generator = self._new_generator()
        streams: dict[int, _Stream] = {}
        batch_size = metrics.BATCH_SIZE.labels(model=self.loaded.id)
        pacer = PrefillPacer(self.prefill_step, self.prefill_budget)
        while True:
            # Block only when idle; otherwise take whatever arrived and keep the batch moving.
            jobs = [] if streams else [self._jobs.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    jobs.append(self._jobs.get_nowait())
            for handle in jobs:
                if handle is None:
                    for stream in streams.values():
                        stream.fail("the server is shutting down")
                    generator.close()  # type: ignore[no-untyped-call]
                    return
                self._admit(generator, streams, handle)
            gone = [uid for uid, stream in streams.items() if stream.handle.cancelled]
            if gone:
                self._remove(generator, gone)
                for uid in gone:
                    streams.pop(uid).close()
            if not streams:
                continue
            try:
                responses = self._next(generator, streams, pacer)
                if responses:
                    batch_size.observe(len(responses))
                finished = [r.uid for r in responses if streams[r.uid].step(r)]
                for r in responses:
                    if r.finish_reason is not None:
                        self.prefix_cache.store(r.all_tokens, r.prompt_cache)
            except Exception as e:
                log.exception("generation failed", extra={"model": self.loaded.id})
                message, public = self._failure(e)
                for stream in streams.values():
                    stream.fail(message, public)
                streams.clear()
                generator.close()  # type: ignore[no-untyped-call]
                generator = self._new_generator()
                continue
            # A stop string ends a request the generator still considers running.
            running = [uid for uid in finished if uid in streams and streams[uid].running]
            if running:
                self._remove(generator, running)
            for uid in finished:
                streams.pop(uid).close()

    def _next(
        self, generator: BatchGenerator, streams: dict[int, _Stream], pacer: PrefillPacer
    ) -> list[GenerationBatch.Response]:
        """One step of the batch: a decode step for the running streams, then a paced prefill chunk."""
        decoding = sum(stream.decoding for stream in streams.values())
        prefilling = min(len(streams) - decoding, generator.prefill_batch_size)
        generator.prefill_step_size = pacer.chunk(decoding, prefilling)
        with generator.stats() as step:
            prompts, responses = generator.next()  # type: ignore[no-untyped-call]
        pacer.observe(decoding, step.prompt_tokens, step.wall_time)
        for p in prompts:
            if p.end_of_prompt:
                streams[p.uid].decoding = True
        if step.prompt_tokens:
            reading = sum(not p.end_of_prompt for p in prompts)
            self._chunk_tokens.observe(step.prompt_tokens / max(1, reading))
        return list(responses)

    def _run_serial(self) -> None:
        """With KV quantization, one request at a time: mlx-lm quantizes the KV cache only in its
        single-sequence `generate_step` (mlx_lm.server also stops batching with --kv-bits)."""
        while True:
            handle = self._jobs.get()
            if handle is None:
                return
            self._waiting.dec()
            if handle.cancelled:
                handle.closed()
                continue
            self._generate_one(handle)

    def _generate_one(self, handle: RequestHandle) -> None:
        req, q = handle.request, self.kv_quantization
        assert q is not None
        cache, rest = self.prefix_cache.fetch(req.prompt_tokens)
        cache = cache or make_prompt_cache(self.loaded.model)
        stream = _Stream(handle, self, len(req.prompt_tokens) - len(rest))
        tokens = list(req.prompt_tokens)
        eos = set(self.loaded.tokenizer.eos_token_ids)
        steps = generate_step(
            mx.array(rest),
            self.loaded.model,
            max_tokens=req.max_tokens,
            sampler=_sampler(req.sampling),
            logits_processors=_logits_processors(req),
            prompt_cache=cache,
            prefill_step_size=self.prefill_step,
            kv_bits=q.bits,
            kv_group_size=q.group_size,
            quantized_kv_start=q.start,
        )
        try:
            for n, (token, logprobs) in enumerate(steps, start=1):
                finish = "stop" if token in eos else "length" if n == req.max_tokens else None
                tokens.append(int(token))
                if stream.step(_Step(int(token), logprobs, finish)):
                    break
        except Exception as e:
            log.exception("generation failed", extra={**handle.log_fields, "model": self.loaded.id})
            stream.fail(*self._failure(e))
            return
        finally:
            steps.close()
        stream.close()
        # The cache holds the prompt and every generated token fed back so far.
        fed = cache[0].offset
        if fed <= len(tokens):
            self.prefix_cache.store(tokens[:fed], cache)

    def _failure(self, e: Exception) -> tuple[str, bool]:
        """What requests are told generation failed of, and whether it is for the client: that the
        model's files became unreadable under it (expert streaming reads them; the model is then
        read afresh), or only that the server failed."""
        if isinstance(e, OSError):
            self.broken = f"The model's files could not be read: {e}."
            return self.broken, True
        return "internal error during generation", False

    def _remove(self, generator: BatchGenerator, uids: list[int]) -> None:
        """Take requests out of the batch, keeping what they computed for the prefix cache."""
        caches = generator.remove(uids, return_prompt_caches=True)  # type: ignore[no-untyped-call]
        for cache, tokens in caches.values():
            self.prefix_cache.store(tokens, cache)

    def _admit(self, generator: BatchGenerator, streams: dict[int, _Stream], handle: RequestHandle) -> None:
        self._waiting.dec()
        if handle.cancelled:
            handle.closed()
            return
        req = handle.request
        cache, rest = self.prefix_cache.fetch(req.prompt_tokens)
        cached = len(req.prompt_tokens) - len(rest)
        try:
            (uid,) = generator.insert(
                [rest],
                max_tokens=[req.max_tokens],
                caches=[cache] if cache is not None else None,
                all_tokens=[req.prompt_tokens[:cached]],
                # None entries take the generator's shared greedy sampler (mlx-lm's own normalisation).
                samplers=[_sampler(req.sampling)],  # type: ignore[list-item]
                logits_processors=[_logits_processors(req)],
            )
        except Exception:
            log.exception("could not start generation", extra={**handle.log_fields, "model": self.loaded.id})
            handle.emit(Failed("internal error during generation"))
            handle.closed()
            return
        streams[uid] = _Stream(handle, self, cached)


@dataclass(frozen=True)
class KvQuantization:
    """mlx-lm's KV cache quantization: `bits` per element in groups, from token `start` on."""

    bits: int
    group_size: int = 64
    start: int = DEFAULT_QUANTIZED_KV_START


@dataclass(frozen=True)
class _Step:
    """One token of a serial generation, shaped like a `GenerationBatch.Response`."""

    token: int
    logprobs: mx.array
    finish_reason: str | None


def _sampler(s: SamplingParams) -> Sampler | None:
    """mlx-lm's sampler for these parameters; None (the batch's shared greedy sampler) for greedy."""
    if s.temperature == 0:
        return None
    inner = make_sampler(
        temp=s.temperature, top_p=s.top_p if s.top_p < 1.0 else 0.0, min_p=s.min_p, top_k=s.top_k
    )
    if s.seed is None:
        return inner
    # The random state is global and the batch is shared: reseed from (seed, step) before each
    # draw, so a seeded request samples the same tokens whatever else runs beside it.
    steps = itertools.count()

    def seeded(logprobs: mx.array) -> mx.array:
        mx.random.seed((s.seed or 0) * 1_000_003 + next(steps))
        return inner(logprobs)

    return seeded


def _logits_processors(req: GenerationRequest) -> list[LogitsProcessor]:
    s = req.sampling
    processors = make_logits_processors(
        logit_bias=s.logit_bias or None,
        repetition_penalty=s.repetition_penalty,
        presence_penalty=s.presence_penalty,
        presence_context_size=PENALTY_CONTEXT,
        frequency_penalty=s.frequency_penalty,
        frequency_context_size=PENALTY_CONTEXT,
    )
    # The constraint goes last: nothing after it may make a token it masked possible again.
    return [*processors, req.constraint] if req.constraint else processors


def keep_leading_space(detokenizer: StreamingDetokenizer) -> None:
    """Keep the first token's leading space in the text: mlx-lm's BPE and SentencePiece detokenizers drop
    it, as is right at the start of a reply, but a completion continues its prompt ("Once upon a time" +
    " forest"). They drop it only while their text is empty, so the text starts with a character that no
    segment returns."""
    if isinstance(detokenizer, BPEStreamingDetokenizer | SPMStreamingDetokenizer):
        detokenizer.text, detokenizer.offset = "\0", 1


class _Stream:
    """One request in the batch: detokenizes its tokens, applies stop strings, emits events."""

    def __init__(self, handle: RequestHandle, engine: Engine, cached: int) -> None:
        model_id = engine.loaded.id
        self.handle = handle
        self.cached = cached
        self.running = True
        self.decoding = False  # prefilled: in the generator's decode batch
        self._engine = engine
        self._started = time.perf_counter()
        self._first = 0.0
        self._finished: FinishReason | None = None
        metrics.QUEUE_SECONDS.labels(model=model_id).observe(self._started - handle.submitted)
        metrics.PROMPT_TOKENS.labels(model=model_id).inc(len(handle.request.prompt_tokens))
        self._running = metrics.REQUESTS_RUNNING.labels(model=model_id)
        self._running.inc()
        self._detokenizer = engine.loaded.tokenizer.detokenizer
        if not handle.request.reply:
            keep_leading_space(self._detokenizer)
        self._matcher: StopMatcher[TokenLogprob | None] = StopMatcher(handle.request.stop)
        req = handle.request
        tokenizer = engine.loaded.tokenizer
        self._reply = ReplyParser.for_request(
            tokenizer, req.tools.functions, req.prompt_tokens, req.reply, req.tools.parallel
        )
        self._completion = 0
        self._last = 0.0
        # Label lookups cost a lock and a dict each; resolve them once, not once per token.
        self._generated = metrics.GENERATION_TOKENS.labels(model=model_id)
        self._inter_token = metrics.INTER_TOKEN_SECONDS.labels(model=model_id)
        self._ttft = metrics.TTFT_SECONDS.labels(model=model_id)

    def step(self, r: GenerationBatch.Response | _Step) -> bool:
        """Take one generated token; True when this request is done."""
        if self.handle.cancelled:  # the client went away: stop within one token
            return True
        req = self.handle.request
        now = time.perf_counter()
        if self._last:
            self._inter_token.observe(now - self._last)
        else:
            self._ttft.observe(now - self.handle.submitted)
            metrics.PREFILL_SECONDS.labels(model=self._engine.loaded.id).observe(now - self._started)
            self._first = now
        self._last = now
        item = None
        detok = self._detokenizer
        if r.finish_reason == "stop":  # an end-of-sequence token: never part of the output
            detok.finalize()
        else:
            detok.add_token(r.token)
            if r.finish_reason == "length":
                detok.finalize()
            self._completion += 1
            self._generated.inc()
        text = detok.last_segment
        if r.finish_reason != "stop" and req.logprobs:
            item = token_logprob(r.logprobs, r.token, text, req.top_logprobs, self._engine.token_bytes)
        pieces, stopped = self._matcher.push(text, item)
        self._emit(pieces)
        if stopped or (self._reply is not None and self._reply.done):
            self._finish("stop")
            return True
        if r.finish_reason is not None:
            self.running = False
            self._emit(self._matcher.flush())
            self._finish("stop" if r.finish_reason == "stop" else "length")
            return True
        return False

    def _emit(self, pieces: list[Piece[TokenLogprob | None]]) -> None:
        text = "".join(p.text for p in pieces)
        items = tuple(p.item for p in pieces if p.item is not None)
        if not text and not items:
            return
        if self._reply is None:
            self.handle.emit(TextDelta(text, items))
            return
        for event in self._reply.push(text, items):
            self.handle.emit(event)

    def _finish(self, reason: FinishReason) -> None:
        if self._reply is not None:
            for event in self._reply.finish():
                self.handle.emit(event)
            if self._reply.calls and reason == "stop":
                reason = "tool_calls"
        self._finished = reason
        req = self.handle.request
        matched = self._matcher.matched
        self.handle.emit(Finished(reason, len(req.prompt_tokens), self._completion, self.cached, matched))

    def fail(self, message: str, public: bool = False) -> None:
        log.warning("generation failed", extra={**self._log_fields(), "error": message})
        self.handle.emit(Failed(message, public))
        self.close()

    def close(self) -> None:
        if self._first:
            metrics.DECODE_SECONDS.labels(model=self._engine.loaded.id).observe(self._last - self._first)
        self._running.dec()
        if self._finished or self.handle.cancelled:
            decode = self._last - self._first
            log.info(
                "generation",
                extra={
                    **self._log_fields(),
                    "finish": self._finished or "cancelled",
                    "prompt_tokens": len(self.handle.request.prompt_tokens),
                    "cached_tokens": self.cached,
                    "completion_tokens": self._completion,
                    "ttft_seconds": round(self._first - self.handle.submitted, 4) if self._first else None,
                    "tokens_per_second": round((self._completion - 1) / decode, 1) if decode > 0 else None,
                },
            )
        self.handle.closed()

    def _log_fields(self) -> dict[str, object]:
        return {**self.handle.log_fields, "model": self._engine.loaded.id}
