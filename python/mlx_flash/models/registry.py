"""Which names a worker answers to: the models it was started with, aliases (a config file, then the
built-ins), and hub models already in the local Hugging Face cache."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import tomllib

from mlx_flash.api.errors import ModelNotFound
from mlx_flash.models.loader import cached_snapshot, is_hub_id

BUILTIN_ALIASES = Path(__file__).with_name("aliases.toml")
# Scanning the Hugging Face cache walks directories; /v1/models may be polled often.
CACHE_SCAN_SECONDS = 10.0


def read_aliases(path: Path) -> dict[str, str]:
    """The `[aliases]` table of a TOML file: `name = "hub/id"` or `name = "/a/local/dir"`."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"cannot read aliases from {path}: {e}") from e
    table = data.get("aliases", {})
    if not isinstance(table, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and v for k, v in table.items()
    ):
        raise ValueError(f'{path}: [aliases] must map names to strings, e.g. fast = "org/model"')
    return dict(table)


@dataclass(frozen=True)
class Known:
    """A model this worker can serve: `id` is what clients see, `target` what loads."""

    id: str
    target: str
    # May be fetched from the hub on a request: the operator named it, not just any client.
    download: bool


class Registry:
    def __init__(self, models: list[str], aliases_file: str | None = None) -> None:
        self.models = list(dict.fromkeys(models))
        self.aliases = read_aliases(Path(aliases_file)) if aliases_file else {}
        self.builtin = read_aliases(BUILTIN_ALIASES)
        self._scanned: tuple[float, list[str]] = (0.0, [])

    def find(self, name: str) -> Known:
        """The model a request naming `name` is for; ModelNotFound if none."""
        if name in self.models or name in self.aliases:
            return Known(name, self._target(name), True)
        for model in self.models:  # a local directory is also known by its name
            if not is_hub_id(model) and Path(model).name == name:
                return Known(model, self._target(model), True)
        if name in self.builtin or is_hub_id(name):
            target = self._target(name)
            return Known(self._display_id(target, name), target, False)
        raise ModelNotFound(name)

    def available(self) -> list[Known]:
        """Everything a request may name without a download, one entry per target."""
        known = [Known(m, self._target(m), True) for m in self.models]
        known += [Known(alias, target, True) for alias, target in self.aliases.items()]
        cached = set(self._cached_repos())
        known += [Known(a, t, False) for a, t in self.builtin.items() if t in cached]
        known += [Known(repo, repo, False) for repo in sorted(cached)]
        unique: dict[str, Known] = {}
        for k in known:
            unique.setdefault(k.target, k)
        return list(unique.values())

    def _target(self, name: str) -> str:
        """What a name loads: an alias's target (the operator's file first), else the name itself."""
        return self.aliases.get(name) or self.builtin.get(name) or name

    def _display_id(self, target: str, name: str) -> str:
        """The name clients see for a target: the operator's name for it, else what was asked."""
        for given in (*self.models, *self.aliases):
            if self._target(given) == target:
                return given
        return name

    def _cached_repos(self) -> list[str]:
        at, repos = self._scanned
        if time.monotonic() - at < CACHE_SCAN_SECONDS:
            return repos
        repos = []
        try:
            from huggingface_hub import scan_cache_dir
            from huggingface_hub.errors import CacheNotFound

            info = scan_cache_dir()
        except (CacheNotFound, OSError):
            info = None
        if info is not None:
            repos = [
                r.repo_id
                for r in info.repos
                if r.repo_type == "model" and cached_snapshot(r.repo_id) is not None
            ]
        self._scanned = (time.monotonic(), repos)
        return repos
