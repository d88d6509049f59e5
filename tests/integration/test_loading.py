"""Loading by hub id runs the real Hugging Face code path, from a local cache (no network here)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import openai
import pytest

from helpers import run_worker


def test_hub_repo_id_loads_from_the_hub_cache(
    model_path: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The on-disk layout huggingface_hub itself writes: refs/main names a snapshot directory.
    repo = tmp_path / "hub" / "models--local--tiny-qwen3"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_path["qwen3"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with run_worker("local/tiny-qwen3", tmp_path / "worker.log") as worker:
        c = openai.OpenAI(base_url=f"{worker.url}/v1", api_key="x", max_retries=0)
        assert c.models.list().data[0].id == "local/tiny-qwen3"
        r = c.completions.create(model="local/tiny-qwen3", prompt="Hello", max_tokens=4, temperature=0)
        assert r.usage is not None and r.usage.prompt_tokens > 0
        assert f'"path":"{repo / "snapshots" / commit}"' in worker.log()  # resolved through the cache
