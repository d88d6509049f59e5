"""`mlx-flash fit`: will a model fit this machine? The math, in one place.

weights  = params * (bits + 32 / group_size) / 8        bytes; each group of `group_size` weights
                                                          carries an fp16 scale and bias (32 bits);
                                                          bits 16 means unquantized (no groups)
active   = active_params * the same bits per weight     bytes read per token
kv       = 2 * layers * kv_heads * head_dim * context * 2 bytes (fp16 keys and values)
fits                    weights + kv <= available memory
fits with streaming     active + kv <= available: experts stream from disk; every token reads
                        at most the active weights, so tok/s >= disk_bandwidth / active
does not fit            otherwise
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from mlx_flash import _native

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
    min_tokens_per_second: float | None  # only when streaming, from the disk bandwidth


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
        return Fit(weights, active_bytes, kv, available, "fits", None)
    if active < params and active_bytes + kv <= available:
        rate = disk_bandwidth / active_bytes if disk_bandwidth and active_bytes else None
        return Fit(weights, active_bytes, kv, available, "fits with expert streaming", rate)
    return Fit(weights, active_bytes, kv, available, "does not fit", None)


def from_config(path: Path) -> dict[str, float]:
    """params (from safetensors sizes), bits, group size and KV shape from a local model directory."""
    config = json.loads((path / "config.json").read_text())
    quant = config.get("quantization") or {}
    dense = 32 if config.get("torch_dtype") == "float32" else 16
    bits = float(quant.get("bits", dense))
    group = int(quant.get("group_size", 64))
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    heads = int(config.get("num_attention_heads", 1))
    return {
        "params": size * 8 / bits_per_weight(bits, group),
        "bits": bits,
        "group_size": group,
        "layers": int(config.get("num_hidden_layers", 0)),
        "kv_heads": int(config.get("num_key_value_heads", heads)),
        "head_dim": int(config.get("head_dim", config.get("hidden_size", 0) // heads)),
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mlx-flash fit", description="Will a model fit this machine?")
    p.add_argument("--params", type=parse_count, help="total parameters, e.g. 30B")
    p.add_argument("--active", type=parse_count, help="active parameters per token (MoE), e.g. 3B")
    p.add_argument("--bits", type=float, default=4, help="bits per weight (16 = unquantized)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--model", type=Path, help="a local model directory (config.json + safetensors)")
    p.add_argument("--context", type=int, default=4096, help="tokens of KV cache to budget")
    p.add_argument("--memory", type=parse_count, help="bytes available (default: this machine's)")
    p.add_argument("--disk-bandwidth", type=parse_count, default=0, help="bytes/s, e.g. 3B for 3 GB/s")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    shape: dict[str, float] = {"layers": 0, "kv_heads": 0, "head_dim": 0}
    if args.model:
        shape = from_config(args.model)
        args.params, args.bits, args.group_size = shape["params"], shape["bits"], int(shape["group_size"])
    if args.params is None:
        p.error("give --params (and --active for a mixture of experts) or --model PATH")
    available = args.memory or float(_native.memory_snapshot()["effective_available_bytes"])
    result = fit(
        args.params,
        args.active or args.params,
        args.bits,
        available,
        group_size=args.group_size,
        layers=int(shape["layers"]),
        kv_heads=int(shape["kv_heads"]),
        head_dim=int(shape["head_dim"]),
        context=args.context,
        disk_bandwidth=args.disk_bandwidth,
    )
    if args.json:
        print(json.dumps(asdict(result)))  # noqa: T201 - user-facing
    else:
        gb = 1e9
        rate = f", >= {result.min_tokens_per_second:.1f} tok/s" if result.min_tokens_per_second else ""
        r = result
        print(  # noqa: T201 - user-facing
            f"{r.verdict}: weights {r.weights_bytes / gb:.2f} GB, active {r.active_bytes / gb:.2f}"
            f" GB, KV {r.kv_bytes / gb:.2f} GB, available {r.available_bytes / gb:.2f} GB{rate}"
        )
    return 0
