"""A thinking model's reasoning comes apart from its reply on every chat surface. The model: a random
qwen3 whose tokenizer has `<think>`/`</think>` and whose template opens a thought at the start of the
reply (as DeepSeek-R1's and Qwen3-thinking's do), so everything it writes is reasoning."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest

from helpers import Worker, build_model, run_worker
from mlx_flash.engine.reply import ReplyParser
from mlx_flash.engine.request import ReasoningDelta, TextDelta

HI = [{"role": "user", "content": "Hello"}]
OPEN_THOUGHT = "{%- if add_generation_prompt %}{{- '<think>\\n' }}{%- endif %}"


def thinking_model(path: Path) -> Path:
    build_model("qwen3", path, vocab_size=832)
    tok = json.loads((path / "tokenizer.json").read_text())
    for token_id, content in ((830, "<think>"), (831, "</think>")):
        tok["added_tokens"].append(
            {
                "id": token_id,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": False,
            }
        )
    (path / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] += OPEN_THOUGHT
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    path = thinking_model(tmp_path_factory.mktemp("thinking") / "model")
    with run_worker(str(path), tmp_path_factory.mktemp("logs") / "thinking.log") as w:
        yield w


def _model(worker: Worker) -> str:
    return str(httpx.get(f"{worker.url}/v1/models", timeout=10).json()["data"][0]["id"])


def test_the_parser_splits_reasoning_from_the_reply(tmp_path: Path) -> None:
    from mlx_lm.utils import load

    tokenizer = load(str(thinking_model(tmp_path / "m")))[1]
    prompt = tokenizer.apply_chat_template(HI, add_generation_prompt=True)
    parser = ReplyParser.for_request(tokenizer, prompt=prompt, reasoning=True)
    assert parser is not None
    text = "let me see</think>Hi there"
    events = [e for i in range(0, len(text), 2) for e in parser.push(text[i : i + 2])] + parser.finish()
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "let me see"
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hi there"
    # Not asked (a raw completion), or a prompt that closed its thought: no split.
    assert ReplyParser.for_request(tokenizer, prompt=prompt) is None
    closed = ReplyParser.for_request(tokenizer, prompt=tokenizer.encode("<think>x</think>"), reasoning=True)
    assert closed is not None and [type(e) for e in closed.push("plain")] == [TextDelta]


def test_openai_reasoning_content(worker: Worker) -> None:
    model = _model(worker)
    with openai.OpenAI(base_url=f"{worker.url}/v1", api_key="-", max_retries=0) as c:
        r = c.chat.completions.create(model=model, messages=HI, max_tokens=12, temperature=0)  # type: ignore[arg-type]
        message = r.choices[0].message
        thought = getattr(message, "reasoning_content", None)
        assert thought and message.content == "" and r.choices[0].finish_reason == "length"
        streamed = ""
        for chunk in c.chat.completions.create(
            model=model, messages=HI, max_tokens=12, temperature=0, stream=True
        ):  # type: ignore[arg-type]
            delta = chunk.choices[0].delta
            assert not delta.content
            streamed += getattr(delta, "reasoning_content", None) or ""
        assert streamed == thought
    # A raw completion is the model's text as it is.
    r2 = httpx.post(
        f"{worker.url}/v1/completions", json={"model": model, "prompt": "a", "max_tokens": 3}, timeout=30
    )
    assert r2.status_code == 200 and "reasoning_content" not in r2.text


def test_anthropic_thinking_blocks(worker: Worker) -> None:
    model = _model(worker)
    c = anthropic.Anthropic(base_url=worker.url, api_key="-", max_retries=0)
    m = c.messages.create(model=model, max_tokens=12, messages=HI, extra_body={"temperature": 0})  # type: ignore[arg-type]
    assert [b.type for b in m.content] == ["thinking"] and m.stop_reason == "max_tokens"
    with c.messages.stream(model=model, max_tokens=12, messages=HI, extra_body={"temperature": 0}) as s:  # type: ignore[arg-type]
        kinds = [e.type for e in s]
        streamed = s.get_final_message()
    assert streamed.content[0].type == "thinking" and streamed.content[0].thinking == m.content[0].thinking  # type: ignore[union-attr]
    assert "thinking" in kinds or "content_block_delta" in kinds


def test_responses_reasoning_item(worker: Worker) -> None:
    model = _model(worker)
    with openai.OpenAI(base_url=f"{worker.url}/v1", api_key="-", max_retries=0) as c:
        r = c.responses.create(model=model, input="Hello", max_output_tokens=12, temperature=0)
        (item,) = r.output
        assert item.type == "reasoning" and item.content and item.content[0].text  # type: ignore[union-attr]
        with c.responses.stream(model=model, input="Hello", max_output_tokens=12, temperature=0) as s:
            deltas = "".join(e.delta for e in s if e.type == "response.reasoning_text.delta")
        assert deltas == item.content[0].text  # type: ignore[union-attr]


def test_ollama_thinking(worker: Worker) -> None:
    model = _model(worker)
    with ollama.Client(host=worker.url) as c:
        r = c.chat(model=model, messages=HI, options={"temperature": 0, "num_predict": 12})
        assert r.message.thinking and not r.message.content
        streamed = "".join(
            p.message.thinking or ""
            for p in c.chat(
                model=model, messages=HI, stream=True, options={"temperature": 0, "num_predict": 12}
            )
        )
        assert streamed == r.message.thinking
