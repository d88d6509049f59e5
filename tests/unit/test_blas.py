"""Which BLAS MLX runs on, read from this process's own mappings, and the advice that follows."""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_flash import blas

MAPS = """\
7f00-7f10 r-xp 00000000 08:01 1 /venv/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0
7f10-7f20 r-xp 00000000 08:01 2 /venv/site-packages/numpy.libs/libscipy_openblas64_-32a4b2a6.so
7f20-7f30 rw-p 00000000 00:00 0
7f30-7f40 r-xp 00000000 08:01 3 /usr/lib/x86_64-linux-gnu/libc.so.6
"""
PRELOADED = (
    MAPS
    + "7f40-7f50 r-xp 00000000 08:01 4 /usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so\n"
)


def test_mapped_names_the_blas_libraries_but_not_numpys_own() -> None:
    assert blas.mapped(MAPS) == ["libblas-bd8a282c.so.3.10.0"]
    assert blas.mapped(PRELOADED) == ["libblas-bd8a282c.so.3.10.0", "libopenblasp-r0.3.21.so"]


def test_advice_on_the_bundled_reference_blas() -> None:
    found = blas.mapped(MAPS)
    hint = blas.advice(found, "Device(cpu, 0)", "/usr/lib/x86_64-linux-gnu/libopenblas.so.0")
    assert hint is not None and "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0" in hint
    missing = blas.advice(found, "Device(cpu, 0)", None)
    assert missing is not None and "apt install libopenblas0-pthread" in missing
    assert blas.advice(blas.mapped(PRELOADED), "Device(cpu, 0)", None) is None  # already preloaded
    assert blas.advice(found, "Device(gpu, 0)", None) is None  # products run on the GPU
    assert blas.advice([], "Device(cpu, 0)", None) is None  # macOS: Accelerate, nothing mapped by that name


def test_installed_openblas_is_the_first_path_that_exists(tmp_path: Path) -> None:
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    assert blas.installed_openblas((str(tmp_path / "absent.so"), str(lib))) == str(lib)
    assert blas.installed_openblas((str(tmp_path / "absent.so"),)) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MLX's Linux wheel bundles its BLAS")
def test_this_process_runs_mlx_on_a_blas_it_can_name() -> None:
    mx.eval(mx.ones((8, 8)) @ mx.ones((8, 8)))
    assert any(n.startswith("libblas") or "openblas" in n for n in blas.mapped())
