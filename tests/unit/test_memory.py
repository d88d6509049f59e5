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
