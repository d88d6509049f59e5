"""Expert cache policies on the demo model's real routing: hit rates of LRU, LFU and frequency with
decay beside Belady's optimum, at 25% and 50% of the experts per layer.

    python bench/expert_policy.py            # 60 conversations (~1 min)
    python bench/expert_policy.py --quick    # 8 conversations, written to results/quick/

A demo worker runs with `--expert-trace`, answering fresh samples of the conversations it was trained on
(greedy, through /v1/chat/completions, or /v1/completions with its tool syntax for tool conversations),
so the trace holds its prefill and decode passes as served. The trace is replayed per layer as the pools
serve it: each pass asks for its experts once, a prompt chunk's as bulk, in groups no larger than the
pool (`mlx_flash.experts.trace.replay`, what `mlx-flash experts replay` prints). Target: a policy within 5
points of Belady at both capacities. Writes bench/results/expert_policy.json; bench/report.py turns it
into a README table.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from mlx_flash.demo import data
from mlx_flash.experts import trace
from mlx_flash.experts.policy import POLICIES
from results import header, write

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers import run_worker  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "expert_policy.json"
QUICK_OUT = ROOT / "bench" / "results" / "quick" / "expert_policy.json"
CAPACITIES = (0.25, 0.5)
WITHIN = 0.05


def converse(client: httpx.Client, url: str, rng: random.Random) -> None:
    _, messages, tools = data.sample_conversation(rng)
    body: dict[str, Any] = {"model": "demo", "temperature": 0, "max_tokens": 64}
    # The trained conversation up to its last user turn; the model answers that turn.
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    body["messages"] = messages[: last_user + 1]
    if tools:  # rendered by the chat template, the model's calls parsed, as a client sees them
        body["tools"] = tools
    r = client.post(f"{url}/v1/chat/completions", json=body)
    r.raise_for_status()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="8 conversations, results/quick/")
    p.add_argument("--conversations", type=int, default=60)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.conversations = 8
    args.out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    started = time.time()
    result: dict[str, Any] = {
        **header("expert_policy", args, started),
        "method": {
            "trace": "python -m mlx_flash.worker --model demo --expert-trace FILE; fresh samples of the demo "
            "model's training conversations, answered greedily (max_tokens 64)",
            "replay": "per layer, each pass's experts are one access (prompt chunks as bulk, split into "
            "groups of at most the capacity); hit rate = hits / expert uses, over all layers; Belady "
            "evicts the resident expert needed furthest ahead",
        },
    }
    with tempfile.TemporaryDirectory(prefix="mlxf-bench-") as tmp:
        path = Path(tmp) / "experts.jsonl"
        with run_worker("demo", Path(tmp) / "worker.log", "--expert-trace", str(path)) as w:
            rng = random.Random(args.seed)
            with httpx.Client(timeout=120) as client:
                for _ in range(args.conversations):
                    converse(client, w.url, rng)
        per_layer = trace.read(path)
    experts = trace.num_experts(per_layer)
    sizes = [round(c * experts) for c in CAPACITIES]
    rows = list(trace.report(per_layer, sizes))
    result["trace"] = {
        "layers": len(per_layer),
        "experts_per_layer": experts,
        "tokens": trace.num_tokens(per_layer),
        "passes": len(next(iter(per_layer.values()))),
        "prompt_passes": sum(p.bulk for p in next(iter(per_layer.values()))),
        "experts_per_token": len(next(iter(per_layer.values()))[0].tokens[0]),
    }
    result["replay"] = rows
    # Control: the same passes in a random order, which leaves an online policy nothing to learn from the
    # sequence. If Belady keeps its lead there, the lead is foresight, not a better policy left unbuilt.
    order = list(range(result["trace"]["passes"]))
    random.Random(args.seed).shuffle(order)
    shuffled = {layer: [passes[i] for i in order] for layer, passes in per_layer.items()}
    result["shuffled"] = list(trace.report(shuffled, sizes))
    gaps = {name: max(r["belady"] - r[name] for r in rows) for name in POLICIES}
    best = min(gaps, key=lambda n: gaps[n])
    result["summary"] = {
        "points_below_belady": {n: round(100 * g, 2) for n, g in gaps.items()},
        "points_below_belady_shuffled": {
            n: round(100 * max(r["belady"] - r[n] for r in result["shuffled"]), 2) for n in POLICIES
        },
        "best": best,
        "targets": {
            "within_5_points": {
                "target": f"a policy within {WITHIN * 100:.0f} points of Belady at "
                f"{', '.join(f'{c:.0%}' for c in CAPACITIES)} capacity",
                "value": f"{best}: {100 * gaps[best]:.2f} points",
                "pass": gaps[best] <= WITHIN,
            }
        },
    }
    write(result, args.out, started)
    for r in rows:
        print(
            f"  capacity {r['capacity']}/{experts}: "
            + ", ".join(f"{k} {r[k]:.1%}" for k in (*POLICIES, "belady"))
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
