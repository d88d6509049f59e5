"""Where each expert's bytes sit in a model's safetensors files, and reading them without mmap.

mlx-lm stores a MoE layer's experts stacked: `...switch_mlp.gate_proj.weight` has shape
(num_experts, out, in) (quantized: packed uint32 weights plus scales and biases of the same leading
dimension), so expert e of a tensor is one contiguous run of bytes. The store reads those runs with
positional reads (`os.preadv`, which releases the GIL) on a thread pool, straight into the buffers the
arrays are made from: no mmap page faults, and every dtype kept exactly as stored (bf16 bits stay bf16).
What it read is not also kept in the page cache (F_NOCACHE on macOS, POSIX_FADV_DONTNEED on Linux).
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

# safetensors dtype -> (numpy dtype holding the bytes, the MLX dtype they are). NumPy has no bfloat16:
# its bits travel as uint16 and are viewed as bfloat16 in MLX.
DTYPES: dict[str, tuple[type[np.generic], mx.Dtype]] = {
    "BF16": (np.uint16, mx.bfloat16),
    "F16": (np.float16, mx.float16),
    "F32": (np.float32, mx.float32),
    "U32": (np.uint32, mx.uint32),
    "U8": (np.uint8, mx.uint8),
    "I8": (np.int8, mx.int8),
    "I32": (np.int32, mx.int32),
}
# Larger reads are split so one expert's tensor is read by several threads at once.
MAX_READ = 4 << 20
# Reads of up to this many experts of a tensor (a decode step's misses) reuse one buffer.
STAGED_EXPERTS = 16


@dataclass(frozen=True)
class TensorLocation:
    """One tensor of a safetensors file: its dtype, shape and absolute byte range in the file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class ExpertTensor:
    """A tensor whose leading dimension is the experts; expert e is bytes [offset(e), +expert_bytes)."""

    name: str
    location: TensorLocation

    @property
    def num_experts(self) -> int:
        return self.location.shape[0]

    @property
    def expert_shape(self) -> tuple[int, ...]:
        return self.location.shape[1:]

    @property
    def expert_bytes(self) -> int:
        return (self.location.end - self.location.start) // self.num_experts

    def offset(self, expert: int) -> int:
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"{self.name} has {self.num_experts} experts, not {expert}")
        return self.location.start + expert * self.expert_bytes


def read_index(path: Path) -> dict[str, TensorLocation]:
    """The tensors of one safetensors file, from its header (8-byte little-endian length, then JSON)."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        size = path.stat().st_size
        if n > size - 8:
            raise ValueError(f"{path}: header length {n} runs past the end of the file")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON: {e})") from e
    base = 8 + n
    out = {}
    try:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if not 0 <= begin <= end <= size - base:
                raise ValueError(f"{path}: {name}'s bytes lie outside the file")
            out[name] = TensorLocation(path, info["dtype"], tuple(info["shape"]), base + begin, base + end)
    except (AttributeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a safetensors header ({type(e).__name__}: {e})") from e
    return out


def expert_file_bytes(model_dir: Path, num_experts: int) -> int:
    """Bytes of the stacked expert tensors in a model's safetensors files, from their headers alone:
    what streaming can keep on disk (mlx-lm names them `...switch_mlp.*` or `...experts.*`)."""
    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        for name, loc in read_index(f).items():
            stacked = len(loc.shape) >= 2 and loc.shape[0] == num_experts
            if stacked and ("switch_mlp." in name or ".experts." in name):
                total += loc.end - loc.start
    return total


class ExpertStore:
    """Positional reads of chosen experts' rows from a model directory's safetensors files."""

    def __init__(self, model_dir: Path, names: Iterable[str], threads: int = 8) -> None:
        index: dict[str, TensorLocation] = {}
        for f in sorted(Path(model_dir).glob("*.safetensors")):
            index.update(read_index(f))
        self.tensors: dict[str, ExpertTensor] = {}
        for name in names:
            loc = index.get(name)
            if loc is None:
                raise KeyError(f"{name} is not in the safetensors files of {model_dir}")
            if loc.dtype not in DTYPES:
                raise ValueError(f"{name}: dtype {loc.dtype} is not supported")
            if not loc.shape or (loc.end - loc.start) % loc.shape[0]:
                raise ValueError(f"{name} (shape {loc.shape}) is not stacked by expert")
            self.tensors[name] = ExpertTensor(name, loc)
        self._fds = {f: _open_uncached(f) for f in {t.location.file for t in self.tensors.values()}}
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="expert-read")
        self.bytes_read = 0
        # Read buffers, kept between reads: a fresh one would page-fault on every read.
        self._staging: dict[tuple[Any, ...], np.ndarray[Any, Any]] = {}

    def expert_bytes(self, names: Iterable[str] | None = None) -> int:
        """Bytes of one expert over `names` (all tensors by default)."""
        return sum(self.tensors[n].expert_bytes for n in (self.tensors if names is None else names))

    def read(self, names: Sequence[str], experts: Sequence[int]) -> dict[str, mx.array]:
        """The rows of `experts` of each tensor in `names`, stacked: shape (len(experts), *expert_shape).
        Each tensor is copied into MLX as soon as its reads are done, while the others' still run."""
        return {
            name: device_array(buf, self.tensors[name].location.dtype)
            for name, buf in self._reads(names, experts)
        }

    def read_host(self, names: Sequence[str], experts: Sequence[int]) -> dict[str, np.ndarray[Any, Any]]:
        """`read` into host buffers (bf16 as uint16 bits), valid until the next read."""
        return dict(self._reads(names, experts))

    def _reads(
        self, names: Sequence[str], experts: Sequence[int]
    ) -> Iterator[tuple[str, np.ndarray[Any, Any]]]:
        """Every read of every tensor in flight at once; then each tensor's buffer, in order, once its
        reads are done and its bytes have left the page cache (we hold them), where the OS lets us say
        so. Calls must not overlap (the pools hold their model's lock)."""
        started = []
        taken: dict[tuple[Any, ...], int] = {}  # buffers of each shape this call uses
        for name in names:
            t = self.tensors[name]
            np_dtype, _ = DTYPES[t.location.dtype]
            kind = (t.expert_shape, t.location.dtype)
            taken[kind] = taken.get(kind, -1) + 1
            buf = self._stage((*kind, taken[kind]), len(experts), np_dtype)
            raw = buf.reshape(-1).view(np.uint8).data
            fd, size = self._fds[t.location.file], t.expert_bytes
            jobs, spans = [], []
            for i, e in enumerate(experts):
                start = t.offset(e)
                spans.append((fd, start, size))
                for part in range(0, size, MAX_READ):
                    n = min(MAX_READ, size - part)
                    into = raw[i * size + part : i * size + part + n]
                    jobs.append(self._pool.submit(_read_exact, fd, into, start + part, t.location.file))
            started.append((name, buf, jobs, spans))
        for name, buf, jobs, spans in started:
            for job in jobs:
                job.result()
            if hasattr(os, "posix_fadvise"):
                for fd, start, size in spans:
                    os.posix_fadvise(fd, start, size, os.POSIX_FADV_DONTNEED)
            self.bytes_read += buf.nbytes
            yield name, buf

    def _stage(self, key: tuple[Any, ...], experts: int, dtype: type[np.generic]) -> np.ndarray[Any, Any]:
        """A buffer for `experts` rows of shape key[0]; the same one for every layer (reads never
        overlap), so the store holds a few buffers whatever the model's depth."""
        shape = (experts, *key[0])
        if experts > STAGED_EXPERTS:  # a long prompt's load: a one-off buffer
            return np.empty(shape, dtype=dtype)
        buf = self._staging.get(key)
        if buf is None:
            buf = self._staging[key] = np.empty((STAGED_EXPERTS, *shape[1:]), dtype=dtype)
        return buf[:experts]

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def host_array(array: mx.array, dtype: str) -> np.ndarray[Any, Any]:
    """The bytes of an evaluated array of safetensors `dtype`, in place (bf16 as uint16 bits). Unlike
    an MLX operation, this never waits behind the work queued by another thread."""
    host: np.ndarray[Any, Any] = np.frombuffer(array, dtype=DTYPES[dtype][0])  # type: ignore[call-overload]
    return host.reshape(array.shape)


def device_array(host: np.ndarray[Any, Any], dtype: str) -> mx.array:
    """A copy of `host` as an array of safetensors `dtype` (bf16 bits viewed as bfloat16, lazily: the
    view is an MLX operation, to be evaluated on the thread that uses the array)."""
    array, mx_dtype = mx.array(host), DTYPES[dtype][1]
    return array.view(mx_dtype) if array.dtype != mx_dtype else array


def _open_uncached(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    if hasattr(fcntl, "F_NOCACHE"):  # macOS: reads bypass the unified buffer cache
        fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
    return fd


def _read_exact(fd: int, into: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done:]], offset + done)
        if n == 0:
            raise OSError(f"{path} ends at byte {offset + done}, before the experts it held when loaded")
        done += n
