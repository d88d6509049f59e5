"""`mlx-flash`: the one command.

  mlx-flash [serve] [--model M] [--workers N] [--host H] [--port P] ...   the server (default)
  mlx-flash worker [--model M] [--port P] ...                              one worker, no sidecar
  mlx-flash experts replay TRACE [--capacity 0.25,0.5]                     expert cache policies on a trace
  mlx-flash fit --params 30B --active 3B --bits 4 | --model PATH          will it fit this machine?
  mlx-flash browse [--json]                                                which common models fit here
  mlx-flash chat [--url URL] [--model M]                                   terminal chat
  mlx-flash mcp [--url URL] [--api-key K]                                  MCP over stdio for a server

`serve` runs the Rust sidecar in this process (`mlx-flash serve --help` lists its flags); it starts
and supervises the workers itself. Worker flags about models, memory and caches (`mlx-flash worker
--help`: --pin, --memory-limit, --prefix-cache-dir, ...) and any --model after the first are handed
to every worker.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from mlx_flash import __version__


def split_worker_args(args: list[str]) -> tuple[list[str], list[str]]:
    """(the sidecar's arguments, the workers'): engine flags and extra --model go to the workers."""
    if "--" in args:  # the caller split them already
        i = args.index("--")
        return args[:i], args[i + 1 :]
    from mlx_flash import worker  # not at the top: `mlx-flash mcp` must start fast, without MLX

    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    worker.add_engine_flags(p)
    _, rest = p.parse_known_args(args)
    sidecar, workers, j = [], [], 0
    for arg in args:  # what parse_known_args left, in order, is the sidecar's
        if j < len(rest) and arg == rest[j]:
            sidecar.append(arg)
            j += 1
        else:
            workers.append(arg)
    models = [i for i, a in enumerate(sidecar) if a == "--model" or a.startswith("--model=")]
    for i in reversed(models[1:]):
        moved = sidecar[i : i + (1 if "=" in sidecar[i] else 2)]
        del sidecar[i : i + len(moved)]
        workers = [*moved, *workers]
    return sidecar, workers


class _Rejecting(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def check_worker_args(sidecar: list[str], workers: list[str]) -> None:
    """What would fail every worker at once, raised here before anything starts (ValueError or
    OSError): a flag a worker rejects, an unreadable --aliases file, a model directory not there."""
    from mlx_lm.utils import load_config

    from mlx_flash import worker
    from mlx_flash.models.loader import check_kv_group, is_hub_id, resolve
    from mlx_flash.models.registry import Registry

    first = os.environ.get("MLX_FLASH_MODEL") or "demo"  # the sidecar's --model, as it reads it
    for i, arg in enumerate(sidecar):
        if arg.startswith("--model="):
            first = arg.partition("=")[2]
        elif arg == "--model" and i + 1 < len(sidecar):
            first = sidecar[i + 1]
    p = _Rejecting(add_help=False, allow_abbrev=False)
    worker.add_worker_flags(p)
    config = worker.config_from(p.parse_args(["--model", first, *workers]))
    config.validate()
    registry = Registry(list(config.startup_models), config.aliases)
    for name in config.startup_models:
        target = registry.find(name).target
        if not is_hub_id(target):  # a hub id may still be downloaded
            path = resolve(target, download=False)
            if config.kv_bits is not None and (path / "config.json").is_file():
                check_kv_group(load_config(path), config.kv_group_size)


def serve(args: list[str]) -> int:
    """Run the sidecar; workers are started with this interpreter unless told otherwise."""
    from mlx_flash import _native

    os.environ.setdefault("MLX_FLASH_PYTHON", sys.executable)
    sidecar, workers = split_worker_args(args)
    if not {"-h", "--help", "-V", "--version"} & set(sidecar):
        try:
            check_worker_args(sidecar, workers)
        except (ValueError, OSError) as e:
            print(f"mlx-flash: error: {e}", file=sys.stderr)  # noqa: T201 - user-facing
            return 2
    try:
        return _native.serve([*sidecar, "--", *workers] if workers else sidecar)
    except KeyboardInterrupt:
        # The sidecar already drained and stopped on this Ctrl-C; Python saw it too.
        return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else "serve"
    if command in ("-h", "--help"):
        print(__doc__)  # noqa: T201 - user-facing
        return 0
    if command == "--version":
        print(f"mlx-flash {__version__}")  # noqa: T201 - user-facing
        return 0
    if command == "worker":
        from mlx_flash import worker

        return worker.main(argv[1:], prog="mlx-flash worker")
    if command == "mcp":
        from mlx_flash.mcp import stdio

        return stdio.main(argv[1:])
    if command == "chat":
        from mlx_flash import chat

        return chat.main(argv[1:])
    if command == "fit":
        from mlx_flash import fit

        return fit.main(argv[1:])
    if command == "browse":
        from mlx_flash import browse

        return browse.main(argv[1:])
    if command == "experts":
        from mlx_flash.experts import trace

        return trace.main(argv[1:])
    return serve(argv[1:] if command == "serve" else argv)


if __name__ == "__main__":
    sys.exit(main())
