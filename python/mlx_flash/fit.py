"""`mlx-flash fit`: will a model fit this machine? The math, in one place.

weights  = params * (bits + 32 / group_size) / 8        bytes; each group of `group_size` weights
                                                          carries an fp16 scale and bias (32 bits);
                                                          bits 16 means unquantized (no groups)
active   = active_params * the same bits per weight     bytes read per token
kv       = 2 * layers * kv_heads * head_dim * context * 2 bytes (fp16 keys and values)
fits                    weights + kv <= available memory
fits with streaming     active + kv <= available: experts stream from disk (a mixture of experts only)
does not fit            otherwise

Streaming speed, from PERF.md's bound (time per token = t_resident + (1 - h) * B / W) with the compute
term left out, so a disk-bound ceiling: B = active bytes (what a token reads at most), W = the disk's
read bandwidth, h = the expert cache's hit rate. The band runs from h = 0 (every expert read) to h = the
share of expert bytes the memory left over can cache,
    cached = (available - active - kv) / (weights - active),
the hit rate of a cache that size under uniform routing (real routers repeat experts, and do better):
    tok/s in [W / B, W / ((1 - cached) * B)]
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


def fit(
    params: float,
    active: float,
    bits: float,
    available: float,
    *,
    group_size: int = 64,
    layers: int = 0,
    kv_heads: int = 0,
    head_dim: int = 0,
    context: int = 0,
    disk_bandwidth: float = 0.0,
) -> Fit:
    bpw = bits_per_weight(bits, group_size)
    weights, active_bytes = params * bpw / 8, active * bpw / 8
    kv = 2.0 * layers * kv_heads * head_dim * context * 2
    if weights + kv <= available:
        return Fit(weights, active_bytes, kv, available, "fits", None, None)
    if active < params and active_bytes + kv <= available:
        cached = (available - active_bytes - kv) / (weights - active_bytes)
        band = None
        if disk_bandwidth and active_bytes:
            low = disk_bandwidth / active_bytes
            band = (low, low / (1 - cached))
        return Fit(weights, active_bytes, kv, available, "fits with expert streaming", cached, band)
    return Fit(weights, active_bytes, kv, available, "does not fit", None, None)


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
    return {
        "params": params,
        "active": params - inactive_expert_params(config),
        "bits": bits,
        "group_size": group,
        "layers": int(config.get("num_hidden_layers", 0)),
        "kv_heads": int(config.get("num_key_value_heads", heads)),
        "head_dim": int(config.get("head_dim", config.get("hidden_size", 0) // heads)),
    }


def inactive_expert_params(config: dict[str, object]) -> float:
    """Expert parameters a token does not use, for a config with SwitchGLU experts (gate, up and down
    projections: 3 * hidden * expert_intermediate each): (experts - experts_per_token) * per expert in
    every MoE layer. 0 for a dense model."""
    c = cast(dict[str, Any], config.get("text_config", config))
    experts = int(c.get("num_experts") or c.get("num_local_experts") or c.get("n_routed_experts") or 0)
    per_token = int(c.get("num_experts_per_tok") or 0)
    if experts <= 1 or not per_token:
        return 0.0
    inter = int(c.get("moe_intermediate_size") or c.get("intermediate_size") or 0)
    layers = int(c.get("num_hidden_layers", 0))
    step = int(c.get("decoder_sparse_step") or 1)
    dense = set(c.get("mlp_only_layers") or [])
    first_dense = int(c.get("first_k_dense_replace") or 0)
    moe_layers = [i for i in range(layers) if i >= first_dense and i not in dense and (i + 1) % step == 0]
    return float(len(moe_layers) * (experts - per_token) * 3 * int(c["hidden_size"]) * inter)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mlx-flash fit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--params", type=parse_count, help="total parameters, e.g. 30B")
    p.add_argument("--active", type=parse_count, help="active parameters per token (MoE), e.g. 3B")
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
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    shape: dict[str, float] = {"layers": 0, "kv_heads": 0, "head_dim": 0}
    if args.model:
        shape = from_config(args.model)
        args.params, args.bits, args.group_size = shape["params"], shape["bits"], int(shape["group_size"])
        args.active = args.active or shape["active"]
    if args.params is None:
        p.error("give --params (and --active for a mixture of experts) or --model PATH")
    available = args.memory or float(_native.memory_snapshot()["effective_available_bytes"])
    result = _fit_args(args, shape, available, args.disk_bandwidth or 0.0)
    if result.verdict == "fits with expert streaming" and args.disk_bandwidth is None:
        result = _fit_args(args, shape, available, disk_bandwidth(model_dir())["bytes_per_second"])
    if args.json:
        print(json.dumps(asdict(result)))  # noqa: T201 - user-facing
    else:
        print(describe(result))  # noqa: T201 - user-facing
    return 0


def _fit_args(args: argparse.Namespace, shape: dict[str, float], available: float, bandwidth: float) -> Fit:
    return fit(
        args.params,
        args.active or args.params,
        args.bits,
        available,
        group_size=args.group_size,
        layers=int(shape["layers"]),
        kv_heads=int(shape["kv_heads"]),
        head_dim=int(shape["head_dim"]),
        context=args.context,
        disk_bandwidth=bandwidth,
    )


def describe(r: Fit) -> str:
    gb = 1e9
    line = (
        f"{r.verdict}: weights {r.weights_bytes / gb:.2f} GB, active {r.active_bytes / gb:.2f} GB,"
        f" KV {r.kv_bytes / gb:.2f} GB, available {r.available_bytes / gb:.2f} GB"
    )
    if r.cached_share is not None:
        line += f"; {r.cached_share:.0%} of the experts fit in memory"
    if r.tokens_per_second:
        low, high = r.tokens_per_second
        line += f", disk-bound {low:.1f}-{high:.1f} tok/s"
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
