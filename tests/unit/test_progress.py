"""Download and load progress as log lines, one per 10%, the done line left to the caller."""

from __future__ import annotations

import logging

import pytest

from mlx_flash.models.progress import ProgressLog, download_progress


def _progress(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int, int, int]]:
    return [(r.getMessage(), r.percent, r.bytes, r.total_bytes) for r in caplog.records]  # type: ignore[attr-defined]


def test_one_line_per_ten_percent_below_a_hundred(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "mlx_flash.models.progress")
    p = ProgressLog("demo", "loading model")
    for done in (0, 3, 9, 10, 15, 55, 56, 99, 100, 100):
        p.update(done, 100)
    p.update(5, 0)  # an unknown total says nothing
    assert _progress(caplog) == [
        ("loading model", 0, 0, 100),
        ("loading model", 10, 10, 100),
        ("loading model", 55, 55, 100),
        ("loading model", 99, 99, 100),
    ]
    assert all(r.model == "demo" for r in caplog.records)  # type: ignore[attr-defined]


def test_the_hubs_byte_bar_reports_to_the_log(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, "mlx_flash.models.progress")
    cls = download_progress("org/model")
    # What snapshot_download makes: a files bar, and byte bars whose totals grow as files start.
    files = cls(total=3, desc="Fetching 3 files")
    written = cls(desc="Reconstructing (incomplete total...)", total=0, initial=0, unit="B", unit_scale=True)
    network = cls(desc="Downloading bytes", total=0, initial=0, unit="B", unit_scale=True)
    written.total = 1000
    network.total = 1000
    for _ in range(10):
        written.update(100)
        written.refresh()
        network.update(100)
        network.refresh()
    files.update(3)
    for bar in (files, written, network):
        bar.close()
    lines = _progress(caplog)
    assert lines and all(msg == "downloading model" and total == 1000 for msg, _, _, total in lines)
    assert [p for _, p, _, _ in lines] == sorted({p for _, p, _, _ in lines}) and lines[-1][1] == 90
    assert capsys.readouterr() == ("", "")  # nothing drawn: the worker's stderr is the sidecar's pipe
