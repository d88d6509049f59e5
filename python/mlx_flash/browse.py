"""`mlx-flash browse`: which common MLX models fit this machine.

Each model of models/catalogue.toml (the 4-bit conversions behind the built-in aliases) is sized with
`fit` (mlx_flash/fit.py holds the math) against this machine's available memory, with a KV cache for
`--context` tokens; the disk's read bandwidth and the memory's, measured here, bound what expert
streaming can do (PERF.md's bound; the math in `mlx-flash fit --help`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import tomllib

from mlx_flash import _native
from mlx_flash.fit import Fit, disk_bandwidth, fit, memory_bandwidth, model_dir, parse_count

CATALOGUE = Path(__file__).parent / "models" / "catalogue.toml"
ALIASES = Path(__file__).parent / "models" / "aliases.toml"
BITS, GROUP_SIZE = 4, 64  # what the catalogue's conversions are


def catalogue() -> dict[str, dict[str, float]]:
    with CATALOGUE.open("rb") as f:
        models: dict[str, dict[str, float]] = tomllib.load(f)["models"]
    return models


def rows(available: float, disk: float, memory: float, context: int) -> list[dict[str, Any]]:
    with ALIASES.open("rb") as f:
        hub = tomllib.load(f)["aliases"]
    out = []
    for name, m in catalogue().items():
        result: Fit = fit(
            m["params"],
            m.get("active", m["params"]),
            BITS,
            available,
            active_experts=m.get("active_experts"),
            group_size=GROUP_SIZE,
            layers=int(m["layers"]),
            kv_heads=int(m["kv_heads"]),
            head_dim=int(m["head_dim"]),
            context=context,
            disk_bandwidth=disk,
            memory_bandwidth=memory,
        )
        entry = {
            "name": name,
            "hub_id": hub.get(name),
            "params": m["params"],
            "active": m.get("active", m["params"]),
        }
        out.append(entry | {"bits": BITS} | asdict(result))
    return out


def _table(entries: list[dict[str, Any]], machine: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    gb = 1e9
    style = {"fits": "green", "fits with expert streaming": "yellow", "does not fit": "red"}
    table = Table(title=f"Models at {BITS} bits on this machine", caption=machine["caption"])
    for column in ("model", "params / active", "weights", "KV", "verdict", "tok/s at most"):
        table.add_column(column, justify="left" if column in ("model", "verdict") else "right")
    for e in entries:
        params = f"{e['params'] / 1e9:.1f}B"
        if e["active"] < e["params"]:
            params += f" / {e['active'] / 1e9:.1f}B"
        band = e["tokens_per_second"]
        table.add_row(
            e["name"],
            params,
            f"{e['weights_bytes'] / gb:.1f} GB",
            f"{e['kv_bytes'] / gb:.2f} GB",
            f"[{style[e['verdict']]}]{e['verdict']}[/]",
            _band(band) if band else "",
        )
    # On a pipe rich assumes 80 columns; the table needs about 110.
    Console(width=None if sys.stdout.isatty() else 120).print(table)


def _band(band: tuple[float, float]) -> str:
    digits = 1 if band[0] >= 1 else 2
    return f"{band[0]:.{digits}f}-{band[1]:.{digits}f}"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mlx-flash browse", description="Which common MLX models fit this machine?"
    )
    p.add_argument("--context", type=int, default=4096, help="tokens of KV cache to budget per model")
    p.add_argument("--memory", type=parse_count, help="bytes available (default: this machine's)")
    p.add_argument(
        "--disk-bandwidth", type=parse_count, help="bytes/s (default: measured on the model cache's disk)"
    )
    p.add_argument(
        "--memory-bandwidth", type=parse_count, help="bytes/s (default: measured, MLX reading an array)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    args = p.parse_args(argv)
    snapshot = _native.memory_snapshot()
    available = args.memory or float(snapshot["effective_available_bytes"])
    disk: dict[str, Any] = (
        {"bytes_per_second": args.disk_bandwidth, "measured": False}
        if args.disk_bandwidth
        else disk_bandwidth(model_dir()) | {"measured": True}
    )
    mem: dict[str, Any] = (
        {"bytes_per_second": args.memory_bandwidth, "measured": False}
        if args.memory_bandwidth
        else memory_bandwidth() | {"measured": True}
    )
    entries = rows(available, disk["bytes_per_second"], mem["bytes_per_second"], args.context)
    machine = {
        "total_memory_bytes": snapshot["effective_total_bytes"],
        "available_bytes": available,
        "disk": disk,
        "memory_bandwidth": mem,
        "context": args.context,
    }
    if args.json:
        print(json.dumps({"machine": machine, "models": entries}))  # noqa: T201 - user-facing
        return 0
    how = {True: "measured", False: "given"}
    machine["caption"] = (
        f"{available / 1e9:.1f} GB available of {snapshot['effective_total_bytes'] / 1e9:.1f} GB; disk reads "
        f"{disk['bytes_per_second'] / 1e9:.2f} GB/s ({how[disk['measured']]}), memory "
        f"{mem['bytes_per_second'] / 1e9:.1f} GB/s ({how[mem['measured']]}); KV for {args.context} tokens. "
        "Streaming band (PERF.md's bound, compute left out): no expert cache hits ... hits on the share of "
        "experts that fits (mlx-flash fit --help)."
    )
    _table(entries, machine)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
