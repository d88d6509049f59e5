"""A worker serving a model whose experts stream from disk: the same answers as the resident model
through the OpenAI API, with batching and the prefix cache; metrics and admin show the pools; under a
memory balloon in its cgroup the pools shrink, and grow back when the balloon is gone."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import httpx
import ollama
import openai
import pytest

from helpers import Worker, holding, memory_cgroup, run_worker
from mlx_flash.demo import DEMO_MODEL_PATH
from mlx_flash.experts.store import expert_file_bytes

QUESTIONS = ["What can you do?", "Tell me about the weather tools.", "hello", "Write a haiku about tea."]
# The demo model: 4 MoE layers of 8 experts, 2 per token.
UNIT = expert_file_bytes(DEMO_MODEL_PATH, 8) // 8  # bytes of one expert in every layer


async def answers(worker: Worker) -> list[str]:
    """Every question at once (one batch), greedy."""
    client = openai.AsyncOpenAI(base_url=f"{worker.url}/v1", api_key="x", max_retries=0)

    async def ask(q: str) -> str:
        r = await client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": q}], max_tokens=40, temperature=0
        )
        return r.choices[0].message.content or ""

    try:
        return list(await asyncio.gather(*(ask(q) for q in QUESTIONS)))
    finally:
        await client.close()


def test_a_streamed_model_answers_as_the_resident_one(tmp_path: Path) -> None:
    with run_worker("demo", tmp_path / "resident.log") as w:
        want = asyncio.run(answers(w))
        assert w.metric("mlx_flash_expert_slots_per_layer", model="demo") == 8  # auto: it fits
        assert w.metric("mlx_flash_expert_misses_total", model="demo") == 0
    with run_worker("demo", tmp_path / "streamed.log", "--expert-memory", str(2 * UNIT)) as w:
        assert asyncio.run(answers(w)) == want
        assert w.metric("mlx_flash_expert_slots_per_layer", model="demo") == 2
        assert w.metric("mlx_flash_expert_misses_total", model="demo") > 0
        assert w.metric("mlx_flash_expert_read_bytes_total", model="demo") > 0
        # The same conversation again: its prompt comes from the prefix cache, the answer is unchanged.
        client = openai.OpenAI(base_url=f"{w.url}/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": QUESTIONS[0]}]
        again = client.chat.completions.create(model="demo", messages=messages, max_tokens=40, temperature=0)  # type: ignore[arg-type]
        assert again.choices[0].message.content == want[0]
        assert again.usage is not None and again.usage.prompt_tokens_details is not None
        assert (again.usage.prompt_tokens_details.cached_tokens or 0) > 0
        # Streamed completions too.
        text = "".join(
            c.choices[0].text
            for c in client.completions.create(
                model="demo", prompt="The weather", max_tokens=20, temperature=0, stream=True
            )
        )
        assert text
        model = httpx.get(f"{w.url}/admin/api/models", timeout=10).json()
        experts = next(m for m in model["models"] if m["id"] == "demo")["experts"]
        assert experts["experts_per_layer"] == 2 and experts["budget_bytes"] == 2 * UNIT
        assert experts["misses"] > 0 and experts["bytes_read"] == experts["misses"] * (UNIT // 4)


def test_too_small_an_expert_budget_is_refused_clearly() -> None:
    cmd = [sys.executable, "-m", "mlx_flash.worker", "--model", "demo", "--port", "0"]
    r = subprocess.run([*cmd, "--expert-memory", str(UNIT)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3
    assert "cannot hold the 2 experts per layer a token needs" in r.stdout + r.stderr


def test_the_pools_follow_a_memory_balloon_in_the_cgroup(tmp_path: Path) -> None:
    """A smaller machine: while another process in the worker's cgroup holds most of it, the pools
    shrink to the router's top-k within 2 s and answers do not change; they grow back after."""
    limit = 3 << 30
    with memory_cgroup("mlxf-experts", limit) as (group, join):
        with run_worker("demo", tmp_path / "w.log", "--prefix-cache-bytes", "64M", prefix=join) as w:
            want = asyncio.run(answers(w))
            assert w.metric("mlx_flash_expert_slots_per_layer", model="demo") == 8
            usage = int((group / "memory.usage_in_bytes").read_text())
            # Leaves 17.5% free: under the 20% the pools keep free, above what admission needs.
            with holding(join, int(limit * (1 - 0.175)) - usage):
                held = time.monotonic()
                while w.metric("mlx_flash_expert_slots_per_layer", model="demo") > 2:
                    assert time.monotonic() - held < 2.0, "the pools did not shrink within 2 s"
                    time.sleep(0.05)
                assert asyncio.run(answers(w)) == want
            deadline = time.monotonic() + 10
            while w.metric("mlx_flash_expert_slots_per_layer", model="demo") < 8:
                assert time.monotonic() < deadline, "the pools did not grow back"
                time.sleep(0.05)
            assert asyncio.run(answers(w)) == want
            assert w.process.poll() is None
            assert "oom_kill 0" in (group / "memory.oom_control").read_text()


def test_a_weight_file_cut_short_under_a_running_server_is_said_and_the_model_read_again(
    tmp_path: Path,
) -> None:
    """Streamed experts are read from the model's files while it serves: if one is cut short, the
    request fails saying so (not a generic error, not a wrong answer); the next request loads the
    model afresh, which names the damage, and once the file is whole again it is served as before."""
    model = tmp_path / "demo"
    shutil.copytree(DEMO_MODEL_PATH, model)
    weights = model / "model.safetensors"
    whole = weights.read_bytes()
    chat = {"model": str(model), "messages": [{"role": "user", "content": "What is 2+3?"}]}
    with run_worker(str(model), tmp_path / "w.log", "--expert-memory", "3M") as w:
        first = httpx.post(f"{w.url}/v1/chat/completions", json={**chat, "max_tokens": 8}, timeout=60)
        assert first.status_code == 200
        with weights.open("r+b") as f:  # in place: the worker's open descriptor sees it
            f.truncate(len(whole) // 2)
        broken = httpx.post(f"{w.url}/v1/chat/completions", json={**chat, "max_tokens": 8}, timeout=60)
        assert broken.status_code == 500, broken.text
        message = broken.json()["error"]["message"]
        assert "could not be read" in message and str(weights) in message, message
        reload = httpx.post(f"{w.url}/v1/chat/completions", json={**chat, "max_tokens": 8}, timeout=60)
        assert reload.status_code >= 400 and str(weights) in reload.text, reload.text
        tmp = weights.with_suffix(".tmp")
        tmp.write_bytes(whole)
        tmp.replace(weights)
        again = httpx.post(f"{w.url}/v1/chat/completions", json={**chat, "max_tokens": 8}, timeout=60)
        assert again.status_code == 200
        assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
        assert "Traceback" not in broken.text + reload.text


def _openai_chat(url: str, model: str, prompt: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    messages = [{"role": "user", "content": prompt}]
    with pytest.raises(openai.APIError) as failed:
        for _ in client.chat.completions.create(model=model, messages=messages, max_tokens=24, stream=True):  # type: ignore[arg-type]
            pass
    return failed.value.message


def _anthropic(url: str, model: str, prompt: str) -> str:
    client = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0)
    messages = [{"role": "user", "content": prompt}]
    with pytest.raises(anthropic.APIError) as failed:
        with client.messages.stream(model=model, messages=messages, max_tokens=24) as stream:  # type: ignore[arg-type]
            for _ in stream:
                pass
    return failed.value.message


def _responses(url: str, model: str, prompt: str) -> str:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    kinds = []
    for ev in client.responses.create(model=model, input=prompt, max_output_tokens=24, stream=True):
        kinds.append(ev.type)
        if ev.type == "response.failed":
            assert ev.response.error is not None
            return ev.response.error.message
    raise AssertionError(f"no response.failed event: {kinds}")


def _ollama(url: str, model: str, prompt: str) -> str:
    with ollama.Client(host=url) as client:
        messages = [{"role": "user", "content": prompt}]
        with pytest.raises(ollama.ResponseError) as failed:
            for _ in client.chat(model=model, messages=messages, stream=True, options={"num_predict": 24}):
                pass
    return failed.value.error


def test_a_stream_cut_short_by_a_damaged_file_says_which_file_in_every_api(tmp_path: Path) -> None:
    """A streamed answer that fails because an expert could not be read ends with that API's error
    event naming the file, not a generic "generation failed"."""
    model = tmp_path / "demo"
    shutil.copytree(DEMO_MODEL_PATH, model)
    weights = model / "model.safetensors"
    whole = weights.read_bytes()
    apis = {"openai": _openai_chat, "anthropic": _anthropic, "responses": _responses, "ollama": _ollama}
    with run_worker(str(model), tmp_path / "w.log", "--expert-memory", "3M") as w:
        for i, (api, stream) in enumerate(apis.items()):
            chat = {"model": str(model), "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
            assert httpx.post(f"{w.url}/v1/chat/completions", json=chat, timeout=60).status_code == 200
            with weights.open("r+b") as f:  # in place: the worker's open descriptor sees it
                f.truncate(len(whole) // 2)
            message = stream(w.url, str(model), f"{QUESTIONS[i]} Answer at length.")
            assert "could not be read" in message and str(weights) in message, (api, message)
            tmp = weights.with_suffix(".tmp")  # whole again: the next request loads it afresh
            tmp.write_bytes(whole)
            tmp.replace(weights)
