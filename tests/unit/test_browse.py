"""`mlx-flash browse` against numbers computed by hand, and the disk measurement it relies on."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from helpers import mlx_flash_command
from mlx_flash.fit import disk_bandwidth


def _browse(*args: str) -> dict[str, object]:
    out = subprocess.run([*mlx_flash_command(), "browse", *args], capture_output=True, text=True, check=True)
    return dict(json.loads(out.stdout))


def test_entries_by_hand() -> None:
    result = _browse(
        *["--memory", "12B", "--disk-bandwidth", "3B", "--memory-bandwidth", "100B"],
        *["--context", "4096", "--json"],
    )
    models = {m["name"]: m for m in result["models"]}  # type: ignore[attr-defined]
    # 4 bits in groups of 64: 4.5 bits per weight.
    moe = models["qwen3-moe-30b-a3b"]
    assert moe["hub_id"] == "mlx-community/Qwen3-30B-A3B-4bit"
    assert moe["weights_bytes"] == 30.5e9 * 4.5 / 8  # 17.15625 GB
    assert moe["active_bytes"] == 3.3e9 * 4.5 / 8  # 1.85625 GB
    assert moe["kv_bytes"] == 2 * 48 * 4 * 128 * 4096 * 2  # 402,653,184
    assert moe["verdict"] == "fits with expert streaming"
    # Streamed per token: 48 layers * 8 experts * 3 * 2048 * 768 = 1,811,939,328 parameters, * 4.5 / 8 =
    # 1,019,215,872 bytes (PERF.md: about 1.0 GB); resident: 1,856,250,000 - 1,019,215,872 = 837,034,128.
    assert moe["streamed_bytes"] == 1_019_215_872 and moe["resident_bytes"] == 837_034_128
    # cached = (12e9 - 837,034,128 - 402,653,184) / (17,156,250,000 - 837,034,128) = 0.659365;
    # t_resident = 0.837034128 / 100 = 0.00837034 s; B / W = 1.019215872 / 3 = 0.33973862 s.
    # 1 / (0.00837034 + 0.33973862) = 2.872664 tok/s; 1 / (0.00837034 + 0.340635 * 0.33973862) = 8.058189.
    low, high = moe["tokens_per_second"]
    assert abs(moe["cached_share"] - 10_760_312_688 / 16_319_215_872) < 1e-9
    assert abs(low - 2.872664) < 1e-6 and abs(high - 8.058189) < 1e-6
    llama = models["llama-3.1-8b"]
    assert llama["weights_bytes"] == 8.03e9 * 4.5 / 8 and llama["kv_bytes"] == 2 * 32 * 8 * 128 * 4096 * 2
    assert llama["verdict"] == "fits" and llama["tokens_per_second"] is None
    # Dense and too big: nothing to stream.
    assert models["llama-3.3-70b"]["verdict"] == "does not fit"
    assert result["machine"] == {  # type: ignore[comparison-overlap]
        "total_memory_bytes": result["machine"]["total_memory_bytes"],  # type: ignore[index]
        "available_bytes": 12e9,
        "disk": {"bytes_per_second": 3e9, "measured": False},
        "memory_bandwidth": {"bytes_per_second": 100e9, "measured": False},
        "context": 4096,
    }


def test_a_terminal_table(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            *mlx_flash_command(),
            "browse",
            "--memory",
            "12B",
            "--disk-bandwidth",
            "3B",
            "--memory-bandwidth",
            "100B",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(row for row in out.splitlines() if "qwen3-moe-30b-a3b" in row)
    assert "30.5B / 3.3B" in line and "17.2 GB" in line and "fits with expert streaming" in line
    assert "2.9-8.1" in line


def test_disk_bandwidth_is_measured_and_cleans_up(tmp_path: Path) -> None:
    got = disk_bandwidth(tmp_path, size=8 << 20, record=1 << 20, threads=4)
    assert got["bytes"] == 8 << 20 and got["bytes_per_second"] > 0
    assert os.listdir(tmp_path) == []
