"""`mlx-flash`: the one command.

  mlx-flash [serve] [--model M] [--workers N] [--host H] [--port P] ...   the server (default)
  mlx-flash worker [--model M] [--port P] ...                              one worker, no sidecar

`serve` runs the Rust sidecar in this process (`mlx-flash serve --help` lists its flags); it starts
and supervises the workers itself.
"""

from __future__ import annotations

import os
import sys

from mlx_flash import __version__, _native, worker


def serve(args: list[str]) -> int:
    """Run the sidecar; workers are started with this interpreter unless told otherwise."""
    os.environ.setdefault("MLX_FLASH_PYTHON", sys.executable)
    try:
        return _native.serve(args)
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
        return worker.main(argv[1:], prog="mlx-flash worker")
    return serve(argv[1:] if command == "serve" else argv)


if __name__ == "__main__":
    sys.exit(main())
