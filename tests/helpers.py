"""Shared test machinery: tiny random-weight models saved for mlx_lm.load, and real worker processes."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate, stream_generate

from mlx_flash.demo import DEMO_MODEL_PATH

# Small but real architectures; the MoE ones are float32 because MLX's CPU gather_mm needs it.
COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}
ARCHS: dict[str, dict[str, Any]] = {
    "qwen3": {"model_type": "qwen3", "head_dim": 16},
    "llama": {"model_type": "llama"},
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "head_dim": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
    },
    "mixtral": {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "model_type": "qwen2_moe",
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 64,
    },
    "deepseek_v3": {
        "model_type": "deepseek_v3",
        "num_key_value_heads": 4,
        "n_routed_experts": 8,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "kv_lora_rank": 32,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 16,
        "qk_nope_head_dim": 32,
        "v_head_dim": 32,
        "n_group": 1,
        "topk_group": 1,
    },
    "gpt_oss": {
        "model_type": "gpt_oss",
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "head_dim": 16,
        "sliding_window": 128,
    },
}
MOE_ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss")
# A template variable only chat_template_kwargs can set: proves the kwargs reach the template.
KWARG_TEMPLATE_SUFFIX = "{%- if note is defined %}{{- note }}{%- endif %}"


def leading_space(tokenizer: Any, first_token: int) -> str:
    """ " " when a completion's first token starts with a space. mlx-lm's detokenizers drop that space at
    the start of a text (right for a chat reply); the server keeps it for a raw completion, which
    continues its prompt."""
    piece = tokenizer.convert_ids_to_tokens(first_token)
    spaces = ("\u0120", "\u2581")  # a space as byte-level BPE (Ġ) and SentencePiece (▁) write it
    return " " if isinstance(piece, str) and piece[:1] in spaces else ""


def continuation(model: Any, tokenizer: Any, prompt: Any, **kwargs: Any) -> str:
    """mlx_lm.generate's greedy text for a raw prompt, as a completion continues it (`leading_space`)."""
    text: str = generate(model, tokenizer, prompt, **kwargs)
    steps = {k: v for k, v in kwargs.items() if k != "max_tokens"}
    first = next(stream_generate(model, tokenizer, prompt, max_tokens=1, **steps)).token
    return leading_space(tokenizer, first) + text


def build_model(arch: str, path: Path, seed: int = 0, dtype: mx.Dtype = mx.float32, **overrides: Any) -> Path:
    """A random-weight model of `arch` with the demo model's tokenizer, loadable by mlx_lm.load."""
    path.mkdir(parents=True, exist_ok=True)
    tok_config = json.loads((DEMO_MODEL_PATH / "tokenizer_config.json").read_text())
    tok_config["chat_template"] += KWARG_TEMPLATE_SUFFIX
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config))
    shutil.copy(DEMO_MODEL_PATH / "tokenizer.json", path / "tokenizer.json")
    vocab = json.loads((DEMO_MODEL_PATH / "config.json").read_text())["vocab_size"]
    eos = json.loads((DEMO_MODEL_PATH / "config.json").read_text())["eos_token_id"]
    config = {**COMMON, **ARCHS[arch], "vocab_size": vocab, "eos_token_id": eos, **overrides}
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    # Default inits give near-uniform logits; sharper weights give varied, non-trivial text.
    model.update(_scaled(model.parameters(), 4.0))
    model.set_dtype(dtype)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(config))
    return path


def quantize_checkpoint(path: Path, bits: int = 4, group_size: int = 32) -> Path:
    """Rewrite the model at `path` as mlx-community checkpoints are: `bits`-bit weights with bf16
    scales and biases, the rest bf16."""
    from mlx_lm.utils import load

    model = load(str(path))[0]
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=group_size, bits=bits)  # type: ignore[attr-defined]
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    config = json.loads((path / "config.json").read_text())
    config["quantization"] = {"group_size": group_size, "bits": bits}
    (path / "config.json").write_text(json.dumps(config))
    return path


def _scaled(params: Any, factor: float) -> Any:
    if isinstance(params, dict):
        return {k: _scaled(v, factor) for k, v in params.items()}
    if isinstance(params, list):
        return [_scaled(v, factor) for v in params]
    return params * factor if params.ndim >= 2 else params


@dataclass
class Server:
    """A server process we started, and where its log goes."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class Worker(Server):
    @property
    def model_id(self) -> str:
        return str(httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"][0]["id"])

    def metric(self, name: str, default: float | None = None, **labels: str) -> float:
        """The value of one Prometheus sample; `default` if the series does not exist (yet)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        want = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
        for line in text.splitlines():
            sample, _, value = line.rpartition(" ")
            if sample == name + want:
                return float(value)
        if default is None:
            raise KeyError(f"no sample {name}{want} in /metrics")
        return default


@contextmanager
def run_worker(
    model: str, log_path: Path, *args: str, timeout: float = 120.0, prefix: Sequence[str] = ()
) -> Iterator[Worker]:
    """A real worker process on a free port; waits for /ready, always cleans up. `prefix` runs
    before the worker in the same process (a shell that joins a cgroup, then execs it)."""
    cmd = [*prefix, sys.executable, "-m", "mlx_flash.worker", "--model", model, "--port", "0", *args]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = _wait_listening(proc, log_path, timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            raise TimeoutError(f"worker not ready after {timeout}s:\n{log_path.read_text()}")
        yield Worker(url, proc, log_path)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


_TEXT_LISTENING = re.compile(r"^\S+ INFO +(?P<component>\S+) listening .*\burl=(?P<url>http://\S+)")


def _wait_listening(
    proc: subprocess.Popen[bytes], log_path: Path, timeout: float, component: str | None = None
) -> str:
    """The URL from the first `listening` line (JSON or text format) of `component`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Only whole lines: the last one may still be half-written.
        for line in log_path.read_text(errors="replace").split("\n")[:-1] if log_path.exists() else []:
            if line.startswith("{") and '"msg":"listening"' in line:
                entry = json.loads(line)
                if component is None or entry["component"] == component:
                    return f"http://{entry['host']}:{entry['port']}"
            elif (m := _TEXT_LISTENING.match(line)) and component in (None, m["component"]):
                return m["url"]
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{log_path.read_text()}")
        time.sleep(0.05)
    raise TimeoutError(f"worker did not start listening:\n{log_path.read_text()}")


class Sidecar(Server):
    def workers(self, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """The admin API's view of the workers."""
        r = httpx.get(f"{self.url}/admin/api/workers", headers=headers, timeout=10)
        r.raise_for_status()
        return list(r.json()["workers"])

    def wait_ready(self, count: int, timeout: float = 120.0, headers: dict[str, str] | None = None) -> None:
        """Wait until `count` workers are ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.process.returncode}:\n{self.log()}")
            if sum(w["state"] == "ready" for w in self.workers(headers)) >= count:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{count} workers not ready after {timeout}s:\n{self.log()}")


# An MCP `initialize` request in the handshake style, as a client's first message.
MCP_INITIALIZE: dict[str, Any] = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}


def mlx_flash_command() -> list[str]:
    """The installed console script, as a user runs it."""
    return [str(Path(sys.executable).with_name("mlx-flash"))]


@contextmanager
def run_sidecar(log_path: Path, *args: str, workers: int = 2, timeout: float = 120.0) -> Iterator[Sidecar]:
    """`mlx-flash serve --workers N` on a free port; waits for every worker; always cleans up.
    With `--log-file=PATH` among `args` the log is read from there."""
    cmd = [*mlx_flash_command(), "serve", "--port", "0", "--workers", str(workers), *args]
    log_file_arg = next((a.split("=", 1)[1] for a in args if a.startswith("--log-file=")), None)
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    pids: set[int] = set()
    try:
        url = _wait_listening(
            proc, Path(log_file_arg) if log_file_arg else log_path, timeout, component="sidecar"
        )
        sidecar = Sidecar(url, proc, log_path)
        key = next((a.split("=", 1)[1] for a in args if a.startswith("--api-key=")), None)
        headers = {"Authorization": f"Bearer {key}"} if key else None
        sidecar.wait_ready(workers, timeout, headers)
        pids = {w["pid"] for w in sidecar.workers(headers)}
        yield sidecar
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        # Safety net only: a test asserts the sidecar itself leaves nothing behind.
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether `pid` is a running (not zombie) process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


@contextmanager
def memory_cgroup(name: str, limit: int) -> Iterator[tuple[Path, list[str]]]:
    """A smaller machine: a cgroup v1 memory group of `limit` bytes (the test is skipped without root).
    Yields the group and the command prefix that runs a process inside it; removed afterwards."""
    if not (CGROUP_ROOT / "cgroup.procs").exists() or not os.access(CGROUP_ROOT, os.W_OK):
        pytest.skip("needs root and the cgroup v1 memory controller")
    group = CGROUP_ROOT / f"{name}-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        yield group, ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh"]
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:  # the last pages are still being uncharged
                time.sleep(0.1)


@contextmanager
def holding(prefix: Sequence[str], nbytes: int) -> Iterator[subprocess.Popen[str]]:
    """Another process (run after `prefix`, e.g. inside a cgroup) holding `nbytes` of memory until
    the block ends (or it is killed sooner)."""
    code = f"import time; x = b'1' * {nbytes}; print('holding', flush=True); time.sleep(600)"
    hog = subprocess.Popen([*prefix, sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout is not None and hog.stdout.readline().strip() == "holding"
        yield hog
    finally:
        hog.kill()
        hog.wait(10)
        assert hog.stdout is not None
        hog.stdout.close()
