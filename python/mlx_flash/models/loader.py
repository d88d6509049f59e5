"""Resolve a model name (`demo`, a local directory, or a Hugging Face hub id) and load it with mlx-lm."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load

from mlx_flash.config import KV_GROUP_SIZES
from mlx_flash.demo import DEMO_MODEL_PATH
from mlx_flash.experts.streamer import ExpertPlan, ExpertStreamer
from mlx_flash.models.progress import ProgressLog, download_progress

log = logging.getLogger(__name__)

DEMO = "demo"
# What mlx-lm needs from a hub repository (its own default set, minus the other weight formats).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.py", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
# Weights are read in groups of a twentieth of the model, at most this many bytes, so loading reports
# its progress.
PROGRESS_STEP_BYTES = 256 << 20


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
    kv_bytes_per_token: int
    experts: ExpertStreamer | None = None  # a MoE model's expert pools, when it streams them


def is_hub_id(name: str) -> bool:
    """`owner/repo`, the shape of a Hugging Face model id (and not a path)."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def cached_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of a hub model already in the Hugging Face cache, without the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        return None
    return path if (path / "config.json").is_file() else None


def resolve(name: str, download: bool = True) -> Path:
    """Local path for a model name; a hub id not in the local cache is downloaded if `download`."""
    if name == DEMO:
        return DEMO_MODEL_PATH
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if not is_hub_id(name):
        raise FileNotFoundError(
            f"model directory not found: {name} (a model is 'demo', an alias, a local mlx-lm directory "
            "or a Hugging Face repo id, owner/name)"
        )
    cached = cached_snapshot(name)
    if cached is not None:
        return cached
    if not download:
        raise FileNotFoundError(f"{name} is not in the local Hugging Face cache")
    from huggingface_hub import snapshot_download

    log.info("downloading model from the hub", extra={"model": name})
    start = time.perf_counter()
    path = Path(snapshot_download(name, allow_patterns=HUB_PATTERNS, tqdm_class=download_progress(name)))
    seconds = round(time.perf_counter() - start, 3)
    log.info("model downloaded", extra={"model": name, "bytes": weight_file_bytes(path), "seconds": seconds})
    return path


def weight_file_bytes(path: Path) -> int:
    """Bytes of the model's weight files: what loading it will take, known before loading."""
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def context_length(config: dict[str, Any], tokenizer: TokenizerWrapper) -> int:
    for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_ctx"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", 0)
    return limit if isinstance(limit, int) and 0 < limit < 10**7 else 4096


def kv_bytes_per_token(config: dict[str, Any], dtype: mx.Dtype) -> int:
    """KV cache bytes one token takes across all layers: keys and values of every KV head.

    An upper bound for models whose layers keep less (sliding windows, linear attention)."""
    c = config.get("text_config", config)
    heads = int(c.get("num_attention_heads") or c.get("n_heads") or 1)
    kv_heads = int(c.get("num_key_value_heads") or heads)
    layers = int(c.get("num_hidden_layers") or c.get("n_layers") or 1)
    return 2 * layers * kv_heads * head_dim(config) * dtype.size


def check_kv_group(config: dict[str, Any], group_size: int) -> None:
    """ValueError unless `--kv-group-size` divides the model's head size (mlx-lm quantizes each head's
    vectors in groups)."""
    size = head_dim(config)
    if size % group_size:
        fits = [g for g in KV_GROUP_SIZES if size % g == 0]
        hint = (
            f"use --kv-group-size {fits[0]}"
            if fits
            else "no group size MLX has does: run it without --kv-bits"
        )
        raise ValueError(f"--kv-group-size {group_size} must divide the model's head size {size} ({hint})")


def head_dim(config: dict[str, Any]) -> int:
    c = config.get("text_config", config)
    hidden = int(c.get("hidden_size") or c.get("d_model") or 0)
    heads = int(c.get("num_attention_heads") or c.get("n_heads") or 1)
    return int(c.get("head_dim") or (hidden // heads if hidden else 128))


def _stream_experts(
    name: str, model: Any, path: Path, plan: ExpertPlan, policy: str
) -> ExpertStreamer | None:
    """Put the experts in pools before any weight is read; a model that fits whole but cannot stream
    (a checkpoint mlx-lm did not write) loads as it is."""
    try:
        streamer = ExpertStreamer(model, path, name, policy)
    except ValueError as e:
        if plan.streamed:
            raise
        log.warning("experts stay resident", extra={"model": name, "reason": str(e)})
        return None
    streamer.start_empty(plan.budget)
    return streamer


def _activation_dtype(leaves: list[tuple[str, mx.array]]) -> mx.Dtype:
    """The floating dtype the model computes in (a quantized model's scales carry it)."""
    for _, array in leaves:
        if mx.issubdtype(array.dtype, mx.floating):
            return array.dtype
    return mx.float16


def _check_shards(path: Path) -> None:
    """FileNotFoundError naming the weight files a sharded checkpoint's index lists but lacks (mlx-lm
    would only say which parameters are missing)."""
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        files = set(json.loads(index.read_text())["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index} is not a safetensors index: {e}") from e
    missing = sorted(f for f in files if not (path / f).is_file())
    if missing:
        raise FileNotFoundError(f"{path} lacks weight files its index lists: {', '.join(missing)}")


def load_model(
    name: str,
    path: Path,
    on_progress: Callable[[int, int], None] | None = None,
    experts: ExpertPlan | None = None,
    expert_policy: str = "decay",
) -> LoadedModel:
    """Load with mlx-lm, reading the weights in groups so `on_progress(done, total)` can report bytes.
    With an expert plan, the MoE experts stream from disk within its budget and only the rest is read."""
    start = time.perf_counter()
    log.info("loading model", extra={"model": name, "path": str(path)})
    _check_shards(path)
    model, tokenizer, config = cast(
        tuple[Any, TokenizerWrapper, dict[str, Any]], load(str(path), lazy=True, return_config=True)
    )
    streamer = _stream_experts(name, model, path, experts, expert_policy) if experts else None
    leaves = cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))
    total = sum(int(array.nbytes) for _, array in leaves)
    done, group, group_bytes = 0, [], 0
    step = min(PROGRESS_STEP_BYTES, total // 20)
    progress = ProgressLog(name, "loading model")
    for _, array in leaves:
        group.append(array)
        group_bytes += int(array.nbytes)
        if group_bytes >= step or array is leaves[-1][1]:
            mx.eval(group)
            done += group_bytes
            group, group_bytes = [], 0
            if on_progress is not None:
                on_progress(done, total)
            progress.update(done, total)
    loaded = LoadedModel(
        id=name,
        path=path,
        model=model,
        tokenizer=tokenizer,
        config=config,
        context_length=context_length(config, tokenizer),
        created=int(time.time()),
        weight_bytes=total,
        kv_bytes_per_token=kv_bytes_per_token(config, _activation_dtype(leaves)),
        experts=streamer,
    )
    log.info(
        "model loaded",
        extra={
            "model": name,
            "model_type": config.get("model_type"),
            "weight_bytes": total,
            "kv_bytes_per_token": loaded.kv_bytes_per_token,
            "context_length": loaded.context_length,
            "expert_bytes_held": streamer.resident_bytes if streamer else None,
            "seconds": round(time.perf_counter() - start, 3),
        },
    )
    return loaded
