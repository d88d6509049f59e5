"""Several models behind `mlx-flash serve`: worker flags pass through, and the model admin API and
/v1/models work through the sidecar."""

from __future__ import annotations

from pathlib import Path

import httpx

from helpers import run_sidecar


def test_worker_flags_pass_through_and_models_load_and_unload_via_the_sidecar(
    model_path: dict[str, Path], tmp_path: Path
) -> None:
    aliases = tmp_path / "aliases.toml"
    aliases.write_text(f'[aliases]\ntiny = "{model_path["qwen3"]}"\n')
    args = ["--model", "demo", "--model", "tiny", "--aliases", str(aliases), "--pin", "demo"]
    limits = ["--memory-limit", "2G", "--prefix-cache-bytes", "64M"]
    with run_sidecar(tmp_path / "sidecar.log", *args, *limits, workers=1) as s:
        tables = httpx.get(f"{s.url}/admin/api/models", timeout=10).json()["workers"]
        assert len(tables) == 1 and tables[0]["error"] is None
        table = tables[0]["models"]
        assert table["memory_limit"] == 2 << 30
        models = {m["id"]: m for m in table["models"]}
        assert models["demo"]["pinned"] and models["demo"]["status"] == "loaded"
        assert models["tiny"]["status"] == "loaded" and not models["tiny"]["pinned"]

        r = httpx.post(f"{s.url}/admin/api/models/demo/unload", timeout=30)
        assert r.status_code == 409 and "pinned" in r.text
        r = httpx.post(f"{s.url}/admin/api/models/tiny/unload", timeout=30)
        assert r.status_code == 200 and r.json()["results"][0]["body"]["model"]["status"] == "available"
        listed = httpx.get(f"{s.url}/v1/models", timeout=10).json()["data"]
        assert {m["id"]: m["status"] for m in listed} == {"demo": "loaded", "tiny": "available"}

        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.headers["x-worker-id"] == "worker-0"
        assert r.json()["model"] == "tiny"
