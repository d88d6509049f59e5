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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.1f} ms"


def _command(result: dict[str, Any]) -> str:
    """The command as someone would type it in the repository (interpreter path dropped)."""
    argv = result.get("argv")
    if isinstance(argv, list) and argv:
        return shlex.join(["python", *[str(a) for a in argv]])
    return str(result.get("command", "?"))


def _machine(m: dict[str, Any]) -> str:
    ram = f", {m['ram_gb']} GB RAM" if m.get("ram_gb") else ""
    return (
        f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores{ram}, {m.get('os', '?')}, "
        f"MLX {m.get('mlx', '?')} ({m.get('device', '?')}), mlx-lm {m.get('mlx_lm', '?')}"
    )


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
        "Greedy, through the chat API (tool calls through raw completions until tool parsing lands). "
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


RENDERERS: dict[str, Callable[[dict[str, Any], str], str]] = {
    "single_stream": single_stream,
    "demo_skills": demo_skills,
    "sidecar_overhead": sidecar_overhead,
}


def tables(results_dir: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for path in sorted(results_dir.glob("*.json")):
        result = json.loads(path.read_text())
        name = result.get("benchmark") if isinstance(result, dict) else None
        if isinstance(name, str) and name in RENDERERS:
            try:
                source = str(path.resolve().relative_to(results_dir.resolve().parent.parent))
            except ValueError:
                source = str(path)
            out[name] = RENDERERS[name](result, source)
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
