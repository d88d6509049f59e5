"""Expert traces: recorded by a real worker (--expert-trace) without changing its output, and replayed
by `mlx-flash experts replay` against the cache policies and Belady's optimum."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from mlx_lm import generate, load

from helpers import run_worker
from mlx_flash.demo import DEMO_MODEL_PATH
from mlx_flash.experts import trace


def test_recording_a_trace_does_not_change_output_and_replays() -> None:
    model, tokenizer = load(str(DEMO_MODEL_PATH))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 31+45?"}], add_generation_prompt=True
    )
    plain = generate(model, tokenizer, prompt, max_tokens=24)
    out = io.StringIO()
    assert trace.record(model, "demo", out) == 4  # the demo model's MoE layers
    assert generate(model, tokenizer, prompt, max_tokens=24) == plain
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert {line["layer"] for line in lines} == {0, 1, 2, 3}
    assert {line["num_experts"] for line in lines} == {8}
    assert all(len(experts) == 2 for line in lines for experts in line["experts"])  # top-2 routing
    assert [line["bulk"] for line in lines[:5]] == [True] * 4 + [False]
    first_pass = next(line for line in lines if line["layer"] == 0)
    # mlx-lm prefills all but the last prompt token in one pass; then one token per pass
    assert len(first_pass["experts"]) == len(prompt) - 1
    assert all(len(line["experts"]) == 1 for line in lines[4:])


def test_a_worker_records_and_the_cli_replays(tmp_path: Path) -> None:
    path = tmp_path / "experts.jsonl"
    with run_worker("demo", tmp_path / "w.log", "--expert-trace", str(path)) as w:
        c = openai.OpenAI(base_url=f"{w.url}/v1", api_key="unused", max_retries=0)
        for q in ("What is 2+2?", "Repeat after me: river lantern", "What is 30+12?"):
            c.chat.completions.create(model="demo", messages=[{"role": "user", "content": q}], max_tokens=16)
    per_layer = trace.read(path)
    assert sorted(per_layer) == [0, 1, 2, 3] and trace.num_experts(per_layer) == 8
    # Each answer: its prompt read in one bulk pass, then one decode pass per token.
    assert sum(p.bulk for p in per_layer[0]) == 3
    assert all(len(p.tokens) == 1 for p in per_layer[0] if not p.bulk)
    uses = sum(len({e for t in p.tokens for e in t}) for passes in per_layer.values() for p in passes)
    first_uses = sum(len({e for p in passes for t in p.tokens for e in t}) for passes in per_layer.values())
    for row in trace.report(per_layer, [2, 4, 8]):
        assert all(row[p] <= row["belady"] + 1e-9 for p in ("lru", "lfu", "decay"))
        if row["capacity"] == 8:  # every expert fits: only first uses miss, whatever the policy
            assert row["lru"] == row["belady"] == pytest.approx(1 - first_uses / uses, abs=1e-4)
            assert row["static"] == 1.0  # a fixed set is never loaded: hindsight's bound
    done = subprocess.run(
        [sys.executable, "-m", "mlx_flash.cli", "experts", "replay", str(path), "--capacity", "0.25,0.5"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "belady" in done.stdout and len(done.stdout.splitlines()) == 4, done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "mlx_flash.cli", "experts", "replay", str(path), "--capacity", "9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "between 1 and 8" in bad.stderr


def test_a_streamed_model_records_all_its_experts_not_its_slots(tmp_path: Path) -> None:
    path = tmp_path / "experts.jsonl"
    with run_worker("demo", tmp_path / "w.log", "--expert-trace", str(path), "--expert-memory", "3M") as w:
        status = httpx.get(f"{w.url}/admin/api/models", timeout=10).json()["models"][0]["experts"]
        assert status["experts_per_layer"] < 8
        c = openai.OpenAI(base_url=f"{w.url}/v1", api_key="unused", max_retries=0)
        c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert trace.num_experts(trace.read(path)) == 8
