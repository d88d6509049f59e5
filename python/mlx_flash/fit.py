"""`mlx-flash fit`: will a model fit this machine? The math, in one place.

weights  = params * (bits + 32 / group_size) / 8        bytes; each group of `group_size` weights
                                                          carries an fp16 scale and bias (32 bits);
                                                          bits 16 means unquantized (no groups)
active   = active_params * the same bits per weight     bytes a token uses
streamed = active_experts * the same bits per weight    expert bytes a token uses (B_expert)
resident = active - streamed                            attention, embeddings, dense layers, router
kv       = 2 * layers * kv_heads * head_dim * context * 2 bytes (fp16 keys and values)
fits                    weights + kv <= available memory
fits with streaming     active + kv <= available: experts stream from disk (a mixture of experts only)
does not fit            otherwise

Streaming speed, from PERF.md's bound: time per token = t_resident + (1 - h) * B_expert / W, with
t_resident = resident / M (each token reads the resident weights once from memory at bandwidth M),
W = the disk's read bandwidth and h = the expert cache's hit rate. Both bandwidths are measured here
unless given. The band runs from h = 0 (every expert read) to h = the share of expert bytes the memory
left over holds,
    cached = (available - resident - kv) / (weights - resident),
the hit rate of a cache that size under uniform routing (real routers repeat experts, and do better):
    tok/s in [1 / (t_resident + B / W), 1 / (t_resident + (1 - cached) * B / W)]
Compute is left out, so this is a ceiling. When the expert share of the active parameters is not known
(--params/--active without --active-experts), every active byte counts as streamed and as resident:
a conservative band (resident_bytes is then null).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from mlx_flash import _native

F_NOCACHE = 48  # macOS fcntl: no page caching for this descriptor
_SCALE = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def parse_count(text: str) -> float:
    """'30B' -> 3e10, '3.5M' -> 3.5e6, '1000' -> 1000."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMBT]?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r} (e.g. 30B, 3.5M)")
    return float(m.group(1)) * _SCALE[m.group(2)]


def bits_per_weight(bits: float, group_size: int = 64) -> float:
    return bits if bits >= 16 else bits + 32 / group_size


@dataclass
class Fit:
    weights_bytes: float
    active_bytes: float
    kv_bytes: float
    available_bytes: float
    verdict: str  # "fits" | "fits with expert streaming" | "does not fit"
    cached_share: float | None  # streaming: the share of expert bytes memory can hold
    tokens_per_second: tuple[float, float] | None  # streaming with a known disk bandwidth: the band
    streamed_bytes: float | None = None  # streaming: B_expert, the expert bytes a token reads
    resident_bytes: float | None = None  # streaming: weights kept in memory (null: split unknown)
    disk_bandwidth: float | None = None  # streaming: W, bytes/s
    memory_bandwidth: float | None = None  # streaming with a known split: M, bytes/s


def fit(
    params: float,
    active: float,
    bits: float,
    available: float,
    *,
    active_experts: float | None = None,
    group_size: int = 64,
    layers: int = 0,
    kv_heads: int = 0,
    head_dim: int = 0,
    context: int = 0,
    disk_bandwidth: float = 0.0,
    memory_bandwidth: float = 0.0,
) -> Fit:
    bpw = bits_per_weight(bits, group_size)
    weights, active_bytes = params * bpw / 8, active * bpw / 8
    kv = 2.0 * layers * kv_heads * head_dim * context * 2
    if weights + kv <= available:
        return Fit(weights, active_bytes, kv, available, "fits", None, None)
    if not (active < params and active_bytes + kv <= available):
        return Fit(weights, active_bytes, kv, available, "does not fit", None, None)
    known = active_experts is not None
    streamed = (active_experts if active_experts is not None else active) * bpw / 8
    resident = active_bytes - streamed if known else active_bytes
    cached = (available - resident - kv) / (weights - resident)
    t_resident = resident / memory_bandwidth if known and memory_bandwidth else 0.0
    band = None
    if disk_bandwidth and streamed:
        band = (
            1 / (t_resident + streamed / disk_bandwidth),
            1 / (t_resident + (1 - cached) * streamed / disk_bandwidth),
        )
    return Fit(
        weights,
        active_bytes,
        kv,
        available,
        "fits with expert streaming",
        cached,
        band,
        streamed,
        resident if known else None,
        disk_bandwidth or None,
        memory_bandwidth if known and memory_bandwidth else None,
    )


def from_config(path: Path) -> dict[str, float]:
    """params (from safetensors sizes), bits, group size and KV shape from a local model directory."""
    config = json.loads((path / "config.json").read_text())
    quant = config.get("quantization") or {}
    dense = 32 if config.get("torch_dtype") == "float32" else 16
    bits = float(quant.get("bits", dense))
    group = int(quant.get("group_size", 64))
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    heads = int(config.get("num_attention_heads", 1))
    params = size * 8 / bits_per_weight(bits, group)
    experts, per_token = expert_params(config)
    return {
        "params": params,
        "active": params - (experts - per_token),
        "active_experts": per_token,
        "bits": bits,
        "group_size": group,
        "layers": int(config.get("num_hidden_layers", 0)),
        "kv_heads": int(config.get("num_key_value_heads", heads)),
        "head_dim": int(config.get("head_dim", config.get("hidden_size", 0) // heads)),
    }


def expert_params(config: dict[str, object]) -> tuple[float, float]:
    """(all routed-expert parameters, those one token uses) for a config with SwitchGLU experts (gate,
    up and down projections: 3 * hidden * expert_intermediate each, in every MoE layer). (0, 0) for a
    dense model."""
    c = cast(dict[str, Any], config.get("text_config", config))
    experts = int(c.get("num_experts") or c.get("num_local_experts") or c.get("n_routed_experts") or 0)
    per_token = int(c.get("num_experts_per_tok") or 0)
    if experts <= 1 or not per_token:
        return 0.0, 0.0
    inter = int(c.get("moe_intermediate_size") or c.get("intermediate_size") or 0)
    layers = int(c.get("num_hidden_layers", 0))
    step = int(c.get("decoder_sparse_step") or 1)
    dense = set(c.get("mlp_only_layers") or [])
    first_dense = int(c.get("first_k_dense_replace") or 0)
    moe_layers = [i for i in range(layers) if i >= first_dense and i not in dense and (i + 1) % step == 0]
    one = len(moe_layers) * 3 * int(c["hidden_size"]) * inter
    return float(one * experts), float(one * per_token)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mlx-flash fit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--params", type=parse_count, help="total parameters, e.g. 30B")
    p.add_argument("--active", type=parse_count, help="active parameters per token (MoE), e.g. 3B")
    p.add_argument(
        "--active-experts",
        type=parse_count,
        help="of the active parameters, those in routed experts (the streamed part), e.g. 1.8B",
    )
    p.add_argument("--bits", type=float, default=4, help="bits per weight (16 = unquantized)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--model", type=Path, help="a local model directory (config.json + safetensors)")
    p.add_argument("--context", type=int, default=4096, help="tokens of KV cache to budget")
    p.add_argument("--memory", type=parse_count, help="bytes available (default: this machine's)")
    p.add_argument(
        "--disk-bandwidth",
        type=parse_count,
        help="bytes/s, e.g. 3B for 3 GB/s (default: measured when streaming)",
    )
    p.add_argument(
        "--memory-bandwidth",
        type=parse_count,
        help="bytes/s the resident weights are read at, e.g. 100B (default: measured when streaming)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    shape: dict[str, float] = {"layers": 0, "kv_heads": 0, "head_dim": 0}
    if args.model:
        shape = from_config(args.model)
        args.params, args.bits, args.group_size = shape["params"], shape["bits"], int(shape["group_size"])
        args.active = args.active or shape["active"]
        if args.active_experts is None:
            args.active_experts = shape["active_experts"]
    if args.params is None:
        p.error("give --params (and --active for a mixture of experts) or --model PATH")
    available = args.memory or float(_native.memory_snapshot()["effective_available_bytes"])
    result = _fit_args(args, shape, available)
    if result.verdict == "fits with expert streaming":
        if args.disk_bandwidth is None:
            args.disk_bandwidth = disk_bandwidth(model_dir())["bytes_per_second"]
        if args.memory_bandwidth is None and args.active_experts is not None:
            args.memory_bandwidth = memory_bandwidth()["bytes_per_second"]
        result = _fit_args(args, shape, available)
    if args.json:
        print(json.dumps(asdict(result)))  # noqa: T201 - user-facing
    else:
        print(describe(result))  # noqa: T201 - user-facing
    return 0


def _fit_args(args: argparse.Namespace, shape: dict[str, float], available: float) -> Fit:
    return fit(
        args.params,
        args.active or args.params,
        args.bits,
        available,
        active_experts=args.active_experts,
        group_size=args.group_size,
        layers=int(shape["layers"]),
        kv_heads=int(shape["kv_heads"]),
        head_dim=int(shape["head_dim"]),
        context=args.context,
        disk_bandwidth=args.disk_bandwidth or 0.0,
        memory_bandwidth=args.memory_bandwidth or 0.0,
    )


def describe(r: Fit) -> str:
    gb = 1e9
    line = (
        f"{r.verdict}: weights {r.weights_bytes / gb:.2f} GB, active {r.active_bytes / gb:.2f} GB,"
        f" KV {r.kv_bytes / gb:.2f} GB, available {r.available_bytes / gb:.2f} GB"
    )
    if r.cached_share is not None:
        line += f"; {r.cached_share:.0%} of the experts fit in memory"
    if r.tokens_per_second and r.streamed_bytes and r.disk_bandwidth:
        low, high = r.tokens_per_second
        line += (
            f", {low:.1f}-{high:.1f} tok/s at most (a token streams {r.streamed_bytes / gb:.2f} GB of"
            f" experts at {r.disk_bandwidth / gb:.2f} GB/s"
        )
        if r.resident_bytes is not None and r.memory_bandwidth:
            line += (
                f" and reads {r.resident_bytes / gb:.2f} GB resident at {r.memory_bandwidth / gb:.1f} GB/s"
            )
        line += ")"
    return line


def model_dir() -> Path:
    """Where models live: the Hugging Face cache (created if need be), whose disk streams experts."""
    from huggingface_hub import constants

    path = Path(constants.HF_HUB_CACHE)
    path.mkdir(parents=True, exist_ok=True)
    return path


def disk_bandwidth(
    directory: Path, size: int = 256 << 20, record: int = 1 << 20, threads: int = 8
) -> dict[str, Any]:
    """Read bandwidth of the disk under `directory`: a `size`-byte file written there, pushed out of the
    page cache (posix_fadvise DONTNEED on Linux; F_NOCACHE on macOS), then read back with `threads`
    parallel preads of `record` bytes, the expert reader's pattern. The file is removed."""
    fd, name = tempfile.mkstemp(prefix=".mlx-flash-disk-", dir=directory)
    try:
        if sys.platform == "darwin":
            fcntl.fcntl(fd, F_NOCACHE, 1)
        block = os.urandom(record)
        for _ in range(size // record):
            os.write(fd, block)
        os.fsync(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
        offsets = range(0, size, record)
        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            read = sum(pool.map(lambda off: len(os.pread(fd, record, off)), offsets))
        seconds = time.perf_counter() - start
    finally:
        os.close(fd)
        os.unlink(name)
    return {
        "bytes_per_second": read / seconds,
        "bytes": read,
        "record_bytes": record,
        "threads": threads,
        "directory": str(directory),
        "page_cache": "dropped (posix_fadvise)" if hasattr(os, "posix_fadvise") else "bypassed (F_NOCACHE)",
    }


def memory_bandwidth(size: int = 256 << 20, repeats: int = 5) -> dict[str, Any]:
    """Bytes/s at which MLX reads a `size`-byte array on its default device (a sum over it, best of
    `repeats`): how fast a token can read the resident weights."""
    import mlx.core as mx

    a = mx.ones((size // 4,), dtype=mx.float32)
    mx.eval(a)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(mx.sum(a))
        best = min(best, time.perf_counter() - start)
    del a
    return {"bytes_per_second": size / best, "bytes": size, "device": str(mx.default_device())}
