"""Single-stream decode speed and time to first token: the worker's HTTP API against in-process mlx-lm.

    python bench/single_stream.py                  # both models, defaults (~3 min)
    python bench/single_stream.py --models demo --pairs 8 --max-tokens 256

For each model, the same weights are loaded twice: in this process (the engine ceiling,
`mlx_lm.stream_generate`) and in a real worker process (`python -m mlx_flash.worker`, streaming
`/v1/completions` over HTTP). Both sides get the same prompt token ids, greedy sampling and the EOS
token(s) biased by -100 so both generate exactly `--max-tokens` tokens. After a warm-up, the two run
alternately A B A B ... (A = in-process, B = server); each pair gives one server/in-process ratio.

Definitions, identical on both sides:
  TTFT        time from starting the request (or calling stream_generate) to the first non-empty text;
  decode tok/s  (tokens - 1) / (time of the last non-empty text - time of the first non-empty text).
Greedy parity (identical text, token counts and prompt length on every run) is checked and recorded.

Models: `dense` is a random-weight qwen3 built locally (size set by the --dense-* flags; speed does not
depend on weight values); `demo` is the embedded demo model (`--model demo`).
Writes bench/results/single_stream.json (see `--out`); bench/report.py turns it into a README table.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.utils import load, load_tokenizer, save_config, save_model

from mlx_flash import blas
from mlx_flash.demo import DEMO_MODEL_PATH

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "single_stream.json"
MODELS = ("dense", "demo")
# A raw ChatML prompt (the demo model's format); the same string goes to both sides.
DEFAULT_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant. Answer briefly and politely.<|im_end|>\n"
    "<|im_start|>user\nWhat is the weather like in Berlin today, and should I take an umbrella "
    "when I go out for a walk?<|im_end|>\n<|im_start|>assistant\n"
)
EOS_BIAS = -100.0


# ---------------------------------------------------------------- measurements


@dataclass
class Run:
    """One generation, timed from the consumer's side."""

    ttft_s: float
    decode_tok_s: float
    tokens: int
    total_s: float
    text: str
    prompt_tokens: int
    cpu_s: float | None  # CPU time of the process that generated (this one, or the worker)
    client_cpu_s: float | None = None  # server runs: CPU time of this process reading the stream

    def sample(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ttft_s": round(self.ttft_s, 6),
            "decode_tok_s": round(self.decode_tok_s, 3),
            "tokens": self.tokens,
            "total_s": round(self.total_s, 6),
            "cpu_s": None if self.cpu_s is None else round(self.cpu_s, 3),
        }
        if self.client_cpu_s is not None:
            out["client_cpu_s"] = round(self.client_cpu_s, 3)
        return out


class Clock:
    """Timestamps of the text-bearing events of one generation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None
        self.texts: list[str] = []

    def text(self, text: str, now: float) -> None:
        if text:
            self.texts.append(text)
            self.first = now if self.first is None else self.first
            self.last = now

    def run(self, tokens: int, prompt_tokens: int, cpu_s: float | None) -> Run:
        end = time.perf_counter()
        if self.first is None or self.last is None or tokens < 2 or self.last <= self.first:
            raise RuntimeError(f"too little output to time: {tokens} tokens, text {''.join(self.texts)!r}")
        return Run(
            ttft_s=self.first - self.start,
            decode_tok_s=(tokens - 1) / (self.last - self.first),
            tokens=tokens,
            total_s=end - self.start,
            text="".join(self.texts),
            prompt_tokens=prompt_tokens,
            cpu_s=cpu_s,
        )


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU time of a process, all threads (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def encode(tokenizer: Any, prompt: str) -> list[int]:
    """mlx_lm.generate's rule for a string prompt, which the worker follows too."""
    bos = tokenizer.bos_token
    return [
        int(t) for t in tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
    ]


def run_in_process(model: Any, tokenizer: Any, ids: list[int], max_tokens: int, eos_ids: list[int]) -> Run:
    tokens = 0
    cpu = time.process_time()
    clock = Clock()
    # Built inside the timed region, as the worker builds them per request.
    sampler = make_sampler(temp=0.0)
    processors = make_logits_processors(logit_bias={e: EOS_BIAS for e in eos_ids})
    for resp in stream_generate(
        model, tokenizer, mx.array(ids), max_tokens=max_tokens, sampler=sampler, logits_processors=processors
    ):
        # The text as a completion continues its prompt: with the first token's leading space.
        lead = leading_space(tokenizer, resp.token) if not tokens else ""
        clock.text(lead + resp.text, time.perf_counter())
        tokens += 1
    return clock.run(tokens, len(ids), time.process_time() - cpu)


def run_server(client: httpx.Client, url: str, pid: int, body: bytes) -> Run:
    usage: dict[str, Any] | None = None
    server_cpu = process_cpu_s(pid)
    cpu = time.process_time()
    clock = Clock()
    with client.stream(
        "POST", f"{url}/v1/completions", content=body, headers={"content-type": "application/json"}
    ) as r:
        if r.status_code != 200:
            raise RuntimeError(f"server answered {r.status_code}: {r.read().decode(errors='replace')}")
        for line in r.iter_lines():
            now = time.perf_counter()
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"server error mid-stream: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                clock.text(choice.get("text") or "", now)
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk")
    server_cpu_after = process_cpu_s(pid)
    cpu_s = None if server_cpu is None or server_cpu_after is None else server_cpu_after - server_cpu
    run = clock.run(int(usage["completion_tokens"]), int(usage["prompt_tokens"]), cpu_s)
    run.client_cpu_s = time.process_time() - cpu
    return run


# ---------------------------------------------------------------- the worker process

# One way to start a worker on a free port and wait for /ready: the tests' own.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import leading_space, run_worker  # noqa: E402


@contextlib.contextmanager
def worker(model_arg: str, log_path: Path, timeout: float) -> Iterator[tuple[str, int]]:
    """A real worker on a free port; yields its URL and pid once /ready says 200; always stops it."""
    # The same prompt goes out every run: without this the prefix cache would serve it from the
    # second run on, and the comparison would no longer be of the engines.
    with run_worker(model_arg, log_path, "--prefix-cache-bytes", "0", timeout=timeout) as w:
        yield w.url, w.process.pid


# ---------------------------------------------------------------- models


@dataclass
class ModelSpec:
    name: str
    model_arg: str  # what the worker gets as --model
    path: Path  # what mlx_lm.load gets in-process
    notes: dict[str, Any] = field(default_factory=dict)


def build_dense(path: Path, args: argparse.Namespace) -> ModelSpec:
    """A random-weight qwen3 with the demo model's tokenizer, saved the way mlx-lm saves models."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL_PATH / name, path / name)
    demo_config = json.loads((DEMO_MODEL_PATH / "config.json").read_text())
    # Random weights produce any id below vocab_size, so the vocabulary must be exactly the tokenizer's.
    vocab = len(load_tokenizer(path))  # type: ignore[no-untyped-call]
    heads = args.dense_heads
    config: dict[str, Any] = {
        "model_type": "qwen3",
        "hidden_size": args.dense_hidden,
        "num_hidden_layers": args.dense_layers,
        "intermediate_size": args.dense_intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "head_dim": args.dense_hidden // heads,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "max_position_embeddings": args.dense_context,
        "tie_word_embeddings": True,
        "vocab_size": vocab,
        "eos_token_id": demo_config["eos_token_id"],
        "torch_dtype": args.dense_dtype,
    }
    module = importlib.import_module("mlx_lm.models.qwen3")
    mx.random.seed(args.seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    # Default inits give near-uniform logits; sharper weights give varied text, closer to a real model's.
    model.update(tree_map(lambda p: p * 4.0 if p.ndim >= 2 else p, model.parameters()))
    model.set_dtype(getattr(mx, args.dense_dtype))
    mx.eval(model.parameters())
    save_model(path, model)
    save_config(config, path / "config.json")
    name = f"dense h{args.dense_hidden}x{args.dense_layers}L"
    return ModelSpec(name, str(path), path, {"weights": f"random (default init x4), seed {args.seed}"})


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def model_summary(model: Any, config: dict[str, Any]) -> dict[str, Any]:
    flat: Any = tree_flatten(model.parameters())
    params = [v for _, v in flat]
    dtypes = sorted({str(v.dtype).removeprefix("mlx.core.") for v in params})
    keys = (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "tie_word_embeddings",
    )
    return {
        **{k: config[k] for k in keys if k in config},
        "params": sum(int(v.size) for v in params),
        "weight_bytes": sum(int(v.nbytes) for v in params),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "quantized": "quantization" in config,
    }


# ---------------------------------------------------------------- one model, A B A B


def bench_model(spec: ModelSpec, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    print(f"== {spec.name}: loading in-process", flush=True)
    digest = file_digest(spec.path)
    loaded: Any = load(str(spec.path), return_config=True)
    model, tokenizer, config = loaded
    ids = encode(tokenizer, args.prompt)
    eos_ids = sorted(int(e) for e in tokenizer.eos_token_ids)
    log_path = workdir / f"worker-{spec.name.split()[0]}.log"
    ip_runs: list[Run] = []
    sv_runs: list[Run] = []
    warm: list[tuple[str, Run]] = []
    print(f"   starting worker --model {spec.model_arg}", flush=True)
    with (
        worker(spec.model_arg, log_path, args.startup_timeout) as (url, pid),
        httpx.Client(timeout=600) as client,
    ):
        if file_digest(spec.path) != digest:
            raise RuntimeError(f"{spec.path} changed while loading; rerun for a consistent comparison")
        model_id = client.get(f"{url}/v1/models").json()["data"][0]["id"]
        payload = json.dumps(
            {
                "model": model_id,
                "prompt": args.prompt,
                "max_tokens": args.max_tokens,
                "temperature": 0.0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "logit_bias": {str(e): EOS_BIAS for e in eos_ids},
            }
        ).encode()
        for i in range(args.warmup):
            warm.append(("in_process", run_in_process(model, tokenizer, ids, args.max_tokens, eos_ids)))
            warm.append(("server", run_server(client, url, pid, payload)))
            print(f"   warm-up {i + 1}/{args.warmup} done", flush=True)
        for i in range(args.pairs):
            if args.order == "abba" and i % 2:  # B first in odd pairs: cancels drift and order effects
                b = run_server(client, url, pid, payload)
                a = run_in_process(model, tokenizer, ids, args.max_tokens, eos_ids)
            else:
                a = run_in_process(model, tokenizer, ids, args.max_tokens, eos_ids)
                b = run_server(client, url, pid, payload)
            ip_runs.append(a)
            sv_runs.append(b)
            print(
                f"   pair {i + 1}/{args.pairs}: in-process {a.decode_tok_s:7.1f} tok/s"
                f" ttft {a.ttft_s * 1e3:7.1f} ms"
                f" | server {b.decode_tok_s:7.1f} tok/s ttft {b.ttft_s * 1e3:7.1f} ms"
                f" | ratio {b.decode_tok_s / a.decode_tok_s:.3f}",
                flush=True,
            )
    digest_after = file_digest(spec.path)

    reference = ip_runs[0].text
    labelled = warm + [
        item for a, b in zip(ip_runs, sv_runs, strict=True) for item in (("in_process", a), ("server", b))
    ]
    mismatches = []
    for n, (which, r) in enumerate(labelled):
        problems = []
        if r.text != reference:
            at = next(
                (i for i, (x, y) in enumerate(zip(r.text, reference, strict=False)) if x != y),
                min(len(r.text), len(reference)),
            )
            problems.append(f"text differs from char {at}")
        if r.tokens != args.max_tokens:
            problems.append(f"{r.tokens} tokens, not {args.max_tokens}")
        if r.prompt_tokens != len(ids):
            problems.append(f"{r.prompt_tokens} prompt tokens, not {len(ids)}")
        if problems:
            mismatches.append({"run": n, "side": which, "problems": problems})
    if digest_after != digest:
        mismatches.append(
            {"run": None, "side": "model files", "problems": ["weights changed during the run"]}
        )

    ratios = [b.decode_tok_s / a.decode_tok_s for a, b in zip(ip_runs, sv_runs, strict=True)]
    ttft_diffs = [b.ttft_s - a.ttft_s for a, b in zip(ip_runs, sv_runs, strict=True)]
    per_token_ms = [
        (1 / b.decode_tok_s - 1 / a.decode_tok_s) * 1e3 for a, b in zip(ip_runs, sv_runs, strict=True)
    ]

    def side(runs: list[Run]) -> dict[str, Any]:
        return {
            "samples": [r.sample() for r in runs],
            "median_decode_tok_s": round(statistics.median(r.decode_tok_s for r in runs), 3),
            "median_ttft_s": round(statistics.median(r.ttft_s for r in runs), 6),
            "median_total_s": round(statistics.median(r.total_s for r in runs), 6),
            "median_cpu_ms_per_token": _median_or_none([r.cpu_s / r.tokens * 1e3 for r in runs if r.cpu_s]),
        }

    # Worker CPU / in-process CPU, per pair; "with client" adds this process's CPU reading the stream.
    cpu_ratios, cpu_client_ratios = [], []
    for a, b in zip(ip_runs, sv_runs, strict=True):
        if a.cpu_s and b.cpu_s is not None:
            cpu_ratios.append(b.cpu_s / a.cpu_s)
            cpu_client_ratios.append((b.cpu_s + (b.client_cpu_s or 0.0)) / a.cpu_s)

    return {
        "name": spec.name,
        "model_arg": spec.model_arg,
        "weights_sha256_16": digest,
        "config": model_summary(model, config),
        **({"notes": spec.notes} if spec.notes else {}),
        "prompt_tokens": len(ids),
        "max_tokens": args.max_tokens,
        "eos_suppressed": eos_ids,
        "warmup_runs_per_side": args.warmup,
        "in_process": side(ip_runs),
        "server": side(sv_runs),
        "pairs": [
            {"decode_ratio": round(r, 4), "ttft_diff_s": round(d, 6), "per_token_overhead_ms": round(o, 4)}
            for r, d, o in zip(ratios, ttft_diffs, per_token_ms, strict=True)
        ],
        "median_decode_ratio": round(statistics.median(ratios), 4),
        "median_decode_ratio_ci95": bootstrap_ci(ratios),
        "min_decode_ratio": round(min(ratios), 4),
        "max_decode_ratio": round(max(ratios), 4),
        "median_ttft_diff_s": round(statistics.median(ttft_diffs), 6),
        "median_ttft_ratio": round(
            statistics.median(b.ttft_s / a.ttft_s for a, b in zip(ip_runs, sv_runs, strict=True)), 4
        ),
        "median_per_token_overhead_ms": round(statistics.median(per_token_ms), 4),
        # CPU time is far less sensitive than wall time to other jobs on the machine (the worker's is read
        # from /proc in clock ticks, 10 ms, so short runs are coarse).
        "cpu_ratios": [round(r, 4) for r in cpu_ratios],
        "median_cpu_ratio": _median_or_none(cpu_ratios),
        "median_cpu_ratio_with_client": _median_or_none(cpu_client_ratios),
        "median_client_cpu_ms_per_token": _median_or_none(
            [r.client_cpu_s / r.tokens * 1e3 for r in sv_runs if r.client_cpu_s is not None]
        ),
        "parity": not mismatches,
        "parity_detail": {
            "runs_checked": len(labelled),
            "mismatches": mismatches,
            "text_preview": reference[:120],
        },
    }


def bootstrap_ci(values: list[float], resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval of the median; seeded, so the same samples give the same one."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return [round(medians[int(0.025 * resamples)], 4), round(medians[int(0.975 * resamples) - 1], 4)]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _median_or_none(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


# ---------------------------------------------------------------- machine and main


def machine() -> dict[str, Any]:
    cpu = "unknown"
    mem_kb = 0
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    if cpu == "unknown" and platform.system() == "Darwin":
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            cpu = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, check=True
            ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gb": round(mem_kb / 1024**2, 1) if mem_kb else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "mlx": importlib.metadata.version("mlx"),
        "mlx_lm": importlib.metadata.version("mlx-lm"),
        "mlx_flash": importlib.metadata.version("mlx-flash"),
        "device": str(mx.default_device()),
        "blas": blas.mapped(),  # LD_PRELOAD, which the servers started here inherit, can change it
        # The worker's HTTP stack: uvicorn picks httptools and uvloop when installed, else h11 and asyncio.
        "server_stack": {
            name: _version(name) for name in ("uvicorn", "starlette", "httptools", "uvloop", "h11")
        },
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def git_state() -> dict[str, Any]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return {"commit": commit, "dirty": bool(dirty)}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def add_dense_flags(p: argparse.ArgumentParser) -> None:
    """The --dense-* flags that `build_dense` reads (shared by the benchmarks that build this model)."""
    p.add_argument("--dense-hidden", type=int, default=512)
    p.add_argument("--dense-layers", type=int, default=8)
    p.add_argument("--dense-intermediate", type=int, default=1536)
    p.add_argument("--dense-heads", type=int, default=8)
    p.add_argument("--dense-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--dense-context", type=int, default=4096, help="max_position_embeddings")
    p.add_argument(
        "--dense-dir", type=Path, help="build the dense model here and keep it (default: a temp dir)"
    )
    p.add_argument("--seed", type=int, default=0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {MODELS}")
    p.add_argument("--pairs", type=int, default=8, help="measured A B pairs per model")
    p.add_argument(
        "--order",
        choices=["abab", "abba"],
        default="abab",
        help="abab: in-process first in every pair (docs/PERF.md); abba: alternate which side goes first",
    )
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per side, not reported")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    add_dense_flags(p)
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.model_list) - set(MODELS)
    if unknown or not args.model_list:
        p.error(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    if args.pairs < 1 or args.warmup < 0 or args.max_tokens < 2:
        p.error("need --pairs >= 1, --warmup >= 0, --max-tokens >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    result: dict[str, Any] = {
        "benchmark": "single_stream",
        "command": shlex.join([sys.executable, *sys.argv]),
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "machine": machine(),
        "git": git_state(),
        "method": {
            "order": "warm-up (in-process, server) x warmup, then pairs (A = in-process, B = server): "
            + ("A B A B ..." if args.order == "abab" else "A B, B A, A B, ..."),
            "endpoint": "POST /v1/completions, stream: true, temperature 0, logit_bias {eos: -100}",
            "in_process": "mlx_lm.stream_generate(model, tokenizer, mx.array(ids), sampler=greedy, "
            "logits_processors=[logit_bias {eos: -100}])",
            "ttft": "request start to first non-empty text (server: chunk arrival at an httpx client)",
            "decode_tok_s": "(tokens - 1) / (last non-empty text - first non-empty text)",
            "ratio": "server / in-process decode tok/s, per pair; median with a bootstrap 95% interval",
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "model_list", "dense_dir")}
        | {"prompt": args.prompt},
        "models": [],
    }
    with tempfile.TemporaryDirectory(prefix="mlxf-bench-") as tmp:
        workdir = Path(tmp)
        for name in args.model_list:
            if name == "demo":
                spec = ModelSpec("demo", "demo", DEMO_MODEL_PATH)
            else:
                spec = build_dense(args.dense_dir or workdir / "dense", args)
            result["models"].append(bench_model(spec, args, workdir))
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} in {result['wall_s']} s")
    for m in result["models"]:
        print(
            f"  {m['name']}: in-process {m['in_process']['median_decode_tok_s']:.1f} tok/s, "
            f"server {m['server']['median_decode_tok_s']:.1f} tok/s, ratio {m['median_decode_ratio']:.3f} "
            f"(min {m['min_decode_ratio']:.3f}); TTFT {m['in_process']['median_ttft_s'] * 1e3:.1f} vs "
            f"{m['server']['median_ttft_s'] * 1e3:.1f} ms; parity {m['parity']}"
        )
    return 0 if all(m["parity"] for m in result["models"]) else 1


if __name__ == "__main__":
    sys.exit(main())
