"""Expert streaming on a Qwen3-30B-A3B-shaped MoE (4-bit, random weights) in half its size of memory.

    python bench/expert_streaming.py            # 8 of the 48 layers, everything else full size (~25 min)
    python bench/expert_streaming.py --quick    # 2 layers, 830-token vocabulary (~4 min), results/quick/
    python bench/expert_streaming.py --layers 48 --model-dir /work/qwen3-30b-a3b-shape   # the real size

The checkpoint is written directly, tensor by tensor (random packed uint32 weights, bf16 scales and
biases), with the names, shapes and dtypes of mlx-lm's qwen3_moe after `mlx_lm.utils.quantize_model`
(4-bit, group size 64; the routers at 8 bits, as mlx-lm's convert does), in sharded safetensors with an
index, beside the demo model's tokenizer; it is cached in --model-dir. Steps:

1. W: cold parallel positional reads of whole experts (records of one expert tensor: 768 KiB weights,
   48 KiB scales/biases; queue depth 8, the store's threads): plain `os.preadv` on a thread pool, against
   `ExpertStore.read` called as a pool calls it (one layer's experts per call). Target ours >= 0.8x raw.
2. Stock mlx-lm (`load` + `generate_step`) in a cgroup v1 memory limit of half the checkpoint: what happens.
3. Ours in the same cgroup (`start_empty(budget)`): decode tok/s after a warm-up, hit rate h, bytes read
   per token, read bandwidth, and t_bound / t_actual with t_bound = t_resident + (1 - h) * B_expert / W
   (t_resident from step 4, B_expert = top-k x layers x bytes of one expert). Target >= 0.7.
4. Outside any cgroup, the model resident: ours (streamer at full budget) against stock mlx-lm on the same
   loaded weights (the MoE blocks swapped between mlx-lm's and ours), A B / B A pairs. Target >= 0.97x.
5. Balloon: ours decodes in the cgroup with `follow()`, and a second process in the cgroup allocates more
   than the cgroup has free, holds it, releases it. No OOM kill, the pools shrink within 2 s, grow back.
6. Greedy parity: every run's tokens equal the stock reference run's.

Writes bench/results/expert_streaming.json. Linux, root (cgroup v1 memory controller, drop_caches).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "expert_streaming.json"
QUICK_OUT = ROOT / "bench" / "results" / "quick" / "expert_streaming.json"
DEMO_MODEL = ROOT / "python" / "mlx_flash" / "demo" / "model"
CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
TARGETS = {"store_over_raw": 0.8, "bound_ratio": 0.7, "resident_ratio": 0.97, "shrink_within_s": 2.0}

# Qwen3-30B-A3B (config.json of Qwen/Qwen3-30B-A3B), the shape measured; --layers and --vocab scale it.
QWEN3_30B_A3B: dict[str, Any] = {
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "num_hidden_layers": 48,
    "intermediate_size": 6144,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 768,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": False,
    "vocab_size": 151936,
    "torch_dtype": "bfloat16",
}
GROUP_SIZE, BITS = 64, 4
# Dequantized weights get a standard deviation of GAIN / sqrt(fan-in): varied, non-degenerate tokens.
GAIN = 2.0
MARKER = "mlxf-bench-model.json"  # written last: the directory holds a complete checkpoint


# ---------------------------------------------------------------- the checkpoint


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors: U32 or BF16
    bits: int  # of the quantized module it belongs to (0: not quantized)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * (4 if self.dtype == "U32" else 2)


def model_config(layers: int, vocab: int) -> dict[str, Any]:
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    return {
        **QWEN3_30B_A3B,
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "eos_token_id": config["eos_token_id"],
    }


def checkpoint_spec(config: dict[str, Any]) -> tuple[list[Tensor], dict[str, Any]]:
    """The tensors mlx-lm saves for `config` at 4 bits, and its quantization config, read off a lazy
    mlx-lm model (nothing is computed: a 30B model never exists in memory)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen3_moe
    from mlx_lm.utils import quantize_model

    model_args: Any = qwen3_moe.ModelArgs
    model = qwen3_moe.Model(model_args.from_dict(config))
    model.set_dtype(mx.bfloat16)
    with contextlib.redirect_stdout(sys.stderr):  # it prints bits per weight
        model, quantized = quantize_model(model, dict(config), group_size=GROUP_SIZE, bits=BITS)
    quant = quantized["quantization"]
    out = []
    flat: Any = tree_flatten(model.parameters())
    for name, v in flat:
        module = name.rsplit(".", 1)[0]
        bits = 0
        if v.dtype == mx.uint32 or name.endswith((".scales", ".biases")):
            bits = quant.get(module, {}).get("bits", quant["bits"])
        dtype = {mx.uint32: "U32", mx.bfloat16: "BF16"}[v.dtype]
        out.append(Tensor(name, tuple(v.shape), dtype, bits))
    return out, quant


def _bf16(x: np.ndarray[Any, np.dtype[np.float32]]) -> np.ndarray[Any, np.dtype[np.uint16]]:
    """float32 -> bfloat16 bits (round to nearest even)."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def tensor_bytes(t: Tensor, rng: np.random.Generator, scales: dict[str, np.ndarray[Any, Any]]) -> bytes:
    """Random contents for one tensor: uniform packed weights; scales around GAIN / (std(q) sqrt(fan-in))
    and biases centring the codes at zero (mlx affine: w = q * scale + bias); norms at one."""
    module, kind = t.name.rsplit(".", 1)
    if t.dtype == "U32":
        return rng.integers(0, 2**32, size=t.shape, dtype=np.uint32).tobytes()
    if kind == "scales":
        fan_in = t.shape[-1] * GROUP_SIZE
        std_q = ((2**t.bits) ** 2 - 1) ** 0.5 / 12**0.5
        s = rng.uniform(0.5, 1.5, size=t.shape).astype(np.float32) * (GAIN / (std_q * fan_in**0.5))
        scales[module] = s
        return _bf16(s).tobytes()
    if kind == "biases":
        return _bf16(-(2**t.bits - 1) / 2 * scales.pop(module)).tobytes()
    return _bf16(np.ones(t.shape, dtype=np.float32)).tobytes()  # RMSNorm weights


def write_checkpoint(path: Path, config: dict[str, Any], seed: int, shard_bytes: int) -> dict[str, Any]:
    """Write the quantized checkpoint for `config` into `path`, tensor by tensor, in shards of at most
    `shard_bytes`, as mlx-lm's save_model lays them out (model-0000i-of-0000n.safetensors + index)."""
    tensors, quant = checkpoint_spec(config)
    shards: list[list[Tensor]] = []
    size = 0
    for t in tensors:
        if not shards or size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    path.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (path / MARKER).unlink()
    for old in path.glob("*.safetensors"):
        old.unlink()
    rng = np.random.default_rng(seed)
    scales: dict[str, np.ndarray[Any, Any]] = {}
    weight_map, files = {}, {}
    for i, shard in enumerate(shards):
        name = (
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        )
        header: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
        offset = 0
        for t in shard:
            header[t.name] = {
                "dtype": t.dtype,
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
            weight_map[t.name] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with (path / name).open("wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for t in shard:
                data = tensor_bytes(t, rng, scales)
                assert len(data) == t.nbytes, t
                f.write(data)
        files[name] = (path / name).stat().st_size
    total = sum(t.nbytes for t in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
    full = {**config, "quantization": quant, "quantization_config": quant}
    (path / "config.json").write_text(json.dumps(dict(sorted(full.items())), indent=4))
    for tok in ("tokenizer.json", "tokenizer_config.json"):
        (path / tok).write_bytes((DEMO_MODEL / tok).read_bytes())
    return {"files": files, "total_bytes": total, "tensors": len(tensors)}


def safetensors_layout(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor of the safetensors files in `path`: name -> (dtype, shape)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        out.update({k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()})
    return out


def verify_writer(seed: int) -> dict[str, Any]:
    """A tiny qwen3_moe written by `write_checkpoint` against the same one built by mlx-lm (Model ->
    bf16 -> quantize_model -> save_model): same tensor names, dtypes, shapes and quantization config;
    and mlx_lm.utils.load (strict) loads ours and generates."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models import qwen3_moe
    from mlx_lm.utils import load, quantize_model, save_model

    tiny = {
        **model_config(2, 830),
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
    }
    with tempfile.TemporaryDirectory(prefix="mlxf-bench-") as tmp:
        ours, theirs = Path(tmp) / "ours", Path(tmp) / "mlx_lm"
        write_checkpoint(ours, tiny, seed, 1 << 20)  # small shards: the index path too
        model_args: Any = qwen3_moe.ModelArgs
        model = qwen3_moe.Model(model_args.from_dict(tiny))
        model.set_dtype(mx.bfloat16)
        with contextlib.redirect_stdout(sys.stderr):
            model, quantized = quantize_model(model, dict(tiny), group_size=GROUP_SIZE, bits=BITS)
        mx.eval(model.parameters())
        save_model(theirs, model)
        a, b = safetensors_layout(ours), safetensors_layout(theirs)
        ours_quant = json.loads((ours / "config.json").read_text())["quantization"]
        loaded: Any = load(str(ours))  # strict: every name and shape must match the model's
        prompt = mx.array([5, 6, 7, 8])
        tokens = [int(t) for t, _ in generate_step(prompt, loaded[0], max_tokens=4)]
    problems = [
        f"{k}: ours {a.get(k)} mlx-lm {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
    ]
    if ours_quant != quantized["quantization"]:
        problems.append(f"quantization config: ours {ours_quant}, mlx-lm {quantized['quantization']}")
    if problems:
        raise RuntimeError("the checkpoint writer disagrees with mlx-lm:\n  " + "\n  ".join(problems))
    return {"tensors_compared": len(a), "layout_equal": True, "quantization_equal": True, "tokens": tokens}


def ensure_model(path: Path, config: dict[str, Any], seed: int, shard_bytes: int) -> dict[str, Any]:
    """The checkpoint at `path`: reused when its marker says it is complete and of this config."""
    marker = path / MARKER
    want = {"config": config, "seed": seed, "shard_bytes": shard_bytes, "gain": GAIN}
    if marker.exists():
        have = json.loads(marker.read_text())
        sizes_ok = all(
            (path / f).exists() and (path / f).stat().st_size == s for f, s in have.get("files", {}).items()
        )
        if {k: have.get(k) for k in want} == want and sizes_ok:
            return {**have, "reused": True}
    started = time.perf_counter()
    print(f"writing the checkpoint into {path} ...", flush=True)
    info = write_checkpoint(path, config, seed, shard_bytes)
    os.sync()
    info = {**want, **info, "write_s": round(time.perf_counter() - started, 1)}
    marker.write_text(json.dumps(info, indent=1))
    return {**info, "reused": False}


# ---------------------------------------------------------------- 1. read bandwidth


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def disk_bytes_read(path: Path) -> int:
    """Bytes the block device holding `path` has read so far (/proc/diskstats), to see read amplification
    (readahead) beside the bytes asked for."""
    dev = os.stat(path).st_dev
    for line in Path("/proc/diskstats").read_text().splitlines():
        f = line.split()
        if (int(f[0]), int(f[1])) == (os.major(dev), os.minor(dev)):
            return int(f[5]) * 512
    return 0


def device_queue(path: Path) -> dict[str, str]:
    """The block device's readahead and scheduler settings, which shape buffered random reads."""
    dev = os.stat(path).st_dev
    queue = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/queue")
    out = {}
    for name in ("read_ahead_kb", "scheduler", "nr_requests", "rotational"):
        with contextlib.suppress(OSError):
            out[name] = (queue / name).read_text().strip()
    return out


@dataclass(frozen=True)
class Batch:
    """One store call: experts of one layer, every tensor of the layer (what a pool asks on a miss)."""

    names: tuple[str, ...]
    experts: tuple[int, ...]


def read_batches(store: Any, count: int, per_batch: int, seed: int) -> list[Batch]:
    """`count` batches of `per_batch` distinct experts of one layer; no expert is read twice."""
    by_layer: dict[str, list[str]] = {}
    for name in store.tensors:
        by_layer.setdefault(name.split(".mlp.")[0], []).append(name)
    rng = random.Random(seed)
    chunks = []
    for names in by_layer.values():
        experts = list(range(store.tensors[names[0]].num_experts))
        rng.shuffle(experts)
        for i in range(0, len(experts) - per_batch + 1, per_batch):
            chunks.append(Batch(tuple(names), tuple(experts[i : i + per_batch])))
    rng.shuffle(chunks)
    if len(chunks) < count:
        raise ValueError(f"only {len(chunks)} distinct batches of {per_batch} experts in this model")
    return chunks[:count]


def spans(store: Any, batches: Sequence[Batch]) -> list[list[tuple[Path, int, int]]]:
    """Per batch, (file, offset, size) of every record the store reads for it."""
    out = []
    for b in batches:
        out.append(
            [
                (store.tensors[n].location.file, store.tensors[n].offset(e), store.tensors[n].expert_bytes)
                for n in b.names
                for e in b.experts
            ]
        )
    return out


def raw_read(records: list[list[tuple[Path, int, int]]], threads: int, batched: bool) -> tuple[float, bytes]:
    """Plain positional reads of `records` by `threads` threads into one buffer: one queue kept `threads`
    deep (`batched`: each batch waited for before the next, as the store is called). Seconds, and the
    first batch's bytes (checked against the store's)."""
    flat = [r for batch in records for r in batch]
    fds = {f: os.open(f, os.O_RDONLY) for f in {r[0] for r in flat}}
    buf = np.empty(sum(r[2] for r in flat), dtype=np.uint8)
    view = buf.data
    starts = np.concatenate([[0], np.cumsum([r[2] for r in flat])]).tolist()

    def one(i: int) -> None:
        f, offset, size = flat[i]
        into, done = view[starts[i] : starts[i] + size], 0
        while done < size:
            n = os.preadv(fds[f], [into[done:]], offset + done)
            if n == 0:
                raise OSError(f"{f}: end of file at {offset + done}")
            done += n

    try:
        with ThreadPoolExecutor(threads) as pool:
            started = time.perf_counter()
            if batched:
                i = 0
                for batch in records:
                    list(pool.map(one, range(i, i + len(batch))))
                    i += len(batch)
            else:
                list(pool.map(one, range(len(flat))))
            seconds = time.perf_counter() - started
    finally:
        for fd in fds.values():
            os.close(fd)
    return seconds, bytes(buf[: sum(r[2] for r in records[0])])


def store_read(store: Any, batches: Sequence[Batch]) -> tuple[float, bytes]:
    """`ExpertStore.read` of each batch in turn, its arrays evaluated. Seconds, and the first batch's bytes
    in the order raw_read lays them out (tensor by tensor, expert by expert)."""
    import mlx.core as mx

    first = b""
    started = time.perf_counter()
    for i, b in enumerate(batches):
        out = store.read(list(b.names), list(b.experts))
        mx.eval(list(out.values()))
        if i == 0:
            first = b"".join(
                np.array(out[n].view(mx.uint16) if out[n].dtype == mx.bfloat16 else out[n]).tobytes()
                for n in b.names
            )
    seconds = time.perf_counter() - started
    return seconds, first


def bandwidth(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Cold read bandwidth of the experts: raw (one queue), raw in the store's batches, and the store,
    rotating which goes first; every trial after dropping the page cache."""
    from mlx_flash.experts.store import ExpertStore

    names = [n for n, _ in safetensors_layout(model_dir).items() if ".switch_mlp." in n]
    store = ExpertStore(model_dir, names, threads=args.read_threads)
    try:
        top_k = int(json.loads((model_dir / "config.json").read_text())["num_experts_per_tok"])
        batches = read_batches(store, args.read_batches, top_k, args.seed)
        records = spans(store, batches)
        total = sum(r[2] for batch in records for r in batch)
        sizes = sorted({r[2] for batch in records for r in batch})
        kinds: dict[str, Callable[[], tuple[float, bytes]]] = {
            "raw": lambda: raw_read(records, args.read_threads, batched=False),
            "raw_batched": lambda: raw_read(records, args.read_threads, batched=True),
            "ours": lambda: store_read(store, batches),
        }
        order = list(kinds)
        rounds: list[dict[str, Any]] = []
        firsts: dict[str, bytes] = {}
        for r in range(args.read_pairs + 1):  # the first round is the warm-up
            got: dict[str, Any] = {"order": order[r % 3 :] + order[: r % 3], "warmup": r == 0}
            for kind in got["order"]:
                drop_caches()
                disk = disk_bytes_read(model_dir)
                seconds, firsts[kind] = kinds[kind]()
                got[kind] = {
                    "seconds": round(seconds, 4),
                    "gb_s": round(total / seconds / 1e9, 4),
                    "disk_read_over_asked": round((disk_bytes_read(model_dir) - disk) / total, 3),
                }
            got["ours_over_raw"] = round(got["ours"]["gb_s"] / got["raw"]["gb_s"], 4)
            got["ours_over_raw_batched"] = round(got["ours"]["gb_s"] / got["raw_batched"]["gb_s"], 4)
            rounds.append(got)
            print(
                f"   read round {r}{' (warm-up)' if r == 0 else ''}: raw {got['raw']['gb_s']:.3f} GB/s, "
                f"raw batched {got['raw_batched']['gb_s']:.3f}, ours {got['ours']['gb_s']:.3f} "
                f"-> {got['ours_over_raw']:.3f}x raw",
                flush=True,
            )
        if len({firsts[k] for k in kinds}) != 1:
            raise RuntimeError("the store read other bytes than plain positional reads of the same records")
        timed = [g for g in rounds if not g["warmup"]]
        return {
            "records": sum(len(b) for b in records),
            "record_bytes": sizes,
            "bytes_per_trial": total,
            "batches": len(batches),
            "experts_per_batch": top_k,
            "queue_depth": args.read_threads,
            "device": device_queue(model_dir),
            "same_bytes": True,
            "rounds": rounds,
            "median_gb_s": {k: round(statistics.median(g[k]["gb_s"] for g in timed), 4) for k in kinds},
            "median_ours_over_raw": round(statistics.median(g["ours_over_raw"] for g in timed), 4),
            "median_ours_over_raw_batched": round(
                statistics.median(g["ours_over_raw_batched"] for g in timed), 4
            ),
        }
    finally:
        store.close()


# ---------------------------------------------------------------- cgroups and child processes


@dataclass
class Cgroup:
    path: Path
    limit: int

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def stats(self) -> dict[str, int]:
        stat = dict(line.split() for line in self.read("memory.stat").splitlines())
        oom = dict(line.split() for line in self.read("memory.oom_control").splitlines())
        return {
            "usage_bytes": int(self.read("memory.usage_in_bytes")),
            "max_usage_bytes": int(self.read("memory.max_usage_in_bytes")),
            "failcnt": int(self.read("memory.failcnt")),
            "oom_kill": int(oom.get("oom_kill", -1)),
            "under_oom": int(oom.get("under_oom", -1)),
            "rss_bytes": int(stat["total_rss"]),
            "cache_bytes": int(stat["total_cache"]),
            "inactive_file_bytes": int(stat["total_inactive_file"]),
        }


@contextlib.contextmanager
def cgroup(name: str, limit: int) -> Iterator[Cgroup]:
    """A fresh cgroup v1 memory cgroup with `limit` bytes (page cache included), removed on exit; whoever
    uses it ends its own processes first."""
    path = CGROUP_ROOT / f"mlxf-bench-{os.getpid()}-{name}"
    path.mkdir()
    try:
        (path / "memory.limit_in_bytes").write_text(str(limit))
        yield Cgroup(path, limit)
    finally:
        for _ in range(50):  # a killed process leaves the cgroup a moment after it is reaped
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.1)
        else:
            print(f"   could not remove {path} (tasks: {(path / 'cgroup.procs').read_text().split()})")


class ChildDied(RuntimeError):
    pass


class Child:
    """This script run as `--child SPEC` (in `group`, if any): it takes commands through files in its own
    directory, reports progress as JSON lines, and answers each command with a result file."""

    def __init__(self, name: str, tmp: Path, spec: dict[str, Any], group: Cgroup | None = None) -> None:
        self.name = name
        self.dir = tmp / name
        self.dir.mkdir(parents=True)
        self.progress = self.dir / "progress.jsonl"
        self.log = self.dir / "log.txt"
        self.next = 0
        spec = {**spec, "dir": str(self.dir), "progress": str(self.progress)}
        (self.dir / "spec.json").write_text(json.dumps(spec))
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", str(self.dir / "spec.json")]
        if group is not None:  # the shell joins the cgroup, then becomes the child: nothing runs outside
            argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group.path / "cgroup.procs"), *argv]
        self.started = time.time()
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(FileNotFoundError), self.progress.open() as f:
            for line in f:
                with contextlib.suppress(json.JSONDecodeError):
                    e = json.loads(line)
                    if kind is None or e["event"] == kind:
                        out.append(e)
        return out

    def send(self, op: str, **args: Any) -> int:
        k, self.next = self.next, self.next + 1
        tmp = self.dir / f"cmd-{k}.tmp"
        tmp.write_text(json.dumps({"op": op, **args}))
        tmp.rename(self.dir / f"cmd-{k}.json")
        return k

    def wait(self, k: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        res = self.dir / f"res-{k}.json"
        while time.monotonic() < deadline:
            if res.exists():
                out: dict[str, Any] = json.loads(res.read_text())
                if "error" in out:
                    raise RuntimeError(f"{self.name}: {out['error']}")
                return out
            if self.process.poll() is not None:
                raise ChildDied(f"{self.name} exited with {self.process.returncode}: {self.tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: no answer after {timeout:.0f} s")

    def call(self, op: str, timeout: float, **args: Any) -> dict[str, Any]:
        return self.wait(self.send(op, **args), timeout)

    def tail(self, lines: int = 5) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.log.read_text().strip().splitlines()[-lines:])
        return ""

    def stop(self) -> int | None:
        """Ask it to exit; kill it (by its pid) if it does not."""
        if self.process.poll() is None:
            self.send("exit")
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


@contextlib.contextmanager
def children() -> Iterator[list[Child]]:
    """Every child started in the block is stopped when it ends, error or not."""
    started: list[Child] = []
    try:
        yield started
    finally:
        for c in started:
            with contextlib.suppress(Exception):
                c.stop()


# ---------------------------------------------------------------- the child side


class Progress:
    """JSON lines with a wall-clock time, so events of different processes line up."""

    def __init__(self, path: Path) -> None:
        self._f = path.open("a", buffering=1)
        self._lock = threading.Lock()

    def event(self, kind: str, **fields: Any) -> None:
        with self._lock:
            self._f.write(json.dumps({"t": time.time(), "event": kind, **fields}) + "\n")


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Host:
    """A model in a child process. `mode`: "stock" (mlx_lm.utils.load, every weight read), "resident"
    (ours at full budget; mlx-lm's MoE blocks kept so a run can use either on the same weights), or
    "streamed" (ours from `start_empty(budget)`)."""

    def __init__(self, spec: dict[str, Any], progress: Progress) -> None:
        self.spec = spec
        self.progress = progress
        self.model: Any = None
        self.streamer: Any = None
        self.blocks: dict[str, list[tuple[Any, str, Any]]] = {}

    def load(self) -> dict[str, Any]:
        import mlx.core as mx
        from mlx_lm.utils import load

        from mlx_flash.experts.pool import moe_layers
        from mlx_flash.experts.streamer import ExpertStreamer

        path, mode = Path(self.spec["model_dir"]), self.spec["mode"]
        self.progress.event("loading", rss_bytes=rss_bytes())
        started = time.perf_counter()
        if mode == "stock":
            loaded: Any = load(str(path))
            self.model = loaded[0]
        else:
            loaded = load(str(path), lazy=True)
            self.model = loaded[0]
            stock = moe_layers(self.model)
            policy = {"policy": self.spec["policy"]} if self.spec.get("policy") else {}
            self.streamer = ExpertStreamer(self.model, path, path.name, **policy)
            self.blocks = {"stock": stock, "ours": [(p, n, getattr(p, n)) for p, n, _ in stock]}
            if mode == "streamed":
                self.streamer.start_empty(int(self.spec["budget"]))
            mx.eval(self.model.parameters())
            threading.Thread(target=self._watch, daemon=True).start()
        gc.collect()
        out = {"seconds": round(time.perf_counter() - started, 2), "rss_bytes": rss_bytes(), **self.status()}
        self.progress.event("loaded", **out)
        return out

    def status(self) -> dict[str, Any]:
        return {
            "streamer": self.streamer.status() if self.streamer is not None else None,
            "memory": self.memory(),
        }

    def memory(self) -> dict[str, Any]:
        """Where this process's memory is: RSS beside MLX's arrays and cache, the pools, and the store's
        staging buffers (bytes held outside the pools' budget)."""
        import mlx.core as mx

        out: dict[str, Any] = {
            "rss_bytes": rss_bytes(),
            "mlx_active_bytes": mx.get_active_memory(),
            "mlx_cache_bytes": mx.get_cache_memory(),
        }
        if self.streamer is not None:
            staging = getattr(self.streamer.store, "_staging", {})
            out["pool_bytes"] = self.streamer.resident_bytes
            out["store_staging_bytes"] = sum(int(b.nbytes) for b in staging.values())
        return out

    def _watch(self) -> None:
        """Every change of the pools' capacity (experts per layer), as it happens."""
        last = None
        while True:
            cap = self.streamer.capacity
            if cap != last:
                self.progress.event("capacity", capacity=cap, resident_bytes=self.streamer.resident_bytes)
                last = cap
            time.sleep(0.02)

    def use(self, which: str) -> None:
        if not self.blocks:
            if which != "stock":
                raise ValueError(f"a stock model has no {which} blocks")
            return
        for parent, name, block in self.blocks[which]:
            setattr(parent, name, block)

    def counters(self) -> dict[str, Any]:
        if self.streamer is None:
            return {}
        c = self.streamer.counters
        return {
            "hits": c.hits,
            "misses": c.misses,
            "evictions": c.evictions,
            "bytes_read": c.bytes_read,
            "read_seconds": round(c.read_seconds, 6),
            "capacity": self.streamer.capacity,
        }

    def run(
        self,
        prompt: list[int],
        max_tokens: int,
        use: str = "ours",
        tag: str = "",
        stop_file: str | None = None,
        min_tokens: int = 0,
    ) -> dict[str, Any]:
        """Greedy tokens of `prompt` through mlx-lm's generate_step; the wall time and the pools' counters
        as each token arrives."""
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        self.use(use)
        tokens, times, counters = [], [], []
        start = time.time()
        before = self.counters()
        for i, (y, _) in enumerate(generate_step(mx.array(prompt), self.model, max_tokens=max_tokens)):
            now = time.time()
            c = self.counters()
            tokens.append(int(y))
            times.append(round(now - start, 4))
            counters.append(c)
            self.progress.event("token", tag=tag, i=i, token=int(y), **c)
            if stop_file and i + 1 >= min_tokens and Path(stop_file).exists():
                break
        return {
            "start": start,
            "tokens": tokens,
            "times": times,
            "before": before,
            "counters": counters,
            "memory": self.memory(),
        }

    def follow(self, floor: int) -> dict[str, Any]:
        if self.streamer._follower is None:  # one follower per streamer
            self.streamer.follow(floor)
        return self.status()

    def lm_head(self, samples: int) -> dict[str, Any]:
        """Seconds of the output projection alone for one token (to scale per-token time by layers)."""
        import mlx.core as mx

        x = mx.random.normal((1, 1, self.model.args.hidden_size)).astype(mx.bfloat16)
        out = []
        for _ in range(samples):
            started = time.perf_counter()
            mx.eval(self.model.lm_head(x))
            out.append(time.perf_counter() - started)
        return {"seconds": [round(s, 4) for s in out]}

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.close()


def serve(spec: dict[str, Any], progress: Progress) -> int:
    """Answer commands `cmd-<k>.json` with `res-<k>.json` until told to exit (or orphaned)."""
    import traceback

    host = Host(spec, progress)
    ops: dict[str, Callable[..., dict[str, Any]]] = {
        "load": host.load,
        "run": host.run,
        "follow": host.follow,
        "lm_head": host.lm_head,
        "status": host.status,
    }
    here, parent, k = Path(spec["dir"]), os.getppid(), 0
    try:
        while True:
            cmd = here / f"cmd-{k}.json"
            if not cmd.exists():
                if os.getppid() != parent:
                    return 1
                time.sleep(0.02)
                continue
            args = json.loads(cmd.read_text())
            op = args.pop("op")
            if op == "exit":
                return 0
            try:
                res = ops[op](**args)
            except Exception as e:
                res = {"error": f"{e!r}\n{traceback.format_exc()}"}
            tmp = here / f"res-{k}.tmp"
            tmp.write_text(json.dumps(res))
            tmp.rename(here / f"res-{k}.json")
            k += 1
    finally:
        host.close()


def balloon(spec: dict[str, Any], progress: Progress) -> int:
    """Allocate and touch `bytes` at `rate` bytes/s in 64 MiB chunks, hold them `hold` s, free them, and
    stay alive until `stop_file` exists."""
    size, rate, chunk = int(spec["bytes"]), float(spec["rate"]), 64 << 20
    parent = os.getppid()
    progress.event("start", rss_bytes=rss_bytes())
    chunks, allocated, started = [], 0, time.perf_counter()
    while allocated < size:
        n = min(chunk, size - allocated)
        chunks.append(np.ones(n, dtype=np.uint8))  # every page written: resident, anonymous
        allocated += n
        progress.event("alloc", bytes=allocated)
        time.sleep(max(0.0, started + allocated / rate - time.perf_counter()))
    progress.event("full", bytes=allocated, rss_bytes=rss_bytes())
    time.sleep(float(spec["hold"]))
    chunks.clear()
    gc.collect()
    progress.event("released", rss_bytes=rss_bytes())
    while not Path(spec["stop_file"]).exists() and os.getppid() == parent:
        time.sleep(0.1)
    progress.event("exit")
    return 0


def child(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    progress = Progress(Path(spec["progress"]))
    if spec["role"] == "balloon":
        return balloon(spec, progress)
    return serve(spec, progress)


# ---------------------------------------------------------------- the measurements


def prompt_ids(seed: int, i: int, n: int) -> list[int]:
    """`n` token ids the demo tokenizer has (< 830), above its special tokens; a fresh prompt per `i`."""
    return random.Random(f"{seed}:prompt:{i}").sample(range(4, 830), n)


def decode_tok_s(run: dict[str, Any]) -> float:
    """Tokens per second after the first token (which carries the prompt pass)."""
    t = run["times"]
    return float((len(t) - 1) / (t[-1] - t[0]))


def window(run: dict[str, Any]) -> dict[str, Any]:
    """What the pools did between the first and the last token of a run."""
    a, b = run["counters"][0], run["counters"][-1]
    d = {k: b[k] - a[k] for k in ("hits", "misses", "evictions", "bytes_read", "read_seconds")}
    n = len(run["counters"]) - 1
    uses = d["hits"] + d["misses"]
    return {
        "tokens": n,
        **d,
        "hit_rate": d["hits"] / uses if uses else 1.0,
        "bytes_per_token": d["bytes_read"] / n,
        "read_seconds_per_token": d["read_seconds"] / n,
        "read_gb_s": d["bytes_read"] / d["read_seconds"] / 1e9 if d["read_seconds"] else None,
    }


def stock_in_cgroup(
    args: argparse.Namespace, tmp: Path, model_dir: Path, limit: int, prompt: list[int], kids: list[Child]
) -> dict[str, Any]:
    """Stock mlx-lm (load + generate_step) in the memory limit: what happens within --stock-timeout."""
    drop_caches()
    with cgroup("stock", limit) as group:
        c = Child("stock", tmp, {"role": "model", "mode": "stock", "model_dir": str(model_dir)}, group)
        kids.append(c)
        deadline = time.monotonic() + args.stock_timeout
        outcome, error = "generated", None
        try:
            c.call("load", deadline - time.monotonic())
            c.call("run", deadline - time.monotonic(), prompt=prompt, max_tokens=args.tokens + 1, use="stock")
        except ChildDied as e:
            outcome, error = "died", str(e)
        except TimeoutError as e:
            outcome, error = "timed out", str(e)
        finally:
            code = c.stop()
        stats = group.stats()
    events = c.events()
    tokens = [e for e in events if e["event"] == "token"]
    killed = outcome == "died" and code == -9 and stats["oom_kill"] > 0
    out = {
        "outcome": "OOM-killed" if killed else outcome,
        "returncode": code,
        "error": error,
        "seconds_until_end": round((events[-1]["t"] if events else time.time()) - c.started, 2),
        "last_event": events[-1] if events else None,
        "tokens": len(tokens),
        "decode_tok_s": (len(tokens) - 1) / (tokens[-1]["t"] - tokens[0]["t"]) if len(tokens) > 1 else None,
        "cgroup": stats,
    }
    print(
        f"   stock mlx-lm in {limit / 2**30:.2f} GiB: {out['outcome']} after {out['seconds_until_end']} s "
        f"(last event: {events[-1]['event'] if events else 'none'}, oom_kill {stats['oom_kill']}, "
        f"max usage {stats['max_usage_bytes'] / 2**30:.2f} GiB)",
        flush=True,
    )
    return out


@dataclass
class Shape:
    """Byte counts of the checkpoint that the budget and the bound use."""

    total: int
    experts: int
    num_experts: int
    top_k: int
    layers: int
    kv_bytes_per_token: int

    @property
    def unit(self) -> int:
        """One expert in every layer."""
        return self.experts // self.num_experts

    @property
    def b_expert(self) -> int:
        """Expert bytes one token needs: top-k x layers x bytes per expert."""
        return self.top_k * self.unit


def shape_of(model_dir: Path) -> Shape:
    layout = safetensors_layout(model_dir)
    size = {"U32": 4, "BF16": 2}
    nbytes = {k: int(np.prod(s)) * size[d] for k, (d, s) in layout.items()}
    config = json.loads((model_dir / "config.json").read_text())
    return Shape(
        total=sum(nbytes.values()),
        experts=sum(v for k, v in nbytes.items() if ".switch_mlp." in k),
        num_experts=config["num_experts"],
        top_k=config["num_experts_per_tok"],
        layers=config["num_hidden_layers"],
        kv_bytes_per_token=2
        * config["num_hidden_layers"]
        * config["num_key_value_heads"]
        * config["head_dim"]
        * 2,
    )


def plan_budget(args: argparse.Namespace, shape: Shape, limit: int) -> dict[str, Any]:
    """The pool budget in the limit: limit - non-expert weights - runtime - KV - headroom, in whole
    experts per layer. The headroom is the follower's grow threshold (30% free), so the same budget runs
    with and without `follow()` and is what the pools grow back to."""
    non_expert = shape.total - shape.experts
    runtime = args.runtime_mb << 20
    kv = shape.kv_bytes_per_token * 256  # mlx-lm's KV cache grows in steps of 256 tokens
    headroom = int(args.headroom * limit)
    room = limit - non_expert - runtime - kv - headroom
    per_layer = room // shape.unit
    if per_layer < shape.top_k:
        raise ValueError(
            f"a {limit} B limit leaves {room} B for experts: not the top-{shape.top_k} per layer"
        )
    return {
        "limit_bytes": limit,
        "non_expert_bytes": non_expert,
        "runtime_bytes": runtime,
        "kv_bytes": kv,
        "headroom_bytes": headroom,
        "budget_bytes": per_layer * shape.unit,
        "experts_per_layer": per_layer,
        "of_experts_per_layer": shape.num_experts,
    }


def pairs_phase(
    args: argparse.Namespace, resident: Child, streamed: Child, shape: Shape, w: float
) -> dict[str, Any]:
    """Warm-up, then per pair on a fresh prompt: stock and ours on the resident weights, and ours streamed
    in the cgroup, in rotating order."""
    timeout = 600 + 120 * (args.tokens + args.warmup_tokens)
    p0 = prompt_ids(args.seed, 0, args.prompt_tokens)
    warm = streamed.call("run", timeout, prompt=p0, max_tokens=args.warmup_tokens, tag="warm-up")
    ref0 = resident.call("run", timeout, prompt=p0, max_tokens=args.warmup_tokens, use="stock", tag="warm-up")
    print(
        f"   warm-up: streamed {len(warm['tokens'])} tokens, parity {warm['tokens'] == ref0['tokens']}",
        flush=True,
    )
    kinds = [
        ("stock", resident, "stock"),
        ("ours_resident", resident, "ours"),
        ("ours_streamed", streamed, "ours"),
    ]
    pairs = []
    for i in range(args.pairs):
        prompt = prompt_ids(args.seed, i + 1, args.prompt_tokens)
        order = kinds[i % 3 :] + kinds[: i % 3]
        runs = {
            name: child.call(
                "run", timeout, prompt=prompt, max_tokens=args.tokens + 1, use=use, tag=f"pair {i}"
            )
            for name, child, use in order
        }
        tok_s = {k: decode_tok_s(r) for k, r in runs.items()}
        pools = window(runs["ours_streamed"])
        t_resident, t_actual = 1 / tok_s["ours_resident"], 1 / tok_s["ours_streamed"]
        t_bound = t_resident + (1 - pools["hit_rate"]) * shape.b_expert / w
        pair = {
            "prompt": prompt,
            "order": [k for k, _, _ in order],
            "runs": runs,
            "decode_tok_s": {k: round(v, 4) for k, v in tok_s.items()},
            "resident_ratio": round(tok_s["ours_resident"] / tok_s["stock"], 4),
            "pools": pools,
            "t_resident_s": round(t_resident, 4),
            "t_actual_s": round(t_actual, 4),
            "t_bound_s": round(t_bound, 4),
            "bound_ratio": round(t_bound / t_actual, 4),
            "parity": {
                "ours_resident": runs["ours_resident"]["tokens"] == runs["stock"]["tokens"],
                "ours_streamed": runs["ours_streamed"]["tokens"] == runs["stock"]["tokens"],
            },
        }
        pairs.append(pair)
        print(
            f"   pair {i + 1}/{args.pairs}: stock {tok_s['stock']:.4f} tok/s, ours resident "
            f"{tok_s['ours_resident']:.4f} ({pair['resident_ratio']:.3f}x), streamed "
            f"{tok_s['ours_streamed']:.4f} (h {pools['hit_rate']:.2f}, "
            f"{pools['bytes_per_token'] / 1e6:.0f} MB/token, bound ratio {pair['bound_ratio']:.3f}), "
            f"parity {pair['parity']}",
            flush=True,
        )
    return {
        "warmup": {"streamed": warm, "reference": ref0, "parity": warm["tokens"] == ref0["tokens"]},
        "pairs": pairs,
    }


def balloon_phase(
    args: argparse.Namespace,
    tmp: Path,
    group: Cgroup,
    streamed: Child,
    shape: Shape,
    kids: list[Child],
    rate_mib: int,
) -> dict[str, Any]:
    """Ours decodes with follow(); a balloon in the same cgroup, growing at `rate_mib` MiB/s, takes more
    than is free, holds it, releases it."""
    floor = args.floor or shape.top_k
    tag = f"balloon {rate_mib}"
    streamed.call("follow", 30, floor=floor)
    time.sleep(2.0)  # a few readings of the follower at rest
    before = group.stats()
    cap0 = streamed.call("status", 30)["streamer"]["experts_per_layer"]
    stop_s, stop_b = tmp / f"stop-streamed-{rate_mib}", tmp / f"stop-balloon-{rate_mib}"
    prompt = prompt_ids(args.seed, args.pairs + 1, args.prompt_tokens)
    samples: list[dict[str, Any]] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.2):
            with contextlib.suppress(OSError):
                samples.append({"t": time.time(), **group.stats()})

    threading.Thread(target=sample, daemon=True).start()
    k = streamed.send(
        "run", prompt=prompt, max_tokens=args.balloon_max_tokens, tag=tag, stop_file=str(stop_s)
    )
    result: dict[str, Any] = {
        "rate_mib_s": rate_mib,
        "streamed": streamed.name,
        "floor": floor,
        "capacity_before": cap0,
    }
    b: Child | None = None
    try:
        wait_for(lambda: len(tagged(streamed, tag)) >= 2, streamed, 1200)
        # Sized on the cgroup's peak working set (usage minus inactive file cache, what the follower
        # reads) over the last tokens: with the pools as they are, the cgroup cannot hold both; with them
        # at the floor it can, with --balloon-extra of the difference to spare.
        ws = [s["usage_bytes"] - s["inactive_file_bytes"] for s in samples]
        peak = max(ws or [before["usage_bytes"] - before["inactive_file_bytes"]])
        extra = int(args.balloon_extra * (cap0 - floor) * shape.unit)
        size = group.limit - peak + extra
        result.update({"peak_working_set_bytes": peak, "extra_bytes": extra, "balloon_bytes": size})
        b_spec = {
            "role": "balloon",
            "bytes": size,
            "rate": rate_mib << 20,
            "hold": args.balloon_hold,
        }
        b = Child(f"balloon-{rate_mib}", tmp, {**b_spec, "stop_file": str(stop_b)}, group)
        kids.append(b)
        ended = (streamed.dir / f"res-{k}.json").exists  # the run stopped on its own (max tokens)
        wait_for(lambda: bool(b.events("released")) or b.process.poll() is not None, streamed, 600)
        released = b.events("released")
        if released:  # until the pools are back where they were (or --regrow-timeout)
            t_rel = released[0]["t"]
            wait_for(
                lambda: (
                    ended()
                    or any(e["t"] > t_rel and e["capacity"] >= cap0 for e in streamed.events("capacity"))
                ),
                streamed,
                args.regrow_timeout,
                quiet=True,
            )
        n = len(tagged(streamed, tag))
        wait_for(lambda: ended() or len(tagged(streamed, tag)) >= n + 2, streamed, 600, quiet=True)
    except (ChildDied, TimeoutError) as e:
        result["error"] = str(e)
    finally:
        stop_s.touch()
        stop_b.touch()
        try:
            result["run"] = streamed.wait(k, 1200)
        except (ChildDied, TimeoutError) as e:
            result.setdefault("error", str(e))
        if b is not None:
            try:
                result["balloon_returncode"] = b.process.wait(30)
            except subprocess.TimeoutExpired:
                result["balloon_returncode"] = None
        sampling.set()
    after = group.stats()
    # What it generated, also when it was killed midway: each checked against the stock reference.
    result["tokens"] = (
        result["run"]["tokens"] if "run" in result else [e["token"] for e in tagged(streamed, tag)]
    )
    result["streamed_alive"] = streamed.process.poll() is None
    result["cgroup_before"], result["cgroup_after"] = before, after
    result["oom_kills"] = after["oom_kill"] - before["oom_kill"]
    if b is None or not b.events("start"):
        return result
    start = b.events("start")[0]["t"]
    result["balloon_timeline"] = [
        {"t": round(e["t"] - start, 3), "event": e["event"], "bytes": e.get("bytes")} for e in b.events()
    ]
    full = b.events("full")
    released = b.events("released")
    caps = [{"t": round(e["t"] - start, 3), "capacity": e["capacity"]} for e in streamed.events("capacity")]
    at_start = ([c["capacity"] for c in caps if c["t"] < 0] or [cap0])[-1]
    shrink = [c["t"] for c in caps if c["t"] >= 0 and c["capacity"] < at_start]
    rel = released[0]["t"] - start if released else None
    low_cap = min([c["capacity"] for c in caps if c["t"] >= 0] or [at_start])
    later = [c for c in caps if rel is not None and c["t"] > rel]
    grew = [c["t"] for c in later if c["capacity"] > low_cap]
    regrow = [c["t"] for c in later if c["capacity"] >= at_start]
    tokens = tagged(streamed, tag)
    # When the balloon pushed free memory (limit - working set) under the follower's 20% (0 if it was
    # already under when the balloon started): the shrink is timed from there.
    low = round(0.2 * group.limit)
    under = [
        max(0.0, s["t"] - start)
        for s in samples
        if s["t"] >= start - 0.2 and group.limit - (s["usage_bytes"] - s["inactive_file_bytes"]) < low
    ]
    pressure = under[0] if under else None
    result.update(
        {
            "balloon_hold_s": args.balloon_hold,
            "balloon_full_s": round(full[0]["t"] - start, 3) if full else None,
            "balloon_released_s": round(rel, 3) if rel is not None else None,
            "capacity_at_start": at_start,
            "first_under_20pct_free_s": round(pressure, 3) if pressure is not None else None,
            "first_shrink_s": round(shrink[0], 3) if shrink else None,
            "shrink_after_pressure_s": (
                round(shrink[0] - pressure, 3) if shrink and pressure is not None else None
            ),
            "min_capacity": min([c["capacity"] for c in caps if c["t"] >= 0] or [at_start]),
            "grew_s_after_release": round(grew[0] - rel, 3) if grew and rel is not None else None,
            "max_capacity_after_release": max([c["capacity"] for c in later] or [low_cap]),
            "regrown_s_after_release": round(regrow[0] - rel, 3) if regrow and rel is not None else None,
            "capacity_timeline": caps,
            "token_times_s": [round(e["t"] - start, 3) for e in tokens],
            "cgroup_timeline": [
                {
                    "t": round(s["t"] - start, 2),
                    "usage_bytes": s["usage_bytes"],
                    "rss_bytes": s["rss_bytes"],
                    "inactive_file_bytes": s["inactive_file_bytes"],
                }
                for s in samples
            ],
            "max_usage_bytes": max([s["usage_bytes"] for s in samples] or [0]),
        }
    )
    return result


def tagged(child: Child, tag: str) -> list[dict[str, Any]]:
    """The child's token events of runs tagged `tag`."""
    return [e for e in child.events("token") if e.get("tag") == tag]


def wait_for(cond: Callable[[], bool], child: Child, timeout: float, quiet: bool = False) -> bool:
    """Wait for `cond`; a dead child ends the wait (raises unless `quiet`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if child.process.poll() is not None:
            if quiet:
                return False
            raise ChildDied(f"{child.name} exited with {child.process.returncode}: {child.tail()}")
        time.sleep(0.1)
    if not quiet:
        raise TimeoutError(f"waited {timeout:.0f} s")
    return False


# ---------------------------------------------------------------- summary and main


def median(xs: Sequence[float]) -> float | None:
    return round(statistics.median(xs), 4) if xs else None


def target(text: str, value: Any, ok: Any) -> dict[str, Any]:
    """A target and whether it was met (None: it could not be tried)."""
    return {"target": text, "value": value, "pass": None if ok is None else bool(ok)}


def summarize(result: dict[str, Any], shape: Shape) -> dict[str, Any]:
    read = result.get("read", {})
    runs = result.get("runs", {})
    pairs = runs.get("pairs", [])
    bals = result.get("balloons", [])
    stock = result.get("stock_in_cgroup", {})
    pools = [p["pools"] for p in pairs]
    parity = {
        "warm-up": runs.get("warmup", {}).get("parity"),
        **{f"pair {i + 1} {k}": v for i, p in enumerate(pairs) for k, v in p["parity"].items()},
        **{f"balloon {b['rate_mib_s']} MiB/s": b.get("parity") for b in bals},
    }
    resident = median([p["resident_ratio"] for p in pairs])
    bound = median([p["bound_ratio"] for p in pairs])
    s = {
        "w_gb_s": read.get("median_gb_s", {}).get("raw"),
        "store_gb_s": read.get("median_gb_s", {}).get("ours"),
        "store_over_raw": read.get("median_ours_over_raw"),
        "stock_in_cgroup": stock.get("outcome"),
        "stock_tok_s": median([p["decode_tok_s"]["stock"] for p in pairs]),
        "ours_resident_tok_s": median([p["decode_tok_s"]["ours_resident"] for p in pairs]),
        "resident_ratio": resident,
        "ours_streamed_tok_s": median([p["decode_tok_s"]["ours_streamed"] for p in pairs]),
        "streamed_over_resident": median(
            [p["decode_tok_s"]["ours_streamed"] / p["decode_tok_s"]["ours_resident"] for p in pairs]
        ),
        "hit_rate": median([p["hit_rate"] for p in pools]),
        "bytes_read_per_token": median([p["bytes_per_token"] for p in pools]),
        "b_expert_bytes": shape.b_expert,
        "read_gb_s_in_decode": median([p["read_gb_s"] for p in pools if p["read_gb_s"]]),
        "t_resident_s": median([p["t_resident_s"] for p in pairs]),
        "t_bound_s": median([p["t_bound_s"] for p in pairs]),
        "t_actual_s": median([p["t_actual_s"] for p in pairs]),
        "bound_ratio": bound,
        "experts_per_layer": result.get("budget", {}).get("experts_per_layer"),
        # The streamed process after its last pair, against what the budget planned for it.
        "streamed_memory": pairs[-1]["runs"]["ours_streamed"].get("memory") if pairs else None,
        "planned_bytes": (
            result["budget"]["non_expert_bytes"]
            + result["budget"]["runtime_bytes"]
            + result["budget"]["budget_bytes"]
            if "budget" in result
            else None
        ),
        "balloons": [
            {
                k: b.get(k)
                for k in (
                    "rate_mib_s",
                    "balloon_bytes",
                    "capacity_before",
                    "oom_kills",
                    "streamed_alive",
                    "balloon_returncode",
                    "capacity_at_start",
                    "first_under_20pct_free_s",
                    "first_shrink_s",
                    "shrink_after_pressure_s",
                    "min_capacity",
                    "grew_s_after_release",
                    "max_capacity_after_release",
                    "regrown_s_after_release",
                    "parity",
                )
            }
            for b in bals
        ],
        "parity": parity,
    }
    s["targets"] = {
        "store_read_vs_raw": target(
            f">= {TARGETS['store_over_raw']}x raw parallel preadv (cold, same records, queue depth 8)",
            s["store_over_raw"],
            (s["store_over_raw"] or 0) >= TARGETS["store_over_raw"],
        ),
        "bound_ratio": target(
            f"t_bound / t_actual >= {TARGETS['bound_ratio']} in half the model's memory",
            bound,
            (bound or 0) >= TARGETS["bound_ratio"],
        ),
        "resident_vs_stock": target(
            f">= {TARGETS['resident_ratio']}x stock mlx-lm decode tok/s, model resident",
            resident,
            (resident or 0) >= TARGETS["resident_ratio"],
        ),
        **balloon_targets(bals),
        "greedy_parity": target(
            "every run's tokens equal stock mlx-lm's on the same prompt",
            "all equal" if parity and all(v is True for v in parity.values()) else parity,
            bool(parity) and all(v is True for v in parity.values()),
        ),
    }
    return s


def balloon_targets(bals: list[dict[str, Any]]) -> dict[str, Any]:
    """No OOM kill, a shrink within 2 s, and a grow back, for each balloon rate."""
    if not bals:
        return {"balloon": target("a balloon ran", None, False)}
    out = {}
    for b in bals:
        rate = b["rate_mib_s"]
        survived = b.get("oom_kills") == 0 and b.get("streamed_alive") and b.get("balloon_returncode") == 0
        shrink = b.get("shrink_after_pressure_s")
        out[f"balloon_{rate}_no_oom"] = target(
            f"balloon at {rate} MiB/s: no OOM kill in the cgroup, both processes survive",
            f"oom_kill {b.get('oom_kills')}, streamed alive {b.get('streamed_alive')}, "
            f"balloon exit {b.get('balloon_returncode')}",
            survived,
        )
        at_floor = b.get("capacity_at_start") is not None and b["capacity_at_start"] <= b["floor"]
        out[f"balloon_{rate}_shrink"] = target(
            f"balloon at {rate} MiB/s: pools shrink within {TARGETS['shrink_within_s']:.0f} s of it pushing "
            "free memory under the follower's 20%",
            "pools already at the floor when it started" if at_floor else shrink,
            None if at_floor else shrink is not None and shrink <= TARGETS["shrink_within_s"],
        )
        out[f"balloon_{rate}_grow_back"] = target(
            f"balloon at {rate} MiB/s: the pools grow again after its release",
            f"{b.get('min_capacity')} -> {b.get('max_capacity_after_release')} experts/layer, first growth "
            f"{b.get('grew_s_after_release')} s after the release, back to {b.get('capacity_at_start')} "
            f"after {b.get('regrown_s_after_release')} s",
            b.get("grew_s_after_release") is not None,
        )
    return out


def why_scaled(result: dict[str, Any], shape: Shape) -> dict[str, Any]:
    """Per-token time at Qwen3-30B-A3B's 48 layers from this run's own numbers, and what the bench's
    decoding would take at that size."""
    t_res = result["summary"].get("t_resident_s")
    head = result.get("lm_head", {}).get("seconds")
    runs = result.get("runs", {})
    tokens = sum(len(r["tokens"]) for p in runs.get("pairs", []) for r in p["runs"].values())
    tokens += sum(len(r.get("tokens", [])) for r in runs.get("warmup", {}).values() if isinstance(r, dict))
    tokens += sum(len(b.get("tokens", [])) for b in result.get("balloons", []))
    tokens += len(result.get("balloon_reference", {}).get("tokens", []))
    if not t_res or not head:
        return {"decode_tokens": tokens}
    head_s = statistics.median(head)
    per_layer = (t_res - head_s) / shape.layers
    full = head_s + QWEN3_30B_A3B["num_hidden_layers"] * per_layer
    return {
        "per_layer_s": round(per_layer, 3),
        "lm_head_s": round(head_s, 3),
        "t_resident_48_layers_s": round(full, 1),
        "decode_tokens": tokens,
        "decode_minutes_at_48_layers": round(tokens * full / 60, 1),
    }


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 layers, 830-token vocabulary, short runs")
    p.add_argument("--layers", type=int, default=8, help="of Qwen3-30B-A3B's 48 (default 8: see README)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--model-dir", type=Path, help="cached checkpoint (default /work/mlxf-bench-models/...)")
    p.add_argument("--shard-gb", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--read-batches", type=int, default=64, help="store calls per read trial (top-k experts)")
    p.add_argument("--read-pairs", type=int, default=6, help="rounds of raw / raw batched / ours")
    p.add_argument("--read-threads", type=int, default=8, help="the store's threads: the queue depth")
    p.add_argument("--limit-fraction", type=float, default=0.5, help="cgroup limit / checkpoint bytes")
    p.add_argument(
        "--runtime-mb", type=int, default=200, help="Python, MLX, mlx-lm, their libraries: not for experts"
    )
    p.add_argument("--headroom", type=float, default=0.30, help="share of the limit kept free")
    p.add_argument("--policy", choices=("lru", "lfu", "decay"), help="default: the streamer's")
    p.add_argument("--prompt-tokens", type=int, default=3)
    p.add_argument("--warmup-tokens", type=int, default=6, help="tokens of the streamed warm-up run")
    p.add_argument("--tokens", type=int, default=6, help="timed decode tokens per run (after the first)")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--floor", type=int, help="follow() floor in experts per layer (default: top-k)")
    p.add_argument(
        "--balloon-rates",
        default="32,256",
        help="MiB/s the balloon allocates at; one balloon per rate, in order",
    )
    p.add_argument("--balloon-hold", type=float, default=20.0, help="seconds the balloon holds its memory")
    p.add_argument("--balloon-extra", type=float, default=0.5, help="beyond free: share of pool above floor")
    p.add_argument("--balloon-max-tokens", type=int, default=40)
    p.add_argument("--regrow-timeout", type=float, default=120.0)
    p.add_argument("--stock-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path)
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.vocab, args.read_batches, args.read_pairs = 2, 830, 16, 2
        args.limit_fraction = 0.75  # half of a 0.7 GB model leaves no room for a balloon test
        args.warmup_tokens, args.tokens, args.pairs, args.balloon_hold, args.stock_timeout = (
            3,
            3,
            1,
            8.0,
            120.0,
        )
    args.balloon_rates = [int(r) for r in str(args.balloon_rates).split(",")]
    args.model_dir = args.model_dir or Path(
        f"/work/mlxf-bench-models/qwen3_moe-a3b-{args.layers}L-v{args.vocab}"
    )
    args.out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child is not None:
        return child(args.child)
    from results import header, write  # not at the top: children run in memory limits and need neither

    if os.geteuid() != 0 or not (CGROUP_ROOT / "memory.limit_in_bytes").exists():
        raise SystemExit("needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory")
    started = time.time()
    result: dict[str, Any] = {
        **header("expert_streaming", args, started, omit=("child", "model_dir")),
        "model_dir": str(args.model_dir),
        "method": {
            "model": "random-weight 4-bit qwen3_moe of Qwen3-30B-A3B's shape with --layers of its 48 layers",
            "decode": "mlx_lm.generate.generate_step, greedy, prompt of --prompt-tokens ids; tok/s after the "
            "first token; each run a fresh prompt and KV cache",
            "resident": "one process outside any cgroup: mlx-lm's MoE blocks and ours (ExpertStreamer at "
            "full budget) swapped on the same loaded weights",
            "streamed": "one process in a cgroup v1 memory limit of --limit-fraction of the checkpoint: "
            "ExpertStreamer.start_empty(budget) before the weights are evaluated; pools warm across runs",
            "bound": "t_bound = t_resident + (1 - h) * B_expert / W per pair; t_resident from ours resident "
            "in the same pair; h, bytes from the pools' counters over the same tokens; W: raw cold reads",
        },
    }
    config = model_config(args.layers, args.vocab)
    print("checking the checkpoint writer against mlx-lm ...", flush=True)
    result["checkpoint_check"] = verify_writer(args.seed)
    info = ensure_model(args.model_dir, config, args.seed, int(args.shard_gb * 2**30))
    shape = shape_of(args.model_dir)
    result["model"] = {
        "shape": "Qwen3-30B-A3B (hidden 2048, 128 experts, top-8, moe_intermediate 768, 32 heads, 4 KV "
        f"heads, head_dim 128), {args.layers} of 48 layers, vocabulary {args.vocab}, 4-bit (group 64, "
        "routers 8-bit), bf16 scales and biases",
        "dir": str(args.model_dir),
        "config": config,
        "checkpoint": info,
        "total_bytes": shape.total,
        "expert_bytes": shape.experts,
        "non_expert_bytes": shape.total - shape.experts,
        "bytes_per_expert": shape.unit // shape.layers,
        "unit_bytes": shape.unit,
        "b_expert_bytes": shape.b_expert,
    }
    limit = int(shape.total * args.limit_fraction) // 4096 * 4096
    result["budget"] = plan_budget(args, shape, limit)
    print(
        f"model: {shape.total / 1e9:.2f} GB ({shape.experts / 1e9:.2f} GB experts) in {args.model_dir}; "
        f"cgroup limit {limit / 2**30:.2f} GiB, pool {result['budget']['experts_per_layer']} of "
        f"{shape.num_experts} experts per layer",
        flush=True,
    )
    try:
        print("1. cold read bandwidth: raw preadv vs ExpertStore.read", flush=True)
        result["read"] = bandwidth(args.model_dir, args)
        w = result["read"]["median_gb_s"]["raw"] * 1e9
        with tempfile.TemporaryDirectory(prefix="mlxf-bench-") as tmp_dir, children() as kids:
            tmp = Path(tmp_dir)
            print("2. stock mlx-lm in the cgroup", flush=True)
            prompt = prompt_ids(args.seed, 1, args.prompt_tokens)
            result["stock_in_cgroup"] = stock_in_cgroup(args, tmp, args.model_dir, limit, prompt, kids)
            print("3-4. resident (stock and ours) and streamed in the cgroup, side by side", flush=True)
            spec = {"role": "model", "model_dir": str(args.model_dir), "policy": args.policy}
            resident = Child("resident", tmp, {**spec, "mode": "resident"})
            kids.append(resident)
            result["resident_load"] = resident.call("load", 3600)
            result["lm_head"] = resident.call("lm_head", 600, samples=3)
            drop_caches()  # the resident load went through the page cache: the streamed reads must not
            with cgroup("ours", limit) as group:
                budget = result["budget"]["budget_bytes"]
                streamed = Child("streamed", tmp, {**spec, "mode": "streamed", "budget": budget}, group)
                kids.append(streamed)
                try:
                    result["streamed_load"] = {**streamed.call("load", 3600), "cgroup": group.stats()}
                    result["runs"] = pairs_phase(args, resident, streamed, shape, w)
                    result["balloons"] = []
                    for rate in args.balloon_rates:
                        print(f"5. balloon at {rate} MiB/s in the cgroup while ours decodes with follow()")
                        if streamed.process.poll() is not None:  # the last balloon killed it: a new one
                            name = f"streamed-{len(result['balloons']) + 1}"
                            streamed = Child(name, tmp, {**spec, "mode": "streamed", "budget": budget}, group)
                            kids.append(streamed)
                            streamed.call("load", 3600)
                            p0 = prompt_ids(args.seed, 0, args.prompt_tokens)
                            streamed.call(
                                "run", 3600, prompt=p0, max_tokens=args.warmup_tokens, tag="warm-up"
                            )
                        bal = balloon_phase(args, tmp, group, streamed, shape, kids, rate)
                        result["balloons"].append(bal)
                        print("   " + balloon_line(bal), flush=True)
                    result["streamed_cgroup_end"] = group.stats()
                finally:
                    for c in kids:
                        if c.dir.parent == tmp and (c.name.startswith(("streamed", "balloon"))):
                            c.stop()
            longest = max((len(b["tokens"]) for b in result["balloons"]), default=0)
            if longest:
                prompt = prompt_ids(args.seed, args.pairs + 1, args.prompt_tokens)
                ref = resident.call(
                    "run", 3600, prompt=prompt, max_tokens=longest, use="stock", tag="reference"
                )
                for b in result["balloons"]:
                    b["parity"] = b["tokens"] == ref["tokens"][: len(b["tokens"])]
                result["balloon_reference"] = ref
    except Exception:
        import traceback

        result["error"] = traceback.format_exc()
        print(result["error"], file=sys.stderr)
    result["summary"] = summarize(result, shape)
    result["model"]["scale"] = why_scaled(result, shape)
    write(result, args.out, started)
    report(result)
    return 1 if "error" in result else 0


def balloon_line(b: dict[str, Any]) -> str:
    return (
        f"balloon at {b.get('rate_mib_s')} MiB/s ({(b.get('balloon_bytes') or 0) / 2**20:.0f} MiB): oom_kill "
        f"{b.get('oom_kills')}, streamed alive {b.get('streamed_alive')}; free < 20% at "
        f"{b.get('first_under_20pct_free_s')} s, first shrink at {b.get('first_shrink_s')} s, "
        f"{b.get('capacity_at_start')} -> {b.get('min_capacity')} experts/layer, back "
        f"{b.get('grew_s_after_release')} s after the release (to {b.get('max_capacity_after_release')}); "
        f"parity {b.get('parity')}"
    )


def report(result: dict[str, Any]) -> None:
    s, b, m = result["summary"], result.get("budget", {}), result["model"]
    print(
        f"\n{m['shape']}: {m['total_bytes'] / 1e9:.2f} GB; cgroup {b.get('limit_bytes', 0) / 2**30:.2f} GiB, "
        f"pool {s['experts_per_layer']}/{b.get('of_experts_per_layer')} experts per layer"
    )
    print(
        f"  W (raw cold reads) {s['w_gb_s']} GB/s; ExpertStore.read {s['store_gb_s']} GB/s "
        f"({s['store_over_raw']}x)"
    )
    print(f"  stock mlx-lm in the cgroup: {s['stock_in_cgroup']}")
    print(
        f"  resident: stock {s['stock_tok_s']} tok/s, ours {s['ours_resident_tok_s']} tok/s "
        f"({s['resident_ratio']}x)"
    )
    print(
        f"  streamed in the cgroup: {s['ours_streamed_tok_s']} tok/s, h {s['hit_rate']}, "
        f"{(s['bytes_read_per_token'] or 0) / 1e6:.0f} MB read/token, t_bound {s['t_bound_s']} s vs "
        f"t_actual {s['t_actual_s']} s -> {s['bound_ratio']}"
    )
    for bal in s["balloons"]:
        print("  " + balloon_line(bal))
    scale = m.get("scale", {})
    if "t_resident_48_layers_s" in scale:
        print(
            f"  at 48 layers: ~{scale['t_resident_48_layers_s']} s/token resident on this CPU; this run's "
            f"{scale['decode_tokens']} tokens would take ~{scale['decode_minutes_at_48_layers']} min"
        )


if __name__ == "__main__":
    sys.exit(main())
