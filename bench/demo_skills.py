"""What the embedded demo model can do, measured through the worker's chat API with greedy decoding.

    python bench/demo_skills.py            # all ~1000 held-out sums plus the other trained tasks (~2 min)

Sums use the pairs training never saw (`mlx_flash.demo.data.held_out_pairs`); the other tasks are
fresh samples of the training distribution (seed below), so they measure fit, not generalisation.
Writes bench/results/demo_skills.json; bench/report.py turns it into the README table.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from mlx_flash.demo import data
from single_stream import machine, worker

RESULTS = Path(__file__).resolve().parent / "results"


def chat(client: httpx.Client, url: str, messages: list[dict[str, Any]], tools: Any = None) -> str:
    body: dict[str, Any] = {"model": "demo", "temperature": 0, "max_tokens": 96}
    if tools:  # tool parsing lands later; the raw completions route shows the model's own tool syntax
        r = client.post(f"{url}/v1/completions", json={**body, "prompt": data.render(messages, tools, True)})
        r.raise_for_status()
        return str(r.json()["choices"][0]["text"])
    r = client.post(f"{url}/v1/chat/completions", json={**body, "messages": messages})
    r.raise_for_status()
    return str(r.json()["choices"][0]["message"]["content"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=100, help="conversations per non-arithmetic task")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--out", type=Path, default=RESULTS / "demo_skills.json")
    args = p.parse_args(argv)

    tasks: dict[str, dict[str, Any]] = {}
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with tempfile.TemporaryDirectory() as tmp, worker("demo", Path(tmp) / "worker.log", 120) as (url, _):
        client = httpx.Client(timeout=60)
        pairs = data.held_out_pairs()
        wrong = []
        for a, b in pairs:
            got = chat(client, url, [{"role": "user", "content": f"What is {a}+{b}?"}])
            if got != str(a + b):
                wrong.append({"a": a, "b": b, "got": got})
        tasks["sum (held-out pairs)"] = {
            "total": len(pairs),
            "correct": len(pairs) - len(wrong),
            "wrong": wrong,
        }

        rng = random.Random(args.seed)
        counts = {t: 0 for t in ("json", "echo", "greet", "tool")}
        for name in counts:
            tasks[name] = {"total": 0, "correct": 0, "wrong": []}
        while min(counts.values()) < args.samples:
            task, messages, tools = data.sample_conversation(rng)
            if task not in counts or counts[task] >= args.samples:
                continue
            counts[task] += 1
            # Judge the first assistant turn (for tools: the call itself) against the training target.
            turn = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
            expected = data.render(messages[: turn + 1], tools)[
                len(data.render(messages[:turn], tools, True)) :
            ]
            expected = expected.removesuffix("<|im_end|>\n")
            got = chat(client, url, messages[:turn], tools)
            tasks[task]["total"] += 1
            if got == expected:
                tasks[task]["correct"] += 1
            else:
                tasks[task]["wrong"].append(
                    {"prompt": messages[turn - 1]["content"], "expected": expected, "got": got}
                )

    result = {
        "benchmark": "demo_skills",
        "argv": sys.argv,
        "started": started,
        "machine": machine(),
        "seed": args.seed,
        "tasks": tasks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    for name, outcome in tasks.items():
        print(f"{name}: {outcome['correct']}/{outcome['total']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
