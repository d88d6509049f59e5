"""Concurrent streams against `mlx_lm.server`: aggregate decode speed at 1-8 streams, and head-of-line
blocking of running streams by a long prompt.

    python bench/concurrency.py            # levels 1,2,4,8 x 3 rounds, 2 head-of-line trials (~40 min here)
    python bench/concurrency.py --quick    # a smoke run on a tiny model (~1 min), written to results/quick/

Both servers run at once on the same random-weight model, built here (`--dense-*` flags, as
single_stream.py): ours is `mlx-flash serve --workers 1` (`--ours worker`: a worker without the sidecar),
the peer `python -m mlx_lm.server` with its defaults. Requests are raw-prompt `POST /v1/completions`,
greedy, with EOS biased by -100 so every stream generates exactly --max-tokens tokens; each round uses
new prompts, so neither server's prompt cache serves them.

(a) Throughput. For each level N in --levels, N streams start together; aggregate decode tok/s is
    sum(completion tokens - 1) / (last token of any stream - first token of any stream). Per level, the two
    servers alternate in pairs (A B, B A, ...); each pair gives one ratio ours / mlx_lm.server. Greedy
    parity: the same prompt must give the same text and token count on both servers.
(b) Head-of-line. 4 streams decode; after each has produced --hol-idle-gaps inter-token gaps (after 4
    warm-up tokens), a --hol-prompt-tokens prompt arrives. Inter-token gaps of the 4 streams are split
    into idle (before it arrives) and during its prefill (a gap overlapping [arrival, its first token]);
    the measure is p99(during) / p99(idle) per trial, trials alternating servers.

Writes bench/results/concurrency.json; bench/report.py turns it into a README table.
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
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import mlx.core as mx
from mlx_lm.generate import BatchGenerator, stream_generate
from mlx_lm.sample_utils import make_logits_processors
from mlx_lm.utils import load

from processes import free_port, start, stop, wait_ready
from results import header, write
from single_stream import (
    add_dense_flags,
    bootstrap_ci,
    build_dense,
    encode,
    model_summary,
    run_in_process,
)
from streams import Timed, percentiles_ms, stream

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers import leading_space, run_sidecar, run_worker  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "concurrency.json"
QUICK_OUT = ROOT / "bench" / "results" / "quick" / "concurrency.json"
TARGETS = {"ratio_every_level": 1.0, "scaling_8_over_1": 3.0, "hol_p99_over_idle": 2.0}
EOS_BIAS = -100.0
HOL_STREAMS = 4
HOL_WARM_TOKENS = 4  # the first tokens of a stream still overlap other streams' prefill
WORDS = (
    "river mountain winter garden library engine harbor lantern market orchard signal thunder village "
    "window bridge candle forest marble letter shadow silver meadow pocket rocket planet violin ladder "
    "anchor castle desert island kettle mirror needle palace saddle temple tunnel wagon yellow copper "
    "quiet brave gentle rapid hollow bright distant golden humble narrow patient restless sudden"
).split()


# ---------------------------------------------------------------- prompts


def prose(rng: random.Random, tokenizer: Any, tokens: int, head: str) -> str:
    """`head` then random words, cut to about `tokens` tokens (as this tokenizer counts them)."""
    words = [head]
    while len(tokenizer.encode(" ".join(words))) < tokens:
        words.extend(rng.choice(WORDS) for _ in range(20))
    while len(words) > 1 and len(tokenizer.encode(" ".join(words))) > tokens:
        words.pop()
    return " ".join(words)


def stream_prompts(tag: str, n: int, seed: int) -> list[str]:
    """`n` short prompts that share nothing with any other tag's: no prefix-cache hits across runs."""
    rng = random.Random(f"{seed}:{tag}")
    return [
        f"[{tag}/{i}] Story: " + " ".join(rng.choice(WORDS) for _ in range(12)) + ". Once upon a time"
        for i in range(n)
    ]


# ---------------------------------------------------------------- servers


@dataclass
class Endpoint:
    name: str
    url: str  # .../v1/completions
    model: str | None  # the `model` field to send (mlx_lm.server: none, its --model)

    def body(self, prompt: str, max_tokens: int, eos_ids: list[int]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "logit_bias": {str(e): EOS_BIAS for e in eos_ids},
        }
        if self.model is not None:
            body["model"] = self.model
        return body


@contextlib.contextmanager
def ours(kind: str, model: Path, logs: Path, timeout: float) -> Iterator[Endpoint]:
    if kind == "worker":
        with run_worker(str(model), logs / "worker.log", timeout=timeout) as w:
            yield Endpoint("ours", f"{w.url}/v1/completions", w.model_id)
        return
    with run_sidecar(logs / "sidecar.log", "--model", str(model), workers=1, timeout=timeout) as s:
        model_id = httpx.get(f"{s.url}/v1/models", timeout=10).json()["data"][0]["id"]
        yield Endpoint("ours", f"{s.url}/v1/completions", str(model_id))


@contextlib.contextmanager
def mlx_lm_server(model: Path, timeout: float) -> Iterator[Endpoint]:
    port = free_port()
    argv = [sys.executable, "-m", "mlx_lm.server", "--model", str(model), "--port", str(port)]
    server = start("mlx_lm.server", argv, f"port:{port}")
    try:
        wait_ready(server.url, timeout, path="/health")
        yield Endpoint("mlx_lm.server", f"{server.url}/v1/completions", None)
    finally:
        stop(server)


# ---------------------------------------------------------------- (a) throughput


async def level_run(
    client: httpx.AsyncClient, ep: Endpoint, prompts: list[str], max_tokens: int, eos_ids: list[int]
) -> dict[str, Any]:
    runs = await asyncio.gather(*(stream(client, ep.url, ep.body(p, max_tokens, eos_ids)) for p in prompts))
    first = min(r.chunks[0] for r in runs)
    last = max(r.chunks[-1] for r in runs)
    decoded = sum(r.completion_tokens - 1 for r in runs)
    gaps = [b - a for r in runs for a, b in r.gaps()]
    return {
        "decode_tok_s": round(decoded / (last - first), 3),
        "window_s": round(last - first, 4),
        # Counted from the requests' start: not inflated if a server delivers tokens in bursts.
        "end_to_end_tok_s": round(
            sum(r.completion_tokens for r in runs) / (last - min(r.start for r in runs)), 3
        ),
        "tokens": [r.completion_tokens for r in runs],
        "prompt_tokens": [r.prompt_tokens for r in runs],
        "ttft_s": [round(r.ttft, 4) for r in runs],
        "inter_token_ms": percentiles_ms(gaps),
        "texts": [r.text for r in runs],
    }


@dataclass
class Reference:
    """The in-process engine: greedy parity's arbiter (solo `mlx_lm.stream_generate`) and the batching
    ceiling (mlx-lm's `BatchGenerator` with no server around it)."""

    model: Any
    tokenizer: Any
    eos_ids: list[int]

    def solo(self, prompt: str, max_tokens: int) -> str:
        ids = encode(self.tokenizer, prompt)
        return run_in_process(self.model, self.tokenizer, ids, max_tokens, self.eos_ids).text

    def leading(self, prompt: str) -> str:
        """The space a completion of `prompt` starts with, if its first greedy token has one."""
        ids = mx.array(encode(self.tokenizer, prompt))
        bias = make_logits_processors(logit_bias={e: EOS_BIAS for e in self.eos_ids})
        first = next(stream_generate(self.model, self.tokenizer, ids, max_tokens=1, logits_processors=bias))
        return leading_space(self.tokenizer, first.token)

    def batched_tok_s(self, prompts: list[str], max_tokens: int, prefill_step: int) -> float:
        """Aggregate decode tok/s of `prompts` in one BatchGenerator, timed as the servers are."""
        gen = BatchGenerator(self.model, prefill_step_size=prefill_step)
        bias = {e: EOS_BIAS for e in self.eos_ids}
        gen.insert(
            [encode(self.tokenizer, p) for p in prompts],
            max_tokens=[max_tokens] * len(prompts),
            logits_processors=[make_logits_processors(logit_bias=bias) for _ in prompts],
        )
        first, last, tokens, done = 0.0, 0.0, 0, 0
        try:
            while done < len(prompts):
                _, responses = gen.next()  # type: ignore[no-untyped-call]
                if responses:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    tokens += len(responses)
                    done += sum(r.finish_reason is not None for r in responses)
        finally:
            gen.close()  # type: ignore[no-untyped-call]
        return (tokens - len(prompts)) / (last - first)


async def throughput(
    client: httpx.AsyncClient,
    eps: dict[str, Endpoint],
    args: argparse.Namespace,
    eos_ids: list[int],
    ref: Reference,
) -> list[dict[str, Any]]:
    out = []
    for level in args.level_list:
        pairs = []
        for r in range(args.rounds):
            prompts = stream_prompts(f"L{level}R{r}", level, args.seed)
            order = ["ours", "mlx_lm"] if r % 2 == 0 else ["mlx_lm", "ours"]
            got = {k: await level_run(client, eps[k], prompts, args.max_tokens, eos_ids) for k in order}
            # mlx_lm.server drops a first token's leading space (mlx-lm's detokenizer starts a text
            # without one); ours keeps it in a completion. Compared as continuations of the prompts (texts
            # that already agree had no such space):
            peer = {
                **got["mlx_lm"],
                "texts": [
                    t if t == ours else ref.leading(p) + t
                    for p, t, ours in zip(prompts, got["mlx_lm"]["texts"], got["ours"]["texts"], strict=True)
                ],
            }
            problems = parity(got["ours"], peer, args.max_tokens)
            checked = arbitrate(ref, prompts, {"ours": got["ours"], "mlx_lm": peer}, args)
            ratio = got["ours"]["decode_tok_s"] / got["mlx_lm"]["decode_tok_s"]
            pairs.append(
                {
                    "order": order,
                    **got,
                    "ratio": round(ratio, 4),
                    "parity_problems": problems,
                    "against_solo": checked,
                }
            )
            off = [f"{c['server']} stream {c['stream']} != solo" for c in checked if not c["matches_solo"]]
            print(
                f"   {level} streams, round {r + 1}/{args.rounds}: ours {got['ours']['decode_tok_s']:7.1f}"
                f" tok/s | mlx_lm.server {got['mlx_lm']['decode_tok_s']:7.1f} tok/s | ratio {ratio:.3f}"
                f"{'' if not problems else ' | differ: ' + '; '.join(problems)}"
                f"{'' if not off else ' | ' + '; '.join(off)}",
                flush=True,
            )
        ratios = [p["ratio"] for p in pairs]
        out.append(
            {
                "streams": level,
                "pairs": pairs,
                "median_ours_tok_s": round(statistics.median(p["ours"]["decode_tok_s"] for p in pairs), 3),
                "median_mlx_lm_tok_s": round(
                    statistics.median(p["mlx_lm"]["decode_tok_s"] for p in pairs), 3
                ),
                "median_ratio": round(statistics.median(ratios), 4),
                "ratio_ci95": bootstrap_ci(ratios) if len(ratios) > 1 else None,
                "parity": not any(p["parity_problems"] for p in pairs),
                "ours_matches_solo": all(
                    c["matches_solo"] for p in pairs for c in p["against_solo"] if c["server"] == "ours"
                )
                and not any("ours:" in x for p in pairs for x in p["parity_problems"]),
                "mlx_lm_streams_off_solo": sum(
                    not c["matches_solo"] for p in pairs for c in p["against_solo"] if c["server"] == "mlx_lm"
                ),
            }
        )
    return out


def arbitrate(
    ref: Reference, prompts: list[str], got: dict[str, dict[str, Any]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Each server's text against solo in-process generation: for every stream with --reference all,
    else only where the two servers disagree (agreeing independent implementations are taken as right)."""
    out = []
    for i, prompt in enumerate(prompts):
        texts = {k: got[k]["texts"][i] for k in ("ours", "mlx_lm")}
        if args.reference != "all" and texts["ours"] == texts["mlx_lm"]:
            continue
        solo = ref.solo(prompt, args.max_tokens)
        out += [{"stream": i, "server": k, "matches_solo": t == solo} for k, t in texts.items()]
    return out


def parity(a: dict[str, Any], b: dict[str, Any], max_tokens: int) -> list[str]:
    problems = []
    for i, (ta, tb) in enumerate(zip(a["texts"], b["texts"], strict=True)):
        if ta != tb:
            at = next(
                (k for k, (x, y) in enumerate(zip(ta, tb, strict=False)) if x != y), min(len(ta), len(tb))
            )
            problems.append(f"stream {i}: text differs from char {at}")
    for side, run in (("ours", a), ("mlx_lm", b)):
        if any(n != max_tokens for n in run["tokens"]):
            problems.append(f"{side}: token counts {run['tokens']}, not {max_tokens}")
    if a["prompt_tokens"] != b["prompt_tokens"]:
        problems.append(f"prompt tokens differ: {a['prompt_tokens']} vs {b['prompt_tokens']}")
    return problems


# ---------------------------------------------------------------- (b) head-of-line


async def _until(what: str, timeout: float, done: Any, tasks: list[asyncio.Task[Timed]]) -> None:
    """Poll `done()` every 5 ms; fail early if a request ended (an error, or a stream ran out)."""
    deadline = time.perf_counter() + timeout
    while not done():
        for t in tasks:
            if t.done():
                t.result()  # raises the request's error, if any
                raise RuntimeError(f"{what}: a request ended first")
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running(tasks: list[asyncio.Task[Timed]]) -> AsyncIterator[None]:
    """Cancel (close the connections of) whatever is still running on the way out."""
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def hol_trial(
    client: httpx.AsyncClient,
    ep: Endpoint,
    tag: str,
    long_prompt: str,
    args: argparse.Namespace,
    eos: list[int],
) -> dict[str, Any]:
    prompts = stream_prompts(tag, HOL_STREAMS, args.seed)
    timed = [Timed() for _ in prompts]
    body = [ep.body(p, args.hol_stream_tokens, eos) for p in prompts]
    tasks = [asyncio.create_task(stream(client, ep.url, b, into=t)) for b, t in zip(body, timed, strict=True)]
    long = Timed()
    async with running(tasks):
        need = HOL_WARM_TOKENS + args.hol_idle_gaps + 1
        await _until("idle phase", args.hol_timeout, lambda: all(len(t.chunks) >= need for t in timed), tasks)
        sent = time.perf_counter()
        long_task = asyncio.create_task(stream(client, ep.url, ep.body(long_prompt, 4, eos), into=long))
        async with running([long_task]):
            await _until(
                "long prompt's first token", args.hol_timeout, lambda: bool(long.chunks), [*tasks, long_task]
            )
            first = long.chunks[0]
            # Two more tokens each: the gap that straddles the prefill's end is complete. The long
            # request may finish meanwhile (it asks for 4 tokens); only the streams must not.
            await _until(
                "after the prefill",
                args.hol_timeout,
                lambda: all(sum(c > first for c in t.chunks) >= 2 for t in timed),
                tasks,
            )
            await long_task
    idle, during, after = [], [], []
    positions: list[list[int]] = []  # per stream, the gaps that overlapped the prefill
    for t in timed:
        positions.append([])
        for i, (a, b) in enumerate(t.gaps()):
            if i + 1 < HOL_WARM_TOKENS:
                continue
            if b <= sent:
                idle.append(b - a)
            elif a < first:
                during.append(b - a)
                positions[-1].append(i)
            else:
                after.append(b - a)
    control = await hol_control(client, ep, tag, args, eos, positions)
    idle_ms, during_ms, control_ms = percentiles_ms(idle), percentiles_ms(during), percentiles_ms(control)
    ratio = float(during_ms["p99"]) / float(idle_ms["p99"])
    same = float(during_ms["p99"]) / float(control_ms["p99"])
    print(
        f"   {ep.name}: idle p99 {idle_ms['p99']:.1f} ms, during prefill p99 {during_ms['p99']:.1f} ms"
        f" ({during_ms['count']} gaps) -> {ratio:.1f}x; the same positions without the long prompt"
        f" {control_ms['p99']:.1f} ms -> {same:.2f}x; long prompt {long.prompt_tokens} tokens,"
        f" TTFT {long.chunks[0] - sent:.1f} s",
        flush=True,
    )
    return {
        "server": ep.name,
        "long_prompt_tokens": long.prompt_tokens,
        "long_cached_tokens": long.cached_tokens,
        "long_ttft_s": round(first - sent, 4),
        "idle_ms": idle_ms,
        "during_prefill_ms": during_ms,
        "after_ms": percentiles_ms(after),
        "control_same_positions_ms": control_ms,
        "p99_ratio": round(ratio, 3),
        "p99_ratio_same_positions": round(same, 3),
        "streams": [
            {"sent_s": round(sent - t.start, 5), "first_long_s": round(first - t.start, 5), **t.sample()}
            for t in timed
        ],
    }


async def hol_control(
    client: httpx.AsyncClient,
    ep: Endpoint,
    tag: str,
    args: argparse.Namespace,
    eos: list[int],
    positions: list[list[int]],
) -> list[float]:
    """The trial's streams again with no long prompt: the same prompts, so greedy decoding gives the
    same tokens, and their gaps at the positions that overlapped the prefill are the same streams at
    the same context lengths, undisturbed (the trial's streams grow their context while it is read)."""
    prompts = stream_prompts(tag, HOL_STREAMS, args.seed)
    timed = [Timed() for _ in prompts]
    body = [ep.body(p, args.hol_stream_tokens, eos) for p in prompts]
    tasks = [asyncio.create_task(stream(client, ep.url, b, into=t)) for b, t in zip(body, timed, strict=True)]
    need = [max(ix, default=0) + 2 for ix in positions]
    async with running(tasks):
        await _until(
            "control streams",
            args.hol_timeout,
            lambda: all(len(t.chunks) >= n for t, n in zip(timed, need, strict=True)),
            tasks,
        )
    gaps = [[b - a for a, b in t.gaps()] for t in timed]
    return [g[i] for g, ix in zip(gaps, positions, strict=True) for i in ix]


async def head_of_line(
    client: httpx.AsyncClient,
    eps: dict[str, Endpoint],
    args: argparse.Namespace,
    tokenizer: Any,
    eos: list[int],
) -> dict[str, Any]:
    trials: dict[str, list[dict[str, Any]]] = {"ours": [], "mlx_lm": []}
    for n in range(args.hol_trials):
        order = ["ours", "mlx_lm"] if n % 2 == 0 else ["mlx_lm", "ours"]
        for key in order:
            tag = f"HOL{n}-{key}"
            long_prompt = prose(
                random.Random(f"{args.seed}:{tag}"), tokenizer, args.hol_prompt_tokens, f"[{tag}]"
            )
            trials[key].append(await hol_trial(client, eps[key], tag, long_prompt, args, eos))
            await asyncio.sleep(1.0)  # abandoned streams leave the batch at their next token
    out: dict[str, Any] = {"trials": trials}
    for key, runs in trials.items():
        out[key] = {
            "median_idle_p99_ms": round(statistics.median(float(r["idle_ms"]["p99"]) for r in runs), 3),
            "median_during_p99_ms": round(
                statistics.median(float(r["during_prefill_ms"]["p99"]) for r in runs), 3
            ),
            "median_p99_ratio": round(statistics.median(r["p99_ratio"] for r in runs), 3),
            "median_long_ttft_s": round(statistics.median(r["long_ttft_s"] for r in runs), 3),
            "median_control_p99_ms": round(
                statistics.median(float(r["control_same_positions_ms"]["p99"]) for r in runs), 3
            ),
            "median_p99_ratio_same_positions": round(
                statistics.median(r["p99_ratio_same_positions"] for r in runs), 3
            ),
        }
    return out


# ---------------------------------------------------------------- main


def matmul_gflops(dtype: str) -> dict[str, float]:
    """MLX's matmul speed here, by rows (tokens) against a 3072 x 1024 weight (a 0.6B model's MLP shape):
    what model sizes this machine can run, and the most batching can gain on it."""
    w = mx.random.normal((3072, 1024)).astype(getattr(mx, dtype))
    out = {}
    for rows in (1, 8, 512):
        x = mx.random.normal((rows, 1024)).astype(w.dtype)
        mx.eval(w, x, x @ w.T)
        n = 20 if rows < 512 else 3
        started = time.perf_counter()
        for _ in range(n):
            mx.eval(x @ w.T)
        seconds = (time.perf_counter() - started) / n
        out[f"rows_{rows}"] = round(2 * rows * w.size / seconds / 1e9, 2)
    return out


def ceiling(ref: Reference, args: argparse.Namespace) -> dict[str, Any]:
    """In-process BatchGenerator at the lowest and highest level: what batching gives on this machine."""
    out: dict[str, Any] = {}
    for level in sorted({min(args.level_list), max(args.level_list)}):
        runs = [
            ref.batched_tok_s(stream_prompts(f"CEIL{level}R{r}", level, args.seed), args.max_tokens, 512)
            for r in range(args.rounds)
        ]
        out[str(level)] = {
            "decode_tok_s": [round(x, 3) for x in runs],
            "median": round(statistics.median(runs), 3),
        }
        print(
            f"   in-process BatchGenerator, {level} streams: {statistics.median(runs):.1f} tok/s", flush=True
        )
    return out


async def measure(eps: dict[str, Endpoint], args: argparse.Namespace, ref: Reference) -> dict[str, Any]:
    tokenizer, eos = ref.tokenizer, ref.eos_ids
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(args.hol_timeout * 2), limits=httpx.Limits()
    ) as client:
        print("== warm-up", flush=True)
        for key in ("ours", "mlx_lm"):
            await level_run(client, eps[key], stream_prompts(f"warm-{key}", 2, args.seed), 8, eos)
        print("== (a) aggregate decode tok/s", flush=True)
        levels = await throughput(client, eps, args, eos, ref)
        print("== the engine alone (no server): batching ceiling", flush=True)
        engine = ceiling(ref, args)
        hol = None  # --hol-trials 0: throughput only
        if args.hol_trials:
            print(
                f"== (b) head-of-line: {HOL_STREAMS} streams, a {args.hol_prompt_tokens}-token prompt",
                flush=True,
            )
            hol = await head_of_line(client, eps, args, tokenizer, eos)
    return {"levels": levels, "engine_ceiling": engine, "head_of_line": hol}


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    levels = {lv["streams"]: lv for lv in result["levels"]}
    hol = result["head_of_line"]
    low, high = min(levels), max(levels)
    scaling = levels[high]["median_ours_tok_s"] / levels[low]["median_ours_tok_s"]
    peer_scaling = levels[high]["median_mlx_lm_tok_s"] / levels[low]["median_mlx_lm_tok_s"]
    worst = min(lv["median_ratio"] for lv in levels.values())
    engine = result["engine_ceiling"]
    engine_scaling = engine[str(high)]["median"] / engine[str(low)]["median"]
    parity = all(lv["ours_matches_solo"] for lv in levels.values())
    out: dict[str, Any] = {
        "ratio_by_streams": {str(n): lv["median_ratio"] for n, lv in levels.items()},
        "ours_tok_s_by_streams": {str(n): lv["median_ours_tok_s"] for n, lv in levels.items()},
        "mlx_lm_tok_s_by_streams": {str(n): lv["median_mlx_lm_tok_s"] for n, lv in levels.items()},
        "scaling": {
            "from": low,
            "to": high,
            "ours": round(scaling, 3),
            "mlx_lm": round(peer_scaling, 3),
            "engine_in_process": round(engine_scaling, 3),
        },
        # Ours against solo generation (see arbitrate); the peer's departures are counted, not failed.
        "parity": parity,
        "pairs_where_servers_differ": sum(
            bool(p["parity_problems"]) for lv in levels.values() for p in lv["pairs"]
        ),
        "mlx_lm_streams_off_solo": sum(lv["mlx_lm_streams_off_solo"] for lv in levels.values()),
        "targets": {
            "ratio_every_level": {
                "target": f">= {TARGETS['ratio_every_level']} at every level",
                "value": worst,
                "pass": worst >= TARGETS["ratio_every_level"],
            },
            "scaling": {
                "target": f"ours@{high} / ours@{low} >= {TARGETS['scaling_8_over_1']}",
                "value": round(scaling, 3),
                "pass": scaling >= TARGETS["scaling_8_over_1"] and (low, high) == (1, 8),
            },
            "parity": {
                "target": "ours: greedy output identical to solo mlx_lm.stream_generate",
                "value": parity,
                "pass": parity,
            },
        },
    }
    if hol:
        out["hol_p99_ratio"] = {k: hol[k]["median_p99_ratio"] for k in ("ours", "mlx_lm")}
        out["hol_p99_ratio_same_positions"] = {
            k: hol[k]["median_p99_ratio_same_positions"] for k in ("ours", "mlx_lm")
        }
        out["targets"]["head_of_line"] = {
            "target": f"ours p99 during prefill <= {TARGETS['hol_p99_over_idle']}x idle p99",
            "value": hol["ours"]["median_p99_ratio"],
            "pass": hol["ours"]["median_p99_ratio"] <= TARGETS["hol_p99_over_idle"],
        }
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, few tokens, results/quick/")
    p.add_argument(
        "--ours", choices=["serve", "worker"], default="serve", help="sidecar + 1 worker, or a worker"
    )
    p.add_argument("--levels", default="1,2,4,8", help="concurrent streams per level")
    p.add_argument("--rounds", type=int, default=3, help="A B pairs per level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--hol-prompt-tokens", type=int, default=4000)
    p.add_argument("--hol-trials", type=int, default=2, help="head-of-line trials per server")
    p.add_argument("--hol-idle-gaps", type=int, default=24, help="idle inter-token gaps per stream")
    p.add_argument(
        "--hol-stream-tokens",
        type=int,
        default=6000,
        help="max_tokens of the 4 streams: they must outlast the long prompt's prefill",
    )
    p.add_argument("--hol-timeout", type=float, default=1800.0)
    p.add_argument(
        "--reference",
        choices=["disagreements", "all"],
        default="disagreements",
        help="which streams to check against solo in-process generation (all: slower)",
    )
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--out", type=Path)
    add_dense_flags(p)
    p.set_defaults(dense_context=8192)  # room for the head-of-line streams
    args = p.parse_args(argv)
    if args.quick:
        # Tiny everything: checks the machinery end to end, measures nothing worth keeping.
        args.levels, args.rounds, args.max_tokens = "1,2", 1, 16
        args.hol_prompt_tokens, args.hol_trials, args.hol_idle_gaps = 600, 1, 6
        args.dense_hidden, args.dense_layers, args.dense_intermediate, args.dense_heads = 128, 2, 384, 2
    args.out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    args.level_list = sorted({int(x) for x in args.levels.split(",") if x.strip()})
    if not args.level_list or min(args.level_list) < 1 or args.rounds < 1 or args.max_tokens < 2:
        p.error("need levels >= 1, --rounds >= 1, --max-tokens >= 2")
    if max(args.hol_prompt_tokens, args.hol_stream_tokens) + 64 > args.dense_context:
        p.error("--hol-prompt-tokens and --hol-stream-tokens must fit --dense-context")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    result: dict[str, Any] = {
        **header("concurrency", args, started, omit=("dense_dir", "level_list")),
        "matmul_gflops": matmul_gflops(args.dense_dtype),
        "method": {
            "ours": "mlx-flash serve --workers 1" if args.ours == "serve" else "python -m mlx_flash.worker",
            "peer": "python -m mlx_lm.server --model PATH --port N (defaults: prefill step 2048, decode "
            "concurrency 32; ours: defaults, prefill step 512 and while streams decode chunks sized to "
            "about one decode step (--prefill-budget 1), batch 32)",
            "requests": "POST /v1/completions, stream, temperature 0, logit_bias {eos: -100}, new prompts "
            "each round",
            "decode_tok_s": "sum(completion tokens - 1) / (last token of any stream - first of any stream)",
            "pairs": "per level, rounds alternate which server goes first (A B, B A, ...)",
            "head_of_line": f"{HOL_STREAMS} streams; idle gaps from token {HOL_WARM_TOKENS} until the "
            "long prompt is sent; 'during' = gaps overlapping [sent, long prompt's first token]; "
            "'same positions' = the same 4 streams rerun without the long prompt, their gaps at the "
            "positions that overlapped it (same tokens, same context lengths); p99 nearest rank",
            "client": "one asyncio httpx client in this process, on the same cores as the servers",
        },
    }
    with tempfile.TemporaryDirectory(prefix="mlxf-bench-") as tmp:
        work = Path(tmp)
        print("== building the model", flush=True)
        spec = build_dense(args.dense_dir or work / "dense", args)
        loaded: Any = load(str(spec.path), return_config=True)
        model, tokenizer, config = loaded
        result["model"] = {"name": spec.name, **model_summary(model, config), **spec.notes}
        ref = Reference(model, tokenizer, sorted(int(e) for e in tokenizer.eos_token_ids))
        with (
            mlx_lm_server(spec.path, args.startup_timeout) as peer,
            ours(args.ours, spec.path, work, args.startup_timeout) as mine,
        ):
            result.update(asyncio.run(measure({"ours": mine, "mlx_lm": peer}, args, ref)))
    result["summary"] = summarize(result)
    write(result, args.out, started)
    s = result["summary"]
    print(
        f"  ratio ours / mlx_lm.server by streams: {s['ratio_by_streams']}; ours = solo: {s['parity']};"
        f" mlx_lm.server streams off solo: {s['mlx_lm_streams_off_solo']}"
    )
    print(f"  scaling {s['scaling']}; head-of-line p99 during / idle: {s.get('hol_p99_ratio', 'not run')}")
    return 0 if s["parity"] else 1


if __name__ == "__main__":
    sys.exit(main())
