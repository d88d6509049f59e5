"""Markdown tables for the README, generated from bench/results/*.json (never typed by hand).

    python bench/report.py                      # print every table
    python bench/report.py --write README.md    # replace the text between each table's markers

A table named NAME goes between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`; with --write, only
files that already hold both markers are changed, and the text outside them is left as it was.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


HOL_STREAMS = 4  # bench/concurrency.py's head-of-line streams


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms"


def _time(seconds: float) -> str:
    """Milliseconds under a second, seconds above (prefills on a CPU run for minutes)."""
    return _ms(seconds) if seconds < 1 else f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"


def _command(result: dict[str, Any]) -> str:
    """The command as someone would type it in the repository (interpreter path dropped)."""
    argv = result.get("argv")
    env = [f"{k}={v}" for k, v in result.get("env", {}).items()]
    if isinstance(argv, list) and argv:
        return " ".join([*env, shlex.join(["python", *[str(a) for a in argv]])])
    return str(result.get("command", "?"))


def _machine(m: dict[str, Any]) -> str:
    ram = f", {m['ram_gb']} GB RAM" if m.get("ram_gb") else ""
    return (
        f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores{ram}, {m.get('os', '?')}, "
        f"MLX {m.get('mlx', '?')} ({m.get('device', '?')}{_blas(m)}), mlx-lm {m.get('mlx_lm', '?')}"
    )


def _blas(m: dict[str, Any]) -> str:
    """Which BLAS MLX's CPU matmul used: the wheel's bundled reference BLAS unless OpenBLAS was preloaded
    (numpy's own, `libscipy_openblas64_`, serves only numpy)."""
    names = m.get("blas", [])
    if any(n.startswith("libopenblas") for n in names):
        return ", OpenBLAS"
    return ", bundled reference BLAS" if any(n.startswith("libblas") for n in names) else ""


def single_stream(result: dict[str, Any], source: str) -> str:
    rows = [
        "| model | in-process tok/s | server tok/s | ratio (server / in-process) "
        "| TTFT in-process | TTFT server |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    pairs, tokens, prompt = set(), set(), set()
    for m in result["models"]:
        ip, sv = m["in_process"], m["server"]
        c = m["config"]
        params = c["params"]
        size = f"{params / 1e6:.1f}M params" if params >= 1e6 else f"{params / 1e3:.0f}K params"
        dtype = c["dtype"] if isinstance(c["dtype"], str) else "/".join(c["dtype"])
        about = f"{c.get('model_type', '?')}, {size}, {dtype}"
        lo, hi = m.get("median_decode_ratio_ci95") or (m["min_decode_ratio"], m["max_decode_ratio"])
        ratio = (
            f"{m['median_decode_ratio']:.2f}× ({lo:.2f}–{hi:.2f})"
            if m["parity"]
            else "**greedy parity failed**"
        )
        rows.append(
            f"| {m['name']} ({about}) | {ip['median_decode_tok_s']:.1f} | {sv['median_decode_tok_s']:.1f} "
            f"| {ratio} | {_ms(ip['median_ttft_s'])} | {_ms(sv['median_ttft_s'])} |"
        )
        pairs.add(len(m["pairs"]))
        tokens.add(m["max_tokens"])
        prompt.add(m["prompt_tokens"])

    def one(values: set[int]) -> str:
        return "/".join(str(v) for v in sorted(values))

    rows.append("")
    rows.append(
        f"Medians of {one(pairs)} alternating pairs (in-process, server); {one(tokens)} greedy tokens after "
        f"a prompt of {one(prompt)} tokens, EOS suppressed; the ratio is the median of per-pair ratios "
        "(bootstrap 95% interval of that median in brackets); greedy output identical on both sides"
        + (" in every run." if all(m["parity"] for m in result["models"]) else " — **except where marked**.")
        + f" {_machine(result['machine'])}; {result.get('started', '')}."
        + f" Source: `{source}`, made by `{_command(result)}`."
    )
    return "\n".join(rows)


def demo_skills(result: dict[str, Any], source: str) -> str:
    rows = ["| task | exact answers |", "|---|---:|"]
    for name, t in result["tasks"].items():
        rows.append(f"| {name} | {t['correct']}/{t['total']} ({t['correct'] / t['total']:.0%}) |")
    rows.append("")
    rows.append(
        "Greedy, through the chat API; tool calls judged by the parsed `tool_calls` (name and arguments), "
        "the reply after the tool's result (a `role: tool` message) by its text. "
        f"{_machine(result['machine'])}; {result.get('started', '')}. "
        f"Source: `{source}`, made by `{_command(result)}`."
    )
    return "\n".join(rows)


def sidecar_overhead(result: dict[str, Any], source: str) -> str:
    lat, tp, pc, bs = result["latency"], result["throughput"], result["per_chunk"], result["burst_stream"]
    held, mem, checks = result["hold"], result["memory"], result["results"]

    def target(name: str, text: str) -> str:
        return f"{text}: {'met' if checks[name]['pass'] else '**missed**'}"

    def row(what: str, m: dict[str, float], goal: str = "") -> str:
        sides = " | ".join(f"{m[side]:.3f} ms" for side in ("direct", "bare", "sidecar"))
        return (
            f"| {what} | {sides} | {m['sidecar_minus_direct']:+.3f} ms | "
            f"{m['sidecar_minus_bare']:+.3f} ms | {goal} |"
        )

    rate = f"{lat['requested_rate']:,.0f} req/s"
    rounds = len(lat["rounds"])
    open_loop_s = rounds * 3 * float(result["settings"]["open_seconds"])
    rps = tp["median"]["requests_per_s"]
    chunks = f"{pc['chunks']:,}-chunk SSE stream"
    cpu = lat["cpu_us_per_request"]
    rows = [
        "| measurement | direct to the mock | bare proxy | through the sidecar | sidecar − direct "
        "| sidecar − bare | target (on sidecar − direct) |",
        "|---|---:|---:|---:|---:|---:|---|",
        row(
            f"latency p50, open loop at {rate}",
            lat["median"]["p50_ms"],
            target("added_p50_ms", "≤ 0.2 ms added"),
        ),
        row(
            f"latency p99, open loop at {rate}",
            lat["median"]["p99_ms"],
            target("added_p99_ms", "≤ 1 ms added"),
        ),
        f"| max throughput, closed loop, {tp['connections']} connections | {rps['direct']:,.0f} req/s "
        f"| {rps['bare']:,.0f} req/s | {rps['sidecar']:,.0f} req/s | ×{rps['sidecar_over_direct']:.2f} "
        f"| ×{rps['sidecar_over_bare']:.2f} | |",
        row(f"per-chunk trip p50, {chunks}, {pc['interval_ms']:g} ms apart", pc["median"]["trip_p50_ms"]),
        row(f"per-chunk trip p99, {chunks}, {pc['interval_ms']:g} ms apart", pc["median"]["trip_p99_ms"]),
        row(f"whole {chunks}, chunks back to back", bs["median"]["total_ms"]),
        row(
            f"first chunk of a stream (median of {result['first_chunk']['streams_per_run']} per run)",
            result["first_chunk"]["median"]["first_chunk_p50_ms"],
        ),
        f"| CPU per request at {rate} (the mock / the proxy's own process) | {cpu['mock']:.0f} µs "
        f"| {cpu['bare']:.0f} µs | {cpu['sidecar']:.0f} µs | | | |",
        f"| slow streams held open at once ({held['chunks_per_stream']} chunks, {held['interval_ms']:g} ms "
        f"apart) | | | {held['succeeded']:,} of {held['streams']:,} | | | "
        f"{target('concurrent_streams', '≥ 1,000')} |",
        f"| sidecar RSS: idle / under load / holding the streams | | | {mem['idle']['rss_mb']:.1f} / "
        f"{mem['under_load_max_rss_mb']:.1f} / {held['max_rss_mb']:.1f} MB | | | "
        f"{target('rss_holding_streams_mb', '≤ 50 MB')} |",
        "",
        f"Medians of {rounds} rounds (direct, bare proxy, sidecar, in turn) after a warm-up; the differences "
        "are medians of the per-round differences (throughput: ratios). The bare proxy (`bare-proxy`) is "
        "the sidecar's stack (axum, hyper's pooled client, TCP_NODELAY both ways, the response streamed "
        "back) with no auth, routing, metrics or parsing: bare − direct is the cost of one more hop on this "
        "machine, sidecar − bare the sidecar's own work. Mock worker, both proxies and the load generator "
        "share the machine's cores"
        f" (open loop: slowest run sent {lat['min_achieved_send_rate']:,.0f} req/s; "
        f"rate {'held' if lat['rate_sustained'] else '**not held**'}; CPU time lost to the VM host during "
        f"the latency rounds: {lat['steal_s']:.1f} CPU-s over {open_loop_s:.0f} s). "
        f"{_machine(result['machine'])}; {result.get('started', '')}. "
        f"Source: `{source}`, made by `{_command(result)}`.",
    ]
    return "\n".join(rows)


def _met(t: dict[str, Any]) -> str:
    return "n/a" if t["pass"] is None else "met" if t["pass"] else "**missed**"


def _about(m: dict[str, Any]) -> str:
    params = m["params"]
    size = f"{params / 1e6:.1f}M params" if params >= 1e6 else f"{params / 1e3:.0f}K params"
    return (
        f"{m.get('model_type', '?')} {m['hidden_size']}×{m['num_hidden_layers']} layers, {size}, {m['dtype']}"
    )


def _matmul(result: dict[str, Any]) -> str:
    g = result.get("matmul_gflops")
    if not g:
        return ""
    return (
        f" (MLX matmul here: {g['rows_1']:g} GFLOPS for one token, {g['rows_8']:g} for 8, "
        f"{g['rows_512']:g} for 512, measured in the same run)"
    )


def concurrency(result: dict[str, Any], source: str) -> str:
    s, t = result["summary"], result["summary"]["targets"]
    engine = result["engine_ceiling"]
    rows = [
        "| streams | ours tok/s | mlx_lm.server tok/s | ratio (ours / mlx_lm.server) "
        "| in-process BatchGenerator tok/s |",
        "|---:|---:|---:|---:|---:|",
    ]
    for lv in result["levels"]:
        ci = lv.get("ratio_ci95")
        ratio = f"{lv['median_ratio']:.2f}×" + (f" ({ci[0]:.2f}–{ci[1]:.2f})" if ci else "")
        ceiling = engine.get(str(lv["streams"]), {}).get("median")
        rows.append(
            f"| {lv['streams']} | {lv['median_ours_tok_s']:.1f} | {lv['median_mlx_lm_tok_s']:.1f} | {ratio} "
            f"| {'' if ceiling is None else f'{ceiling:.1f}'} |"
        )
    sc = s["scaling"]
    hol = result["head_of_line"]
    prompt = result["settings"]["hol_prompt_tokens"]
    hol_target = ""
    if hol:
        rows += [
            "",
            "| server | inter-token p99, idle | p99 during a "
            f"{prompt:,}-token prefill | during / idle | same positions without it | during / same "
            "positions | longest stall | long prompt's TTFT |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        grew = {}
        for key, name in (("ours", "ours"), ("mlx_lm", "mlx_lm.server")):
            h = hol[key]
            stall = max(float(r["during_prefill_ms"]["max"]) for r in hol["trials"][key]) / 1e3
            # Tokens each stream generated while the long prompt was read: its context grew by that much.
            grew[name] = statistics.median(
                r["during_prefill_ms"]["count"] / HOL_STREAMS for r in hol["trials"][key]
            )
            rows.append(
                f"| {name} | {_time(h['median_idle_p99_ms'] / 1e3)} "
                f"| {_time(h['median_during_p99_ms'] / 1e3)} | {h['median_p99_ratio']:.1f}× "
                f"| {_time(h['median_control_p99_ms'] / 1e3)} "
                f"| {_ratio(h['median_p99_ratio_same_positions'])} "
                f"| {stall:.1f} s | {h['median_long_ttft_s']:.1f} s |"
            )
        hol_target = (
            f"inter-token p99 during the long prefill ≤ 2× idle — {t['head_of_line']['value']:.1f}×: "
            f"{_met(t['head_of_line'])} (while it is read, each of ours' streams keeps going and generates "
            f"about {grew['ours']:,.0f} tokens, so its own decode steps slow as its context grows; "
            f"mlx_lm.server's streams wait: {grew['mlx_lm.server']:,.0f}; against the same streams at the "
            "same positions without the long prompt, ours' p99 is "
            f"{_ratio(hol['ours']['median_p99_ratio_same_positions'])}: that much is the prefill's own "
            "cost); "
        )
    trials = len(hol["trials"]["ours"]) if hol else 0
    rounds = result["settings"]["rounds"]
    rows += [
        "",
        "Targets: ours ≥ 1.0× mlx_lm.server at every level — lowest median "
        f"{t['ratio_every_level']['value']:.3f}×: {_met(t['ratio_every_level'])}; "
        f"ours@{sc['to']} / ours@{sc['from']} ≥ 3× — {sc['ours']:.2f}× (mlx_lm.server {sc['mlx_lm']:.2f}×, "
        f"the engine alone {sc['engine_in_process']:.2f}×): {_met(t['scaling'])}; "
        + hol_target
        + "greedy output identical to solo `mlx_lm.stream_generate`: "
        f"{_met(t['parity'])} (mlx_lm.server streams that departed from it: {s['mlx_lm_streams_off_solo']}).",
        "",
        f"Model: random-weight {_about(result['model'])}{_matmul(result)}. "
        "Aggregate decode tok/s = Σ(tokens − 1) / "
        f"(last token − first token, over all streams), {result['settings']['max_tokens']} greedy tokens "
        f"per stream (EOS suppressed), new prompts each round; medians of {rounds} pairs per level, the "
        "servers alternating which goes first; the ratio is the median of per-pair ratios (bootstrap 95% "
        "interval). The engine-alone column (mlx-lm's BatchGenerator in the benchmark's process) is measured "
        "after the pairs, not alternated with them. "
        + (
            f"Head-of-line: {trials} trials per server, alternating; 4 streams decoding, then a "
            f"{prompt:,}-token prompt; p99 of the streams' inter-token gaps before it arrives vs of the gaps "
            "overlapping its prefill (medians over trials); 'same positions' reruns the same 4 streams "
            "without the long prompt (same prompts, so the same greedy tokens) and takes their gaps at the "
            "positions that overlapped the prefill: the same context lengths, undisturbed. "
            if hol
            else "Head-of-line not measured in this run (--hol-trials 0). "
        )
        + "Gaps are between chunks that carry text, as a user sees them: a token with no text of its own "
        "(part of a multi-byte character) joins two gaps, on both servers alike. "
        f"Ours is `{result['method']['ours']}` with its defaults; "
        "mlx_lm.server runs with its defaults. "
        f"{_machine(result['machine'])}; {result.get('started', '')}. "
        f"Source: `{source}`, made by `{_command(result)}`.",
    ]
    return "\n".join(rows)


def _ratio(x: float) -> str:
    return f"{x:.2f}×" if x < 10 else f"{x:,.0f}×"


def multi_turn(result: dict[str, Any], source: str) -> str:
    s, t = result["summary"], result["summary"]["targets"]
    rows = [
        "| request | prompt tokens | reused (cached worker) | TTFT cached | TTFT uncached | ratio "
        "| same output |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]

    def row(what: str, r: dict[str, Any]) -> str:
        same = "yes" if r["same_output"] else "**no**"
        return (
            f"| {what} | {r['prompt_tokens']:,} | {r['cached']['cached_tokens']:,} "
            f"| {_time(r['cached']['ttft_s'])} | {_time(r['uncached']['ttft_s'])} | {r['ttft_ratio']:.3f} "
            f"| {same} |"
        )

    for r in result["turns"]:
        rows.append(row(f"turn {r['turn']}", r))
    for n, r in enumerate(result["restarts"], 1):
        ssd = int(r["counters"].get("tokens_ssd", 0))
        rows.append(row(f"turn {r['turn']}, first after restart {n} ({ssd:,} tokens from SSD)", r))
    ratio = t["ttft_ratio"]["value"]
    ssd_ratio = s["ssd_median_ttft_ratio"]
    rows += [
        "",
        f"Targets: cached TTFT ≤ 0.15× uncached on turns ≥ 2 (history ≥ 2,000 tokens; here ≥ "
        f"{s['min_history_tokens']:,}) — median {ratio:.3f}×: {_met(t['ttft_ratio'])}; the first request "
        "after a restart on the same `--prefix-cache-dir` served from the SSD tier — "
        f"{_met(t['ssd_after_restart'])} (TTFT {ssd_ratio:.3f}× cold, median); greedy output identical "
        f"cached and uncached: {_met(t['parity'])}.",
        "",
        f"Model: random-weight {_about(result['model'])}. Two workers side by side: cached (RAM tier + "
        "`--prefix-cache-dir`) and uncached (`--prefix-cache-bytes 0`); every turn resends the whole "
        "conversation to both (streamed chat completions, greedy, EOS suppressed, "
        f"{result['settings']['max_tokens']}-token replies), alternating which goes first. TTFT: request to "
        "the first streamed text. Restart: the cached worker stopped once its entries were on disk and a new "
        f"one started on the same directory. {_machine(result['machine'])}; {result.get('started', '')}. "
        f"Source: `{source}`, made by `{_command(result)}`.",
    ]
    return "\n".join(rows)


def _decisions(rounds: list[dict[str, Any]]) -> str:
    total: dict[str, float] = {}
    for r in rounds:
        for key, n in r["cache_aware"].get("routing_decisions", {}).items():
            branch = key.split("/", 1)[-1]
            total[branch] = total.get(branch, 0) + n
    return ", ".join(f"{branch} {n:,.0f}" for branch, n in sorted(total.items(), key=lambda kv: -kv[1]))


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:g} GiB"


def routing(result: dict[str, Any], source: str) -> str:
    rows = [
        "| prefix cache | set-up | requests | prompt tokens | reused tokens | reused (/metrics) | reuse "
        "| evictions | cache_aware reuse / this |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for b in result["budgets"]:
        rounds, t = b["rounds"], b["summary"]["targets"]
        for key, what in result["method"]["setups"].items():
            req = sum(r[key]["requests"] for r in rounds)
            prompt = sum(r[key]["prompt_tokens"] for r in rounds)
            reused = sum(r[key]["reused_tokens"] for r in rounds)
            metric = sum(r[key]["metrics_reused_tokens"] for r in rounds)
            evicted = sum(r[key]["ram_evictions"] for r in rounds)
            ca = sum(r["cache_aware"]["reused_tokens"] for r in rounds)
            per = rounds[0][key]["prefix_cache_bytes_per_worker"]
            cache = _mib(per) + (" each" if rounds[0][key]["workers"] > 1 else "")
            rows.append(
                f"| {cache} | {key} (`{what.removeprefix('mlx-flash ')}`) | {req:,} | {prompt:,} "
                f"| {reused:,} | {metric:,.0f} | {reused / prompt:.1%} | {evicted:,.0f} "
                f"| {ca / max(reused, 1):.2f}× |"
            )
        same = b["summary"].get("round_robin_same_worker")
        bound = ""
        if same:
            share = statistics.median(x["share_of_later_turns"] for x in same)
            rr_same = sum(x["round_robin_reused"] for x in same)
            ca_same = sum(x["cache_aware_reused"] for x in same)
            at_most = max(x["cache_aware_over_round_robin_at_most"] for x in same)
            bound = (
                f"; round_robin sent {share:.0%} of later turns to the worker of the session's previous turn "
                f"and reused {rr_same:,} tokens on them, cache_aware {ca_same:,} on the same turns, so "
                f"cache_aware / round_robin could be at most {at_most:.2f}× in any round"
            )
        notes.append(
            f"with {_mib(b['prefix_cache_bytes'])} per worker, cache_aware reuses "
            f"{t['over_round_robin']['value']:.2f}× what round_robin does and "
            f"{t['over_single']['value']:.2f}× a single worker (medians of per-round ratios){bound}"
        )
    st, first = result["settings"], result["budgets"][0]
    t = first["summary"]["targets"]
    consistent = all(b["summary"]["metrics_match"] for b in result["budgets"])
    rows += [
        "",
        f"Targets, read at {_mib(first['prefix_cache_bytes'])} per worker: cache_aware reuse ≥ 3× "
        f"round_robin — {t['over_round_robin']['value']:.2f}×: {_met(t['over_round_robin'])}; ≥ 0.9× a "
        f"single worker — {t['over_single']['value']:.2f}×: {_met(t['over_single'])}. "
        + "; ".join(notes)[:1].upper()
        + "; ".join(notes)[1:]
        + ". When a worker's cache holds every session, round_robin still finds most of each history on "
        "whichever worker saw the session last (a turn or more older). Round robin over 2 workers sends "
        "about half the turns where the session's previous turn ran, and there it finds the history as "
        "cache_aware does, at every budget: that caps cache_aware / round_robin near 2× on sessions that "
        "resend their history. "
        f"cache_aware's decisions at {_mib(first['prefix_cache_bytes'])}: {_decisions(first['rounds'])}.",
        "",
        f"Trace: {st['sessions']} chat sessions × {st['turns']} turns, {st['rounds']} rounds per budget "
        "(a new trace each, set-ups in alternating order), sessions at once with seeded think times and at "
        f"most {st['concurrency']} requests in flight; each turn resends the session's history; no session "
        f"id sent. Model `{st['model']}`. The single worker gets the 2 workers' cache memory combined. "
        "Reused tokens = Σ `usage.prompt_tokens_details.cached_tokens`; the /metrics column is the change in "
        "`mlx_flash_prefix_cache_tokens_reused_total` summed over the workers in the sidecar's /metrics"
        + (" (equal in every run)." if consistent else " (**differs**).")
        + f" {_machine(result['machine'])}; {result.get('started', '')}. "
        f"Source: `{source}`, made by `{_command(result)}`.",
    ]
    return "\n".join(rows)


def expert_policy(result: dict[str, Any], source: str) -> str:
    tr, t = result["trace"], result["summary"]["targets"]["within_5_points"]
    rows = [
        "| experts cached per layer | LRU | LFU | decay | best fixed set (hindsight) | Belady (optimum) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["replay"]:
        rows.append(
            f"| {r['capacity']} of {tr['experts_per_layer']} | {r['lru']:.1%} | {r['lfu']:.1%} "
            f"| {r['decay']:.1%} | {r['static']:.1%} | {r['belady']:.1%} |"
        )
    rows += [
        "",
        f"Target: {t['target']} — best {t['value']}: {_met(t)}. Hit rates over the demo model's routing "
        f"({tr['layers']} MoE layers, {tr['experts_per_layer']} experts, top-{tr['experts_per_token']}; "
        f"{tr['tokens']:,} tokens in {tr['passes']:,} passes, {tr['prompt_passes']} of them prompts, of "
        f"{result['settings']['conversations']} served conversations, recorded with `--expert-trace`), "
        "replayed as the pools serve it: a pass asks for its experts once, a prompt's as bulk, in groups "
        "no larger than the pool, resident experts first (a prompt touching all 8 experts must load half "
        "of them at 4 slots, "
        "whatever the policy). The best fixed set is hindsight's most-used experts per layer, held "
        "from the start and never loaded: a bound on choosing by frequency, not a reachable policy. "
        + _shuffled_control(result)
        + f"{_machine(result['machine'])}; {result.get('started', '')}. "
        f"Source: `{source}`, made by `{_command(result)}`.",
    ]
    return "\n".join(rows)


def _shuffled_control(result: dict[str, Any]) -> str:
    """The replay of the same passes in a random order: what Belady's lead is made of."""
    if "shuffled" not in result:
        return ""
    best = result["summary"]["best"]
    cells = "; ".join(
        f"{r['capacity']} slots: {best} {r[best]:.1%}, Belady {r['belady']:.1%}" for r in result["shuffled"]
    )
    return (
        f"Control: the same passes replayed in a random order ({cells}). Belady keeps its lead when there is "
        "no order to learn from, so on this routing (close to independent from pass to pass) the gap is "
        "the value of knowing the future, which no online policy has. "
    )


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def expert_streaming(result: dict[str, Any], source: str) -> str:
    s, t, b = result["summary"], result["summary"]["targets"], result["budget"]
    read = result["read"]
    rows = [
        "| measure | value | target |",
        "|---|---:|---|",
        f"| raw parallel `preadv`, cold (W) | {s['w_gb_s']:.2f} GB/s | |",
        f"| our expert store, same reads | {s['store_gb_s']:.2f} GB/s = **{s['store_over_raw']:.2f}×** raw "
        f"| ≥ 0.8×: {_met(t['store_read_vs_raw'])} |",
        f"| stock mlx-lm in the cgroup | {s['stock_in_cgroup']} | record it |",
        f"| ours in the cgroup: decode | {s['ours_streamed_tok_s']:.3f} tok/s, {b['experts_per_layer']} of "
        f"{b['of_experts_per_layer']} experts per layer | |",
        f"| ours in the cgroup: memory | RSS {_gb(s['streamed_memory']['rss_bytes'])} "
        f"(planned {_gb(s['planned_bytes'])}: other weights, expert budget, runtime) | |",
        f"| hit rate h; bytes read per token | {s['hit_rate']:.1%}; {s['bytes_read_per_token'] / 1e6:.0f} MB "
        f"(B_expert {s['b_expert_bytes'] / 1e6:.0f} MB) | |",
        f"| t_resident; t_bound; t_actual (s/token) | {s['t_resident_s']:.2f}; {s['t_bound_s']:.2f}; "
        f"{s['t_actual_s']:.2f} | |",
        f"| bound ratio t_bound / t_actual | **{s['bound_ratio']:.2f}** | ≥ 0.7: {_met(t['bound_ratio'])} |",
        f"| model that fits: ours / stock mlx-lm decode | **{s['resident_ratio']:.3f}×** "
        f"({s['ours_resident_tok_s']:.3f} vs {s['stock_tok_s']:.3f} tok/s) "
        f"| ≥ 0.97×: {_met(t['resident_vs_stock'])} |",
    ]
    for bal in s["balloons"]:
        rate = bal["rate_mib_s"]
        shrink = bal.get("shrink_after_pressure_s")
        regrow = bal.get("regrown_s_after_release")
        rows.append(
            f"| balloon of {_gb(bal['balloon_bytes'])} at {rate} MiB/s | OOM kills {bal['oom_kills']}; pools "
            f"{bal['capacity_before']} → {bal['min_capacity']} per layer"
            + (f", shrank {shrink:.1f} s after free memory fell under 20%" if shrink is not None else "")
            + (f", regrown {regrow:.1f} s after release" if regrow is not None else ", not regrown")
            + f"; tokens {'equal' if bal['parity'] else '**differ**'} "
            f"| no OOM: {_met(t[f'balloon_{rate}_no_oom'])}; "
            f"shrink ≤ 2 s: {_met(t[f'balloon_{rate}_shrink'])}; "
            f"grow back: {_met(t[f'balloon_{rate}_grow_back'])} |"
        )
    rows += [
        "",
        f"Model: {result['model']['shape']}, {_gb(result['resident_load']['streamer']['all_bytes'])} "
        f"of experts. Cgroup v1 memory limit {_gb(b['limit_bytes'])} (half the checkpoint); expert budget "
        f"{_gb(b['budget_bytes'])} beside {_gb(b['non_expert_bytes'])} of other weights. Reads: "
        f"{read['records']:,} records of {read['record_bytes'][0]:,}–{read['record_bytes'][1]:,} bytes, "
        f"queue depth {read['queue_depth']}, page cache dropped before each trial. Decode time on this CPU "
        "is dominated by compute (t_resident), so the bound ratio says little about the read path; the "
        "store ratio does. "
        f"Greedy tokens: {t['greedy_parity']['value']}. "
        f"{_machine(result['machine'])}; {result.get('started', '')}. "
        f"Source: `{source}`, made by `{_command(result)}`.",
    ]
    return "\n".join(rows)


def structured_output(result: dict[str, Any], source: str) -> str:
    libs, decode = result["libraries"], result["decode"]
    names = ("llguidance", "xgrammar")

    def features(lib: str, kind: str) -> str:
        rows = libs[lib]["bpe65536"]["features"]
        hit = [f for f, r in rows.items() if r["result"] == kind]
        return f"{len(hit)}" + (f" ({', '.join(hit)})" if hit and kind != "enforced" else "")

    def row(label: str, cell: Callable[[str], str]) -> str:
        return f"| {label} | " + " | ".join(cell(n) for n in names) + " |"

    total = len(libs["llguidance"]["bpe65536"]["features"])
    v = result["versions"]
    rows = [
        f"| | llguidance {v['llguidance']} | xgrammar {v['xgrammar']} |",
        "|---|---|---|",
        row(f"schema features enforced (of {total})", lambda n: features(n, "enforced")),
        row("refused with an error (we answer 400)", lambda n: features(n, "refused")),
        row("**compiled but not enforced**", lambda n: features(n, "ignored")),
        row("**compiled but rejecting valid documents**", lambda n: features(n, "rejects valid")),
        row("grammar compile, median", lambda n: f"{libs[n]['bpe65536']['compile_ms_median']:.2f} ms"),
        row(
            "mask + advance per token, demo vocabulary (830)",
            lambda n: f"{libs[n]['demo']['mask_us_per_token_median']:.1f} µs",
        ),
        row(
            "mask + advance per token, 65,536-token BPE",
            lambda n: f"{libs[n]['bpe65536']['mask_us_per_token_median']:.1f} µs",
        ),
        row(
            "demo model greedy decode, held to a schema / free",
            lambda n: f"{decode[n]['ratio_to_free']:.2f}× ({decode[n]['tokens_per_second']:.0f} tok/s)",
        ),
        row("extra runtime dependencies", lambda n: "none" if n == "llguidance" else "PyTorch"),
        "",
        f"Free decode: {decode['none']['tokens_per_second']:.0f} tok/s. Coverage is measured: per feature a "
        "valid document must be accepted and an invalid one rejected, token by token. "
        f"{_machine(result['machine'])}; {result.get('started', '')}. "
        f"Source: `{source}`, made by `{_command(result)}`.",
    ]
    return "\n".join(rows)


RENDERERS: dict[str, Callable[[dict[str, Any], str], str]] = {
    "structured_output": structured_output,
    "single_stream": single_stream,
    "demo_skills": demo_skills,
    "sidecar_overhead": sidecar_overhead,
    "concurrency": concurrency,
    "multi_turn": multi_turn,
    "routing": routing,
    "expert_policy": expert_policy,
    "expert_streaming": expert_streaming,
}


def tables(results_dir: Path) -> dict[str, str]:
    """Per results file, its table, named by the file's stem (README markers `bench:STEM`): a benchmark
    may have several files, e.g. runs on two BLAS libraries."""
    out: dict[str, str] = {}
    for path in sorted(results_dir.glob("*.json")):
        result = json.loads(path.read_text())
        name = result.get("benchmark") if isinstance(result, dict) else None
        if isinstance(name, str) and name in RENDERERS:
            try:
                source = str(path.resolve().relative_to(results_dir.resolve().parent.parent))
            except ValueError:
                source = str(path)
            out[path.stem] = RENDERERS[name](result, source)
    return out


def replace_between_markers(text: str, name: str, table: str) -> str | None:
    """`text` with the part between NAME's markers replaced by `table`; None if the markers are absent."""
    pattern = re.compile(
        rf"(<!-- bench:{re.escape(name)} -->)(.*?)(<!-- /bench:{re.escape(name)} -->)", re.DOTALL
    )
    if not pattern.search(text):
        return None
    return pattern.sub(lambda m: f"{m.group(1)}\n{table}\n{m.group(3)}", text, count=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS, help="directory of result JSON files")
    p.add_argument("--write", type=Path, metavar="FILE", help="replace the tables between markers in FILE")
    args = p.parse_args(argv)
    found = tables(args.results)
    if not found:
        print(f"no known benchmark results in {args.results}", file=sys.stderr)
        return 1
    if args.write is None:
        for name, table in found.items():
            print(f"<!-- bench:{name} -->\n{table}\n<!-- /bench:{name} -->\n")
        return 0
    text = args.write.read_text()
    replaced = []
    for name, table in found.items():
        new = replace_between_markers(text, name, table)
        if new is None:
            print(f"{args.write}: no <!-- bench:{name} --> markers; left as is", file=sys.stderr)
        else:
            text = new
            replaced.append(name)
    if not replaced:
        return 1
    args.write.write_text(text)
    print(f"{args.write}: updated {', '.join(replaced)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
