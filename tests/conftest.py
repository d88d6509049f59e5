from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import Worker, build_model, run_worker


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def model_path(models_dir: Path) -> dict[str, Path]:
    """Tiny random-weight models: dense qwen3 and llama, MoE qwen3_moe and mixtral."""
    return {arch: build_model(arch, models_dir / arch) for arch in ("qwen3", "llama", "qwen3_moe", "mixtral")}


@pytest.fixture(scope="session")
def demo_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    with run_worker("demo", tmp_path_factory.mktemp("logs") / "demo.log") as worker:
        yield worker


@pytest.fixture(scope="session")
def workers(
    model_path: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Worker]]:
    """One real worker per tiny model, started once for the session."""
    logs = tmp_path_factory.mktemp("logs")
    from contextlib import ExitStack

    with ExitStack() as stack:
        yield {
            arch: stack.enter_context(run_worker(str(path), logs / f"{arch}.log"))
            for arch, path in model_path.items()
        }
