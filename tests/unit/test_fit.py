"""`mlx-flash fit` against numbers computed by hand."""

from __future__ import annotations

import json
import subprocess

from helpers import mlx_flash_command
from mlx_flash.demo import DEMO_MODEL_PATH


def _fit(*args: str) -> dict[str, object]:
    out = subprocess.run(
        [*mlx_flash_command(), "fit", *args, "--json"], capture_output=True, text=True, check=True
    )
    return dict(json.loads(out.stdout))


def test_moe_30b_a3b_4bit_by_hand() -> None:
    # 4-bit, group 64: 4 + 32/64 = 4.5 bits per weight.
    # weights = 30e9 * 4.5 / 8 = 16.875e9 bytes; active = 3e9 * 4.5 / 8 = 1.6875e9 bytes; no KV shape.
    base = ["--params", "30B", "--active", "3B", "--bits", "4"]
    roomy = _fit(*base, "--memory", "32B")
    assert roomy == {
        "weights_bytes": 16.875e9,
        "active_bytes": 1.6875e9,
        "kv_bytes": 0.0,
        "available_bytes": 32e9,
        "verdict": "fits",
        "cached_share": None,
        "tokens_per_second": None,
        "streamed_bytes": None,
        "resident_bytes": None,
        "disk_bandwidth": None,
        "memory_bandwidth": None,
    }
    # 8 GB: 16.875 > 8 but 1.6875 <= 8, so experts stream. Without --active-experts every active byte
    # counts as streamed and as resident (the conservative band), so memory is not measured. Memory
    # left for experts: 8 - 1.6875 = 6.3125 GB of the 16.875 - 1.6875 = 15.1875 GB of experts, 41.56%.
    # At 3 GB/s: no hits 3 / 1.6875 = 1.7778 tok/s; hits on the cached share 1.7778 / (1 - 0.41564) =
    # 3.04225 tok/s.
    tight = _fit(*base, "--memory", "8B", "--disk-bandwidth", "3B")
    assert tight["verdict"] == "fits with expert streaming"
    assert abs(float(tight["cached_share"] or 0) - 6.3125 / 15.1875) < 1e-12  # type: ignore[arg-type]
    low, high = tight["tokens_per_second"]  # type: ignore[misc]
    assert abs(low - 1.77777778) < 1e-6 and abs(high - 3.04225) < 1e-4
    assert tight["streamed_bytes"] == 1.6875e9 and tight["resident_bytes"] is None
    assert tight["memory_bandwidth"] is None and tight["disk_bandwidth"] == 3e9
    assert _fit(*base, "--memory", "1B")["verdict"] == "does not fit"


def test_streaming_band_follows_the_bound_by_hand() -> None:
    # 1.8B of the 3B active parameters are routed experts: a token streams 1.8e9 * 4.5 / 8 = 1.0125e9
    # bytes and reads the other 1.2e9 * 4.5 / 8 = 0.675e9 resident bytes from memory.
    out = _fit(
        *["--params", "30B", "--active", "3B", "--active-experts", "1.8B", "--bits", "4"],
        *["--memory", "8B", "--disk-bandwidth", "3B", "--memory-bandwidth", "100B"],
    )
    assert out["streamed_bytes"] == 1.0125e9 and out["resident_bytes"] == 0.675e9
    assert out["disk_bandwidth"] == 3e9 and out["memory_bandwidth"] == 100e9
    # cached = (8 - 0.675) / (16.875 - 0.675) = 7.325 / 16.2 = 0.452160; t_resident = 0.675 / 100 =
    # 0.00675 s; B / W = 1.0125 / 3 = 0.3375 s. No hits: 1 / (0.00675 + 0.3375) = 2.904866 tok/s;
    # hits on the cached share: 1 / (0.00675 + 0.547840 * 0.3375) = 1 / 0.191646 = 5.217958 tok/s.
    assert abs(float(out["cached_share"]) - 0.4521605) < 1e-7  # type: ignore[arg-type]
    low, high = out["tokens_per_second"]  # type: ignore[misc]
    assert abs(low - 2.904866) < 1e-6 and abs(high - 5.217958) < 1e-6


def test_dense_8b_unquantized_does_not_stream() -> None:
    # 16 bits: no groups, 8e9 * 16 / 8 = 16e9 bytes; dense (active = params) never streams.
    out = _fit("--params", "8B", "--bits", "16", "--memory", "10B")
    assert out["weights_bytes"] == 16e9 and out["verdict"] == "does not fit"


def test_model_path_reads_config_and_safetensors_sizes() -> None:
    # The demo: float32 (32 bits per weight), 4 layers, 2 KV heads, head_dim 48.
    size = sum(f.stat().st_size for f in DEMO_MODEL_PATH.glob("*.safetensors"))
    out = _fit("--model", str(DEMO_MODEL_PATH), "--context", "1024", "--memory", "1B")
    assert out["weights_bytes"] == size  # params = size * 8 / 32, weights = params * 32 / 8
    assert out["kv_bytes"] == 2 * 4 * 2 * 48 * 1024 * 2  # = 1,572,864 bytes
    # A mixture of experts (4 layers, 8 experts of 3 * 192 * 128, 2 per token): a token leaves
    # 4 * 6 * 3 * 192 * 128 = 1,769,472 parameters (7,077,888 bytes at 32 bits) unused.
    assert out["active_bytes"] == size - 7_077_888
    assert out["verdict"] == "fits"
    # Squeezed to stream: a token's 2 experts per layer, 4 * 2 * 3 * 192 * 128 = 589,824 parameters
    # (2,359,296 bytes at 32 bits), stream; the rest of the active weights stays resident.
    # 8 MB holds the active weights and the KV (4,804,664 + 1,572,864 bytes) but not all 11.9 MB.
    tight = _fit("--model", str(DEMO_MODEL_PATH), "--context", "1024", "--memory", "8000000")
    assert tight["verdict"] == "fits with expert streaming"
    assert tight["streamed_bytes"] == 2_359_296
    assert tight["resident_bytes"] == size - 7_077_888 - 2_359_296
    low, high = tight["tokens_per_second"]  # type: ignore[misc]
    assert 0 < low < high and float(tight["memory_bandwidth"]) > 0  # type: ignore[arg-type]


def test_streaming_without_a_bandwidth_measures_the_disk() -> None:
    out = _fit("--params", "30B", "--active", "3B", "--memory", "8B")
    low, high = out["tokens_per_second"]  # type: ignore[misc]
    assert 0 < low < high


def test_memory_bandwidth_is_measured() -> None:
    from mlx_flash.fit import memory_bandwidth

    got = memory_bandwidth(size=32 << 20, repeats=3)
    # Any machine that runs MLX reads memory faster than 100 MB/s and slower than 10 TB/s.
    assert 1e8 < got["bytes_per_second"] < 1e13 and got["bytes"] == 32 << 20
