"""What the embedded demo model can do, measured through the worker's chat API with greedy decoding.

    python bench/demo_skills.py            # all ~1000 held-out sums plus the other trained tasks (~2 min)

Sums use the pairs training never saw (`mlx_flash.demo.data.held_out_pairs`); the other tasks are
fresh samples of the training distribution (seed below), so they measure fit, not generalisation.
Tool conversations go through chat with `tools`: the call is judged by the parsed `tool_calls` (name
and arguments equal to the training target's), the reply after the tool's result by its text.
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


def chat(client: httpx.Client, url: str, messages: list[dict[str, Any]], tools: Any = None) -> dict[str, Any]:
    """The reply's message: `content` and, when the model called tools, `tool_calls`."""
    body: dict[str, Any] = {"model": "demo", "temperature": 0, "max_tokens": 96, "messages": messages}
    if tools:
        body["tools"] = tools
    r = client.post(f"{url}/v1/chat/completions", json=body)
    r.raise_for_status()
    return dict(r.json()["choices"][0]["message"])


def calls(message: dict[str, Any]) -> list[dict[str, Any]]:
    """An assistant message's tool calls as {name, arguments (an object)}."""
    out = []
    for call in message.get("tool_calls") or []:
        fn = call["function"]
        arguments = json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else fn["arguments"]
        out.append({"name": fn["name"], "arguments": arguments})
    return out


def on_the_wire(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A training conversation as an OpenAI client sends it back: calls with ids and JSON-text
    arguments, tool results that answer them by id."""
    out, last_id = [], ""
    for i, m in enumerate(messages):
        if m.get("tool_calls"):
            wire = []
            for j, c in enumerate(calls(m)):
                last_id = f"call_{i}_{j}"
                fn = {"name": c["name"], "arguments": json.dumps(c["arguments"])}
                wire.append({"id": last_id, "type": "function", "function": fn})
            m = {**m, "content": m.get("content") or None, "tool_calls": wire}
        elif m["role"] == "tool":
            m = {**m, "tool_call_id": last_id}
        out.append(m)
    return out


def judge(outcome: dict[str, Any], prompt: str, expected: Any, got: Any) -> None:
    outcome["total"] += 1
    if got == expected:
        outcome["correct"] += 1
    else:
        outcome["wrong"].append({"prompt": prompt, "expected": expected, "got": got})


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
            got = chat(client, url, [{"role": "user", "content": f"What is {a}+{b}?"}])["content"]
            if got != str(a + b):
                wrong.append({"a": a, "b": b, "got": got})
        tasks["sum (held-out pairs)"] = {
            "total": len(pairs),
            "correct": len(pairs) - len(wrong),
            "wrong": wrong,
        }

        rng = random.Random(args.seed)
        counts = {t: 0 for t in ("json", "echo", "greet", "tool")}
        for name in ("json", "echo", "greet", "tool call", "tool result reply"):
            tasks[name] = {"total": 0, "correct": 0, "wrong": []}
        while min(counts.values()) < args.samples:
            task, messages, tools = data.sample_conversation(rng)
            if task not in counts or counts[task] >= args.samples:
                continue
            counts[task] += 1
            wire = on_the_wire(messages)
            turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            # Each assistant turn against the training target, given the conversation before it.
            for turn in turns:
                got = chat(client, url, wire[:turn], tools)
                prompt = messages[turn - 1]["content"]
                target = messages[turn]
                if target.get("tool_calls"):
                    judge(tasks["tool call"], prompt, calls(target), calls(got) or got["content"])
                else:
                    name = "tool result reply" if task == "tool" else task
                    judge(tasks[name], prompt, target["content"], got["content"])

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
