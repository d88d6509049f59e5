"""`mlx-flash`: the one command. `serve` (the default) starts serving; `worker` runs one worker.

Until the sidecar lands, `serve` runs a single worker in-process.
"""

from __future__ import annotations

import argparse
import sys

from mlx_flash import __version__, worker


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        prog="mlx-flash", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"mlx-flash {__version__}")
    sub = p.add_subparsers(dest="command")
    for name, help_text in (("serve", "serve the OpenAI API (default)"), ("worker", "run one worker")):
        worker.add_worker_flags(sub.add_parser(name, help=help_text))
    if not argv or argv[0] not in ("serve", "worker", "-h", "--help", "--version"):
        argv = ["serve", *argv]
    args = p.parse_args(argv)
    return worker.run(worker.config_from(args))


if __name__ == "__main__":
    sys.exit(main())
