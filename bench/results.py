"""What every results file starts and ends with: how it was run, on what, and the targets' verdicts."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from single_stream import git_state, machine

ENV = ("LD_PRELOAD",)


def header(name: str, args: argparse.Namespace, started: float, omit: Iterable[str] = ()) -> dict[str, Any]:
    """The opening fields of `bench/results/<name>.json`; `omit` names settings that are not settings."""
    skip = {"out", *omit}
    return {
        "benchmark": name,
        "command": shlex.join([sys.executable, *sys.argv]),
        "argv": sys.argv,
        # What the environment changes for this process and the servers it starts (they inherit it).
        "env": {k: os.environ[k] for k in ENV if k in os.environ},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "quick": getattr(args, "quick", False),
        "machine": machine(),
        "git": git_state(),
        "settings": {k: v for k, v in vars(args).items() if k not in skip},
    }


def write(result: dict[str, Any], out: Path, started: float) -> None:
    """Close the result (load at the end, wall time), write it, and print each target's verdict."""
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.time() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out} in {result['wall_s']} s")
    for name, t in result["summary"]["targets"].items():
        print(f"  target {name}: {t['target']}: {t['value']} -> {'met' if t['pass'] else 'MISSED'}")
