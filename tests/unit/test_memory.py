import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlx_flash import memory


def test_snapshot_reports_consistent_linux_memory() -> None:
    snap = memory.snapshot()
    assert snap is not None
    assert snap["platform"] == "linux"
    assert 0 < snap["available_bytes"] <= snap["total_bytes"]
    assert snap["used_bytes"] == snap["total_bytes"] - snap["available_bytes"]
    assert 0 < snap["effective_available_bytes"] <= snap["effective_total_bytes"] <= snap["total_bytes"]
    assert snap["pressure"] in ("normal", "warning", "critical")
    if snap["cgroup_limit_bytes"] is not None:
        assert snap["effective_total_bytes"] <= snap["cgroup_limit_bytes"]


CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def test_snapshot_honours_a_cgroup_v1_memory_limit() -> None:
    """Run a process under a real 1 GiB memory cgroup (a smaller machine) and read it back."""
    if not (CGROUP_ROOT / "cgroup.procs").exists() or not os.access(CGROUP_ROOT, os.W_OK):
        pytest.skip("needs root and the cgroup v1 memory controller")
    group = CGROUP_ROOT / f"mlxf-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(1 << 30))
        code = (
            "import json, sys; from mlx_flash import memory\n"
            f"open('{group}/cgroup.procs', 'w').write(str(__import__('os').getpid()))\n"
            "print(json.dumps(memory.snapshot()))"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        snap = json.loads(out.stdout)
        assert snap["cgroup_limit_bytes"] == 1 << 30
        assert 0 < snap["cgroup_usage_bytes"] < 1 << 30
        assert snap["effective_total_bytes"] == 1 << 30
        assert snap["effective_available_bytes"] < 1 << 30
    finally:
        group.rmdir()
