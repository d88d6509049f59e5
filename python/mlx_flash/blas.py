"""Which BLAS MLX's CPU matrix products run on, and what to do about it.

MLX's Linux CPU wheel bundles the reference BLAS (`libblas-<hash>.so`), which does not batch: a float32
product over 8 rows costs about 8 times one row. OpenBLAS loaded in front of it (`LD_PRELOAD`, which the
workers inherit from `mlx-flash serve`) takes over those products: float32 models decode several times
faster and batching pays off. bfloat16 and quantized products use MLX's own kernels either way. The
worker says at start which one it found.
"""

from __future__ import annotations

from pathlib import Path

# Where distributions install OpenBLAS's runtime library.
OPENBLAS_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


def mapped(maps: str | None = None) -> list[str]:
    """The BLAS libraries mapped into this process (from `/proc/self/maps`, or `maps`); empty where
    there is no such file. numpy's own OpenBLAS (`scipy_openblas`) has renamed symbols and serves
    only numpy, so it is left out."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return []
    names = {Path(line.split()[-1]).name for line in maps.splitlines() if len(line.split()) >= 6}
    return sorted(n for n in names if "blas" in n.lower() and "scipy_openblas" not in n)


def installed_openblas(paths: tuple[str, ...] = OPENBLAS_PATHS) -> str | None:
    return next((p for p in paths if Path(p).exists()), None)


def advice(libraries: list[str], device: str, openblas: str | None) -> str | None:
    """What to tell someone running MLX on the bundled reference BLAS; None when it does not apply."""
    if "cpu" not in device or any("openblas" in n for n in libraries):
        return None
    if not any(n.startswith("libblas") for n in libraries):
        return None  # not MLX's Linux wheel (macOS uses Accelerate)
    if openblas:
        return f"float32 on the bundled reference BLAS is slow; start with LD_PRELOAD={openblas}"
    return (
        "float32 on the bundled reference BLAS is slow; install OpenBLAS (apt install "
        "libopenblas0-pthread) and start with LD_PRELOAD=/path/to/libopenblas.so.0"
    )
