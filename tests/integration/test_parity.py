"""Greedy output over HTTP is byte-identical to in-process mlx_lm.generate, dense and MoE."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from mlx_lm import generate, load
from mlx_lm.sample_utils import make_logits_processors

from helpers import Worker, build_model, continuation, run_worker

PROMPTS = ["Hello there, what is", "What is 12+7?", '{"key": [1, 2', "café 東京 🙂 and"]
MAX_TOKENS = 40
STREAM_TOKENS = 2000  # long enough to outlast the paced prompt on a busy machine


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen3_moe", "mixtral"])
def test_greedy_completions_match_mlx_lm_generate(
    arch: str, workers: dict[str, Worker], model_path: dict[str, Path]
) -> None:
    model, tokenizer = load(str(model_path[arch]))
    c = openai.OpenAI(base_url=f"{workers[arch].url}/v1", api_key="unused", max_retries=0)
    for prompt in PROMPTS:
        expected = continuation(model, tokenizer, prompt, max_tokens=MAX_TOKENS)
        got = c.completions.create(
            model=str(model_path[arch]), prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
        )
        assert got.choices[0].text == expected, prompt


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_greedy_chat_matches_mlx_lm_generate(
    arch: str, workers: dict[str, Worker], model_path: dict[str, Path]
) -> None:
    model, tokenizer = load(str(model_path[arch]))
    c = openai.OpenAI(base_url=f"{workers[arch].url}/v1", api_key="unused", max_retries=0)
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        expected = generate(model, tokenizer, ids, max_tokens=MAX_TOKENS)
        stream = c.chat.completions.create(
            model=arch,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
        )
        got = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        assert got == expected, prompt


def test_demo_model_greedy_matches_mlx_lm_generate(demo_worker: Worker) -> None:
    from mlx_flash.demo import DEMO_MODEL_PATH

    model, tokenizer = load(str(DEMO_MODEL_PATH))
    c = openai.OpenAI(base_url=f"{demo_worker.url}/v1", api_key="unused", max_retries=0)
    for text in ["What is 31+45?", "Repeat after me: naïve café 🙂", "Hello"]:
        messages = [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        expected = generate(model, tokenizer, ids, max_tokens=64)
        got = c.chat.completions.create(
            model="demo",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=64,
            temperature=0,
        )
        assert got.choices[0].message.content == expected


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_concurrent_requests_in_one_batch_match_their_solo_output(
    arch: str, workers: dict[str, Worker], model_path: dict[str, Path]
) -> None:
    """8 different prompts at once (one continuous batch): each equals mlx_lm.generate alone."""
    model, tokenizer = load(str(model_path[arch]))
    prompts = [f"{p} {i}" for i, p in enumerate(PROMPTS * 2)]
    expected = [continuation(model, tokenizer, p, max_tokens=MAX_TOKENS) for p in prompts]

    def steps_with_company() -> float:
        """Decode steps that ran more than one sequence."""
        w, m = workers[arch], str(model_path[arch])
        return w.metric("mlx_flash_batch_size_count", 0.0, model=m) - w.metric(
            "mlx_flash_batch_size_bucket", 0.0, le="1.0", model=m
        )

    before = steps_with_company()
    url = f"{workers[arch].url}/v1"
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0) as c, ThreadPoolExecutor(8) as pool:

        def complete(prompt: str) -> str:
            r = c.completions.create(
                model=str(model_path[arch]), prompt=prompt, max_tokens=MAX_TOKENS, temperature=0
            )
            return r.choices[0].text

        got = list(pool.map(complete, prompts))
    assert got == expected
    assert steps_with_company() > before, "the requests never shared a decode step"


def test_kv_bits_output_matches_mlx_lm_generate_with_the_same_quantization(tmp_path: Path) -> None:
    """--kv-bits runs requests one at a time through mlx-lm's quantized KV cache: concurrent requests
    and prefix-cache hits give what mlx_lm.generate gives with the same kv_bits."""
    path = build_model("qwen3", tmp_path / "qwen3-hd32", seed=1, head_dim=32)  # quantized in groups of 32
    model, tokenizer = load(str(path))
    quant = {"kv_bits": 4, "kv_group_size": 32, "quantized_kv_start": 0}
    expected = [continuation(model, tokenizer, p, max_tokens=MAX_TOKENS, **quant) for p in PROMPTS]
    plain = [continuation(model, tokenizer, p, max_tokens=MAX_TOKENS) for p in PROMPTS]
    assert all(expected) and expected != plain  # the quantization is real: it changes the output
    args = ["--kv-bits", "4", "--kv-group-size", "32", "--quantized-kv-start", "0"]
    with run_worker(str(path), tmp_path / "w.log", *args) as w:
        c = openai.OpenAI(base_url=f"{w.url}/v1", api_key="unused", max_retries=0)

        def complete(prompt: str) -> tuple[str, int]:
            r = c.completions.create(model=str(path), prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
            assert r.usage is not None
            details = r.usage.prompt_tokens_details
            return r.choices[0].text, (details.cached_tokens or 0) if details else 0

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            first = list(pool.map(complete, PROMPTS))
        assert [text for text, _ in first] == expected
        again, cached = complete(PROMPTS[1])
        assert again == expected[1] and cached > 0
        assert w.metric("mlx_flash_batch_size_count", 0.0, model=str(path)) == 0  # never batched
        models = httpx.get(f"{w.url}/admin/api/models", timeout=10).json()["models"]
        assert [m["batching"] for m in models] == [False]  # and it says so
        assert "requests run one at a time" in w.log()


def test_a_prompt_read_while_others_decode_is_paced_and_matches_its_solo_output(
    model_path: dict[str, Path], tmp_path: Path
) -> None:
    """A long prompt arriving while streams decode is read in small chunks between their decode steps
    (a small --prefill-budget makes them very small); chunking changes neither its output nor theirs."""
    path = str(model_path["qwen3"])
    model, tokenizer = load(path)
    eos = {t: -100.0 for t in tokenizer.eos_token_ids}  # the streams run their full length
    running = [f"Stream {i}: once upon a time" for i in range(2)]
    long_prompt = " ".join(f"word{i} and" for i in range(150))
    assert len(tokenizer.encode(long_prompt)) > 300
    processors = make_logits_processors(eos)
    expected_running = [
        continuation(model, tokenizer, p, max_tokens=STREAM_TOKENS, logits_processors=processors)
        for p in running
    ]
    expected_long = continuation(model, tokenizer, long_prompt, max_tokens=MAX_TOKENS)
    with (
        run_worker(path, tmp_path / "w.log", "--prefill-budget", "0.1") as w,
        openai.OpenAI(base_url=f"{w.url}/v1", api_key="unused", max_retries=0) as c,
        ThreadPoolExecutor(len(running)) as pool,
    ):
        started = [threading.Event() for _ in running]

        def stream(prompt: str, started: threading.Event) -> str:
            bias = {str(t): b for t, b in eos.items()}
            chunks = c.completions.create(
                model=path,
                prompt=prompt,
                max_tokens=STREAM_TOKENS,
                temperature=0,
                logit_bias=bias,
                stream=True,
            )
            text = ""
            for ch in chunks:
                started.set()
                text += ch.choices[0].text if ch.choices else ""
            return text

        futures = [pool.submit(stream, p, e) for p, e in zip(running, started, strict=True)]
        assert all(e.wait(60) for e in started)
        got_long = c.completions.create(model=path, prompt=long_prompt, max_tokens=MAX_TOKENS, temperature=0)
        assert not all(f.done() for f in futures), "the long prompt did not overlap the streams"
        got_running = [f.result() for f in futures]
        small = w.metric("mlx_flash_prefill_chunk_tokens_bucket", le="16.0", model=path)
    assert got_long.choices[0].text == expected_long
    assert got_running == expected_running
    assert small > 0, "the long prompt was read in large chunks"


def test_a_completion_keeps_its_first_tokens_leading_space(demo_worker: Worker) -> None:
    """A raw completion continues its prompt: " forest" after "Once upon a time" keeps its space, in the
    text and in the token's logprob item (mlx-lm's detokenizer drops it, as a chat reply should)."""
    from mlx_flash.demo import DEMO_MODEL_PATH

    tokenizer = load(str(DEMO_MODEL_PATH))[1]
    [forest] = tokenizer.encode(" forest", add_special_tokens=False)
    c = openai.OpenAI(base_url=f"{demo_worker.url}/v1", api_key="unused", max_retries=0)
    bias = {str(forest): 100}
    got = c.completions.create(
        model="demo", prompt="Once upon a time", max_tokens=2, temperature=0, logit_bias=bias, logprobs=0
    )
    assert got.choices[0].text == " forest forest"
    assert got.choices[0].logprobs is not None and got.choices[0].logprobs.tokens == [" forest", " forest"]
    streamed = c.completions.create(
        model="demo", prompt="Once upon a time", max_tokens=2, temperature=0, logit_bias=bias, stream=True
    )
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == " forest forest"
    reply = c.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        temperature=0,
        logit_bias=bias,
    )
    assert reply.choices[0].message.content == "forest forest"
