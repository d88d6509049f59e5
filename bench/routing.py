"""Routing policies and the prefix cache: prompt tokens reused over a multi-session, multi-turn trace
sent through the sidecar, for cache_aware and round_robin over 2 workers, and for a single worker.

    python bench/routing.py            # 16 sessions x 8 turns, 3 rounds of the 3 set-ups, 3 budgets (~10 min)
    python bench/routing.py --quick    # 4 sessions x 3 turns, 1 round, written to results/quick/

Each set-up is a fresh `mlx-flash serve` (`--workers 2 --policy cache_aware`, `--workers 2 --policy
round_robin`, `--workers 1`; --workers changes the 2) on the embedded demo model (default; this measures hit
rates, not speed). Every set-up runs once per RAM prefix-cache budget in --prefix-cache-bytes
(MLX_FLASH_PREFIX_CACHE_BYTES): per worker for the 2-worker set-ups, and the workers' total for the single
worker, so all three hold the same cache memory. The default budgets are one a worker's share of the trace
overflow (4M and 10M: less than a worker needs to hold every session's history, which round_robin asks of
each worker) and one the trace never fills (1G).
The trace: --sessions chat sessions of --turns turns; each turn resends the session's
whole history plus a new user message (echo and arithmetic requests in the demo model's repertoire, a system
prompt in some sessions), as chat clients do. Sessions run at once, each waiting a seeded random think time
before a turn, at most --concurrency requests in flight; no session id is sent, so only the policy decides
where a turn goes. Rounds use new traces (seed + round) and alternate the set-ups' order.

Reuse = sum of usage.prompt_tokens_details.cached_tokens over the trace's responses, cross-checked with
the sum of mlx_flash_prefix_cache_tokens_reused_total over the workers in the sidecar's merged /metrics
(the difference before and after the trace). Greedy replies (temperature 0) end at the model's EOS or
--max-tokens. Writes bench/results/routing.json; bench/report.py turns it into a README table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from mlx_flash.config import parse_bytes
from mlx_flash.demo import data
from results import header, write

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers import run_sidecar  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "routing.json"
QUICK_OUT = ROOT / "bench" / "results" / "quick" / "routing.json"
TARGETS = {"over_round_robin": 3.0, "over_single": 0.9}
# name -> policy; "single" is one worker, which has nothing to choose, so its policy does not matter.
SETUPS = {"cache_aware": "cache_aware", "round_robin": "round_robin", "single": "cache_aware"}
REUSED = "mlx_flash_prefix_cache_tokens_reused_total"
EVICTED = "mlx_flash_prefix_cache_evictions_total"
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


# ---------------------------------------------------------------- the trace


@dataclass
class Turn:
    user: str
    think_s: float


@dataclass
class Session:
    system: str | None
    turns: list[Turn]
    start_s: float


def echo(rng: random.Random, lo: int, hi: int) -> str:
    return "Repeat after me: " + " ".join(rng.choice(data.WORDS) for _ in range(rng.randint(lo, hi)))


def build_trace(sessions: int, turns: int, seed: int) -> list[Session]:
    rng = random.Random(seed)
    out = []
    for s in range(sessions):
        system = rng.choice(data.SYSTEM_PROMPTS) if rng.random() < 0.5 else None
        msgs = [echo(rng, 10, 16)]  # a distinctive first turn
        for _ in range(turns - 1):
            if rng.random() < 0.5:
                msgs.append(data.ADD_PROMPTS[0].format(a=rng.randrange(100), b=rng.randrange(100)))
            else:
                msgs.append(echo(rng, 4, 10))
        out.append(
            Session(
                system, [Turn(m, rng.uniform(0.0, 0.3)) for m in msgs], start_s=s * rng.uniform(0.02, 0.1)
            )
        )
    return out


# ---------------------------------------------------------------- metrics


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = []
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m and not line.startswith("#"):
            out.append((m.group(1), dict(LABEL.findall(m.group(2) or "")), float(m.group(3))))
    return out


def by_label(samples: list[tuple[str, dict[str, str], float]], name: str, *keys: str) -> dict[str, float]:
    """Sum of `name`'s samples, grouped by the values of `keys` (joined by '/')."""
    out: dict[str, float] = {}
    for n, labels, value in samples:
        if n == name:
            k = "/".join(labels.get(key, "") for key in keys)
            out[k] = out.get(k, 0.0) + value
    return out


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


# ---------------------------------------------------------------- one set-up


async def run_session(
    client: httpx.AsyncClient,
    url: str,
    model: str,
    s: int,
    session: Session,
    sem: asyncio.Semaphore,
    max_tokens: int,
) -> list[dict[str, Any]]:
    messages: list[dict[str, str]] = [{"role": "system", "content": session.system}] if session.system else []
    rows = []
    await asyncio.sleep(session.start_s)
    for t, turn in enumerate(session.turns):
        await asyncio.sleep(turn.think_s)
        messages.append({"role": "user", "content": turn.user})
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
        async with sem:
            r = await client.post(f"{url}/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"session {s} turn {t}: {r.status_code} {r.text}")
        answer = r.json()
        usage = answer["usage"]
        reply = str(answer["choices"][0]["message"]["content"] or "")
        messages.append({"role": "assistant", "content": reply})
        rows.append(
            {
                "session": s,
                "turn": t,
                "worker": r.headers.get("x-worker-id"),
                "prompt_tokens": usage["prompt_tokens"],
                "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
                "completion_tokens": usage["completion_tokens"],
            }
        )
    return rows


async def run_trace(url: str, trace: list[Session], args: argparse.Namespace) -> list[dict[str, Any]]:
    sem = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(timeout=300) as client:
        model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        per_session = await asyncio.gather(
            *(run_session(client, url, model, s, sess, sem, args.max_tokens) for s, sess in enumerate(trace))
        )
    return sorted((row for rows in per_session for row in rows), key=lambda r: (r["session"], r["turn"]))


def run_setup(
    name: str, trace: list[Session], budget: int, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    policy = SETUPS[name]
    workers = 1 if name == "single" else args.workers
    cache_bytes = budget * (args.workers if name == "single" else 1)
    # Inherited by the sidecar and, through it, by its workers.
    os.environ["MLX_FLASH_PREFIX_CACHE_BYTES"] = str(cache_bytes)
    log = work / f"sidecar-{name}.log"
    flags = ["--model", args.model, "--policy", policy]
    with run_sidecar(log, *flags, workers=workers, timeout=args.startup_timeout) as sidecar:
        before = scrape(sidecar.url)
        started = time.perf_counter()
        rows = asyncio.run(run_trace(sidecar.url, trace, args))
        wall = time.perf_counter() - started
        after = scrape(sidecar.url)
    held = by_label(after, "mlx_flash_prefix_cache_bytes", "tier").get("ram", 0.0)
    evicted = delta(by_label(after, EVICTED, "tier"), by_label(before, EVICTED, "tier")).get("ram", 0.0)
    reused_by = delta(by_label(after, REUSED, "worker", "tier"), by_label(before, REUSED, "worker", "tier"))
    decisions = delta(
        by_label(after, "mlx_flash_sidecar_routing_decisions_total", "policy", "branch"),
        by_label(before, "mlx_flash_sidecar_routing_decisions_total", "policy", "branch"),
    )
    reused = sum(r["cached_tokens"] for r in rows)
    prompt = sum(r["prompt_tokens"] for r in rows)
    per_worker: dict[str, int] = {}
    for r in rows:
        per_worker[str(r["worker"])] = per_worker.get(str(r["worker"]), 0) + 1
    metric_reused = sum(reused_by.values())
    print(
        f"   {name:12s} ({workers} worker{'s' if workers > 1 else ''}, {policy}, {cache_bytes >> 20} MiB"
        f" cache{' each' if workers > 1 else ''}): reused {reused} of "
        f"{prompt} prompt tokens ({reused / prompt:.1%}); /metrics says {metric_reused:.0f}; "
        f"requests by worker {per_worker}; {evicted:.0f} evictions; {wall:.1f} s",
        flush=True,
    )
    return {
        "setup": name,
        "workers": workers,
        "policy": policy,
        "prefix_cache_bytes_per_worker": cache_bytes,
        "cache_bytes_held_at_end": held,
        "ram_evictions": evicted,
        "requests": len(rows),
        "prompt_tokens": prompt,
        "reused_tokens": reused,
        "reuse_fraction": round(reused / prompt, 4),
        "metrics_reused_tokens": metric_reused,
        "metrics_reused_by_worker_tier": reused_by,
        "metrics_match": metric_reused == reused,
        "requests_by_worker": per_worker,
        "routing_decisions": decisions,
        "wall_s": round(wall, 2),
        "rows": rows,
    }


# ---------------------------------------------------------------- main


def same_worker_turns(r: dict[str, Any]) -> dict[str, Any]:
    """round_robin's turns that happened to land on the worker that served the session's previous turn,
    beside cache_aware on the same turns (same trace, same greedy replies, so the same prompts). On those
    turns round_robin finds the history where cache_aware does, so what it reuses there bounds the ratio:
    cache_aware / round_robin <= cache_aware / (round_robin's reuse on those turns)."""
    rr = {(x["session"], x["turn"]): x for x in r["round_robin"]["rows"]}
    ca = {(x["session"], x["turn"]): x for x in r["cache_aware"]["rows"]}
    later = [k for k in rr if k[1] > 0]
    same = [k for k in later if rr[k]["worker"] == rr[(k[0], k[1] - 1)]["worker"]]
    rr_same = sum(rr[k]["cached_tokens"] for k in same)
    return {
        "share_of_later_turns": round(len(same) / max(len(later), 1), 3),
        "round_robin_reused": rr_same,
        "cache_aware_reused": sum(ca[k]["cached_tokens"] for k in same if k in ca),
        "same_prompts": all(k in ca and ca[k]["prompt_tokens"] == rr[k]["prompt_tokens"] for k in rr),
        "cache_aware_over_round_robin_at_most": round(r["cache_aware"]["reused_tokens"] / max(rr_same, 1), 3),
    }


def summarize(rounds: list[dict[str, Any]], budget: int) -> dict[str, Any]:
    over_rr = [r["cache_aware"]["reused_tokens"] / max(r["round_robin"]["reused_tokens"], 1) for r in rounds]
    over_single = [r["cache_aware"]["reused_tokens"] / max(r["single"]["reused_tokens"], 1) for r in rounds]
    # What any policy could reach over round robin: all of a session's turns on one worker.
    ceiling = [r["single"]["reused_tokens"] / max(r["round_robin"]["reused_tokens"], 1) for r in rounds]
    med_rr, med_single = statistics.median(over_rr), statistics.median(over_single)
    same = [same_worker_turns(r) for r in rounds]
    consistent = all(s["metrics_match"] for r in rounds for s in r.values() if isinstance(s, dict))
    return {
        "reused_tokens": {k: [r[k]["reused_tokens"] for r in rounds] for k in SETUPS},
        "reuse_fraction": {k: statistics.median(r[k]["reuse_fraction"] for r in rounds) for k in SETUPS},
        "cache_aware_over_round_robin": [round(x, 3) for x in over_rr],
        "cache_aware_over_single": [round(x, 3) for x in over_single],
        "single_over_round_robin": [round(x, 3) for x in ceiling],
        "round_robin_same_worker": same,
        "metrics_match": consistent,
        "targets": {
            "over_round_robin": {
                "target": f"cache_aware reuse >= {TARGETS['over_round_robin']}x round_robin "
                f"({budget >> 20} MiB prefix cache per worker)",
                "value": round(med_rr, 3),
                "pass": med_rr >= TARGETS["over_round_robin"],
            },
            "over_single": {
                "target": f"cache_aware reuse >= {TARGETS['over_single']}x a single worker "
                f"({budget >> 20} MiB prefix cache per worker)",
                "value": round(med_single, 3),
                "pass": med_single >= TARGETS["over_single"],
            },
        },
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 4 sessions x 3 turns, results/quick/")
    p.add_argument("--model", default="demo", help="what the workers serve (--model of mlx-flash serve)")
    p.add_argument(
        "--workers", type=int, default=2, help="workers of the cache_aware and round_robin set-ups"
    )
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at most")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3, help="traces, each run on every set-up")
    p.add_argument(
        "--prefix-cache-bytes",
        default="4M,10M,1G",
        help="RAM prefix-cache budgets per worker, comma-separated; each is a full run, the first is the "
        "one the targets are read at",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.sessions, args.turns, args.rounds = 4, 3, 1
    args.out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    args.budgets = [parse_bytes(b) for b in args.prefix_cache_bytes.split(",") if b.strip()]
    if not args.budgets or min(args.budgets) < 1:
        p.error("--prefix-cache-bytes needs sizes > 0")
    if min(args.sessions, args.turns, args.rounds, args.concurrency) < 1 or args.workers < 2:
        p.error("need --sessions, --turns, --rounds and --concurrency >= 1, and --workers >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    result: dict[str, Any] = {
        **header("routing", args, started, omit=("budgets",)),
        "method": {
            "setups": {
                k: f"mlx-flash serve --workers {1 if k == 'single' else args.workers} --policy {p}"
                for k, p in SETUPS.items()
            },
            "requests": "POST /v1/chat/completions (not streamed), temperature 0, no session id; each turn "
            "resends the session's history",
            "reuse": "sum of usage.prompt_tokens_details.cached_tokens; cross-check: the change in the sum "
            f"of {REUSED} over workers and tiers in the sidecar's /metrics",
            "order": "set-ups alternate per round (A B C, C B A, ...); each round a new trace",
            "budgets": "each --prefix-cache-bytes budget is a full run; per worker for 2 workers, the total "
            "of those workers for the single worker",
        },
        "budgets": [],
    }
    with tempfile.TemporaryDirectory(prefix="mlxf-bench-") as tmp:
        for budget in args.budgets:
            rounds = []
            for r in range(args.rounds):
                trace = build_trace(args.sessions, args.turns, args.seed + r)
                order = list(SETUPS) if r % 2 == 0 else list(reversed(SETUPS))
                print(
                    f"== {budget >> 20} MiB per worker, round {r + 1}/{args.rounds}: {args.sessions} sessions"
                    f" x {args.turns} turns",
                    flush=True,
                )
                got = {name: run_setup(name, trace, budget, args, Path(tmp)) for name in order}
                rounds.append({"order": order, **{k: got[k] for k in SETUPS}})
            summary = summarize([{k: r[k] for k in SETUPS} for r in rounds], budget)
            result["budgets"].append({"prefix_cache_bytes": budget, "rounds": rounds, "summary": summary})
    result["summary"] = result["budgets"][0]["summary"]
    write(result, args.out, started)
    for b in result["budgets"]:
        s = b["summary"]
        print(
            f"  {b['prefix_cache_bytes'] >> 20} MiB per worker: reuse fraction (median) "
            f"{s['reuse_fraction']}; cache_aware / round_robin "
            f"{s['targets']['over_round_robin']['value']}; /metrics agrees: {s['metrics_match']}"
        )
    return 0 if all(b["summary"]["metrics_match"] for b in result["budgets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
