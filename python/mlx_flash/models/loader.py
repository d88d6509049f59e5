"""Resolve a model name (`demo`, a local directory, or a Hugging Face hub id) and load it with mlx-lm."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load

from mlx_flash.demo import DEMO_MODEL_PATH

log = logging.getLogger(__name__)

DEMO = "demo"
# What mlx-lm needs from a hub repository (its own default set, minus the other weight formats).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.py", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class LoadedModel:
    id: str
    path: Path
    model: Any  # an mlx.nn.Module of the mlx-lm architecture
    tokenizer: TokenizerWrapper
    config: dict[str, Any]
    context_length: int
    created: int
    weight_bytes: int

    def serves(self, name: str) -> bool:
        """Whether a request naming `name` is for this model (its id, or the directory's name)."""
        return name in (self.id, self.path.name)


def resolve(name: str) -> Path:
    """Local path for a model name, downloading from the hub when it is not a local directory."""
    if name == DEMO:
        return DEMO_MODEL_PATH
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model directory not found: {name}")
    from huggingface_hub import snapshot_download

    log.info("downloading model from the hub", extra={"model": name})
    return Path(snapshot_download(name, allow_patterns=HUB_PATTERNS))


def context_length(config: dict[str, Any], tokenizer: TokenizerWrapper) -> int:
    for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_ctx"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", 0)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else 4096


def load_model(name: str) -> LoadedModel:
    start = time.perf_counter()
    path = resolve(name)
    log.info("loading model", extra={"model": name, "path": str(path)})
    model, tokenizer, config = cast(
        tuple[Any, TokenizerWrapper, dict[str, Any]], load(str(path), return_config=True)
    )
    leaves = cast(list[tuple[str, Any]], tree_flatten(model.parameters()))
    weight_bytes = sum(int(array.nbytes) for _, array in leaves)
    loaded = LoadedModel(
        id=name,
        path=path,
        model=model,
        tokenizer=tokenizer,
        config=config,
        context_length=context_length(config, tokenizer),
        created=int(time.time()),
        weight_bytes=weight_bytes,
    )
    log.info(
        "model loaded",
        extra={
            "model": name,
            "model_type": config.get("model_type"),
            "weight_bytes": weight_bytes,
            "context_length": loaded.context_length,
            "seconds": round(time.perf_counter() - start, 3),
        },
    )
    return loaded
