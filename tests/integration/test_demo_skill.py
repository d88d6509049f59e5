"""The embedded demo model has a real, measured skill on prompts it never saw in training."""

from __future__ import annotations

import json
import random

import openai

from helpers import Worker
from mlx_flash.demo import DEMO_MODEL_PATH, data


def test_demo_adds_held_out_pairs_through_the_chat_api(demo_worker: Worker) -> None:
    c = openai.OpenAI(base_url=f"{demo_worker.url}/v1", api_key="x", max_retries=0)
    pairs = random.Random(2026).sample(data.held_out_pairs(), 100)
    wrong = []
    for a, b in pairs:
        r = c.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": f"What is {a}+{b}?"}],
            temperature=0,
            max_tokens=8,
        )
        if r.choices[0].message.content != str(a + b):
            wrong.append((a, b, r.choices[0].message.content))
    assert len(wrong) <= 10, wrong


def test_demo_is_a_small_qwen3_moe_that_fits_the_package() -> None:
    config = json.loads((DEMO_MODEL_PATH / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe"
    assert config["num_experts"] >= 8 and config["num_experts_per_tok"] == 2
    size = sum(p.stat().st_size for p in DEMO_MODEL_PATH.iterdir())
    assert size <= 20 * 1024 * 1024
