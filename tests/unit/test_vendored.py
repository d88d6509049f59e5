"""The front-end code we vendor is exactly what the npm release shipped (checksums recorded at copy time)."""

import hashlib
from pathlib import Path

VENDOR = Path(__file__).resolve().parents[2] / "sidecar" / "assets" / "vendor"


def test_vendored_files_match_their_checksums() -> None:
    sums = list(VENDOR.glob("*/SHA256SUMS"))
    assert sums, "no vendored packages found"
    for path in sums:
        for line in path.read_text().splitlines():
            digest, name = line.split()
            assert hashlib.sha256((path.parent / name).read_bytes()).hexdigest() == digest, name


def test_the_sidecar_serves_the_vendored_version() -> None:
    webui = (VENDOR.parents[1] / "src" / "webui.rs").read_text()
    for path in VENDOR.glob("*/SHA256SUMS"):
        assert f"vendor/{path.parent.name}/" in webui
