"""Multi-turn chat through the prefix cache: time to first token of a turn with a long history, cached vs
uncached, and after a restart, served from the SSD tier.

    python bench/multi_turn.py            # 2,200-token history, 4 measured turns, 2 restarts (~8 min)
    python bench/multi_turn.py --quick    # a smoke run on a tiny model, written to results/quick/

Two workers run side by side on the same random-weight model (built here, `--dense-*` flags as
single_stream.py): "cached" with the prefix cache in RAM and on disk (`--prefix-cache-dir`, a temporary
directory), "uncached" with `--prefix-cache-bytes 0`. One conversation: turn 1 sends a --history-tokens
document and a question; every later turn resends the whole history (system, document, questions and the
replies so far) plus a short question, as chat clients do. Every turn goes to both workers, alternating
which goes first (A B, B A, ...); the history grows with the cached worker's reply, and the uncached
worker must reply identically (greedy, EOS biased by -100 so replies are exactly --max-tokens long).

TTFT: request start to the first streamed text (chat /v1/chat/completions, stream: true). The ratio is
cached / uncached per turn, for turns >= 2. Then, --ssd-trials times: wait until the cached worker's
entries are on disk, stop it, start a new one on the same directory (its RAM tier empty), and send the
conversation's next turn to it and to the uncached worker: the first request after the restart must be
served from the SSD tier (cached_tokens > 0; the worker's ssd hit counter moves).

Writes bench/results/multi_turn.json; bench/report.py turns it into a README table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from mlx_lm.utils import load, load_tokenizer

from concurrency import EOS_BIAS, WORDS, prose
from results import header, write
from single_stream import add_dense_flags, build_dense, model_summary
from streams import Timed, stream

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers import Worker, run_worker  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "multi_turn.json"
QUICK_OUT = ROOT / "bench" / "results" / "quick" / "multi_turn.json"
TARGET_TTFT_RATIO = 0.15
MIN_HISTORY = 2000
SYSTEM = "You are a careful reader. Answer questions about the document the user gives you."
SIDES = ("cached", "uncached")
REUSED = "mlx_flash_prefix_cache_tokens_reused_total"
HITS = "mlx_flash_prefix_cache_hits_total"


def question(turn: int, rng: random.Random) -> str:
    a, b = rng.sample(WORDS, 2)
    return f"Question {turn}: how are the {a} and the {b} related in the document? Answer briefly."


class Conversation:
    """The messages so far; each turn adds a question, and then the reply that was given."""

    def __init__(self, document: str, seed: int) -> None:
        self.rng = random.Random(seed)
        self.turn = 1
        self.messages: list[dict[str, str]] = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Here is a document.\n\n{document}\n\n{question(1, self.rng)}"},
        ]

    def reply(self, text: str) -> None:
        self.turn += 1
        self.messages += [
            {"role": "assistant", "content": text},
            {"role": "user", "content": question(self.turn, self.rng)},
        ]


async def ask(
    client: httpx.AsyncClient, workers: dict[str, Worker], conv: Conversation, args: argparse.Namespace
) -> dict[str, Any]:
    """The conversation's current turn on both workers (alternating which goes first); adds the reply."""
    order = list(SIDES) if conv.turn % 2 else list(reversed(SIDES))
    got: dict[str, Timed] = {}
    for side in order:
        w = workers[side]
        body = {
            "model": w.model_id,
            "messages": conv.messages,
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "logit_bias": {str(e): EOS_BIAS for e in args.eos_ids},
        }
        got[side] = await stream(client, f"{w.url}/v1/chat/completions", body)
    a, b = got["cached"], got["uncached"]
    row: dict[str, Any] = {
        "turn": conv.turn,
        "order": order,
        "prompt_tokens": a.prompt_tokens,
        **{side: {"ttft_s": round(t.ttft, 4), "cached_tokens": t.cached_tokens} for side, t in got.items()},
        "ttft_ratio": round(a.ttft / b.ttft, 4),
        "same_output": a.text == b.text
        and a.completion_tokens == b.completion_tokens
        and a.prompt_tokens == b.prompt_tokens,
        "reply_preview": a.text[:60],
    }
    print(
        f"   turn {conv.turn}: {a.prompt_tokens} prompt tokens; cached {a.ttft * 1e3:8.1f} ms"
        f" ({a.cached_tokens} reused) | uncached {b.ttft * 1e3:8.1f} ms ({b.cached_tokens} reused)"
        f" | ratio {a.ttft / b.ttft:.3f} | same output {row['same_output']}",
        flush=True,
    )
    conv.reply(a.text)
    return row


def disk_entries(cache_dir: Path) -> int:
    """Complete entries on disk (the index file is written last)."""
    return sum(1 for p in cache_dir.glob("v*/*/*.json") if not p.name.startswith("."))


def wait_for_disk(cache_dir: Path, want: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while (n := disk_entries(cache_dir)) < want and time.monotonic() < deadline:
        time.sleep(0.1)
    return n


def tier_counters(w: Worker) -> dict[str, float]:
    model = w.model_id
    return {
        f"{kind}_{tier}": w.metric(name, 0.0, model=model, tier=tier)
        for kind, name in (("hits", HITS), ("tokens", REUSED))
        for tier in ("ram", "ssd")
    }


@contextlib.contextmanager
def cached_worker(model: Path, log: Path, cache_dir: Path, timeout: float) -> Iterator[Worker]:
    with run_worker(str(model), log, "--prefix-cache-dir", str(cache_dir), timeout=timeout) as w:
        yield w


async def measure(model: Path, work: Path, args: argparse.Namespace, document: str) -> dict[str, Any]:
    cache_dir = work / "prefix-cache"
    conv = Conversation(document, args.seed)
    turns, restarts = [], []
    served_by_cached = 0
    timeout = httpx.Timeout(args.request_timeout)
    with (
        run_worker(
            str(model), work / "uncached.log", "--prefix-cache-bytes", "0", timeout=args.startup_timeout
        ) as uncached,
        contextlib.ExitStack() as stack,
    ):
        cached = stack.enter_context(
            cached_worker(model, work / "cached-0.log", cache_dir, args.startup_timeout)
        )
        async with httpx.AsyncClient(timeout=timeout) as client:
            print(f"== {args.turns} turns on both workers", flush=True)
            for _ in range(args.turns):
                turns.append(await ask(client, {"cached": cached, "uncached": uncached}, conv, args))
                served_by_cached += 1
            for n in range(args.ssd_trials):
                on_disk = wait_for_disk(cache_dir, served_by_cached)
                stack.close()  # stop the cached worker: its RAM tier goes with it
                print(f"== restart {n + 1}/{args.ssd_trials}: {on_disk} entries on disk", flush=True)
                log = work / f"cached-{n + 1}.log"
                cached = stack.enter_context(cached_worker(model, log, cache_dir, args.startup_timeout))
                before = tier_counters(cached)
                row = await ask(client, {"cached": cached, "uncached": uncached}, conv, args)
                after = tier_counters(cached)
                served_by_cached += 1
                row["entries_on_disk_at_restart"] = on_disk
                row["counters"] = {k: after[k] - before[k] for k in after}
                row["from_ssd"] = row["counters"]["hits_ssd"] > 0 and row["cached"]["cached_tokens"] > 0
                restarts.append(row)
    return {"turns": turns, "restarts": restarts}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    later = [t for t in result["turns"] if t["turn"] >= 2]
    restarts = result["restarts"]
    ratio = statistics.median(t["ttft_ratio"] for t in later) if later else None
    history = min(t["prompt_tokens"] for t in later) if later else 0
    ssd_ratio = statistics.median(r["ttft_ratio"] for r in restarts) if restarts else None
    parity = all(t["same_output"] for t in [*result["turns"], *restarts])
    from_ssd = bool(restarts) and all(r["from_ssd"] for r in restarts)
    return {
        "median_ttft_ratio": ratio,
        "median_cached_ttft_s": statistics.median(t["cached"]["ttft_s"] for t in later) if later else None,
        "median_uncached_ttft_s": statistics.median(t["uncached"]["ttft_s"] for t in later)
        if later
        else None,
        "min_history_tokens": history,
        "ssd_median_ttft_ratio": ssd_ratio,
        "ssd_median_ttft_s": statistics.median(r["cached"]["ttft_s"] for r in restarts) if restarts else None,
        "ssd_median_cold_ttft_s": statistics.median(r["uncached"]["ttft_s"] for r in restarts)
        if restarts
        else None,
        "ssd_cached_tokens": [r["cached"]["cached_tokens"] for r in restarts],
        "parity": parity,
        "targets": {
            "ttft_ratio": {
                "target": f"cached TTFT <= {TARGET_TTFT_RATIO} x uncached "
                f"(turns >= 2, >= {MIN_HISTORY} tokens of history)",
                "value": ratio,
                "pass": ratio is not None and ratio <= TARGET_TTFT_RATIO and history >= MIN_HISTORY,
            },
            "ssd_after_restart": {
                "target": "first request after a restart served from the SSD tier (cached_tokens > 0)",
                "value": [r["cached"]["cached_tokens"] for r in restarts],
                "pass": from_ssd,
            },
            "parity": {
                "target": "identical greedy output cached and uncached",
                "value": parity,
                "pass": parity,
            },
        },
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="smoke run: tiny model, short history, results/quick/"
    )
    p.add_argument("--turns", type=int, default=5, help="turns before the first restart (turn 1 included)")
    p.add_argument("--history-tokens", type=int, default=2200, help="the document in turn 1")
    p.add_argument("--max-tokens", type=int, default=24, help="reply length")
    p.add_argument("--ssd-trials", type=int, default=2, help="restarts, each followed by one more turn")
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--request-timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path)
    add_dense_flags(p)
    args = p.parse_args(argv)
    if args.quick:
        args.turns, args.history_tokens, args.max_tokens, args.ssd_trials = 3, 300, 8, 1
        args.dense_hidden, args.dense_layers, args.dense_intermediate, args.dense_heads = 128, 2, 384, 2
    args.out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    if args.turns < 2 or args.max_tokens < 1 or args.ssd_trials < 0:
        p.error("need --turns >= 2, --max-tokens >= 1, --ssd-trials >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    result: dict[str, Any] = {
        **header("multi_turn", args, started, omit=("dense_dir",)),
        "method": {
            "cached": "python -m mlx_flash.worker --prefix-cache-dir DIR (RAM tier at its default budget)",
            "uncached": "python -m mlx_flash.worker --prefix-cache-bytes 0",
            "requests": "POST /v1/chat/completions, stream, temperature 0, logit_bias {eos: -100}; each turn "
            "resends the whole history; both workers get every turn, alternating which goes first",
            "ttft": "request start to the first streamed text, at an httpx client in this process",
            "restart": "wait for the disk entries, stop the cached worker, start a new one on the same "
            "directory; its first request is the conversation's next turn",
        },
    }
    with tempfile.TemporaryDirectory(prefix="mlxf-bench-") as tmp:
        work = Path(tmp)
        print("== building the model", flush=True)
        spec = build_dense(args.dense_dir or work / "dense", args)
        loaded: Any = load(str(spec.path), return_config=True)
        result["model"] = {"name": spec.name, **model_summary(loaded[0], loaded[2]), **spec.notes}
        del loaded
        tokenizer: Any = load_tokenizer(spec.path)  # type: ignore[no-untyped-call]
        args.eos_ids = sorted(int(e) for e in tokenizer.eos_token_ids)
        document = prose(random.Random(args.seed), tokenizer, args.history_tokens, "Document:")
        result.update(asyncio.run(measure(spec.path, work, args, document)))
    result["summary"] = summarize(result)
    write(result, args.out, started)
    s = result["summary"]
    return 0 if s["parity"] else 1


if __name__ == "__main__":
    sys.exit(main())
