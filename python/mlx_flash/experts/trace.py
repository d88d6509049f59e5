"""Expert traces: which experts each token used in each MoE layer, recorded while a model runs, and
replayed offline against every cache policy and Belady's optimum.

A trace file holds JSON lines `{"model": M, "layer": L, "experts": [[e, ...], ...]}`, one line per
forward pass of a MoE layer, one list per token of the pass, in the order they ran.

    mlx-flash experts replay TRACE [--model M] [--capacity 0.25,0.5]   hit rates per policy and Belady's
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_flash.experts.policy import POLICIES, belady_hit_rate, hit_rate, make_policy
from mlx_flash.experts.pool import moe_layers


class _Traced(nn.Module):  # type: ignore[misc,name-defined]  # mlx.nn has no type information
    """Stands in for a SwitchGLU/SwitchMLP: notes the experts each token uses, then runs it."""

    stands_in = True

    def __init__(self, inner: Any, model: str, layer: int, out: IO[str]) -> None:
        super().__init__()
        self.inner = inner
        self._head = {"model": model, "layer": layer}
        self._out = out

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        experts = np.array(indices).reshape(-1, indices.shape[-1]).tolist()
        self._out.write(json.dumps({**self._head, "experts": experts}) + "\n")
        return self.inner(x, indices)  # type: ignore[no-any-return]


def record(model: Any, model_id: str, out: IO[str]) -> int:
    """Trace every MoE layer of `model` into `out` from now on; the number of layers traced. Each layer
    then waits for its router's choice before it runs: a diagnostic, slower than serving."""
    layers = moe_layers(model)
    for i, (parent, name, inner) in enumerate(layers):
        setattr(parent, name, _Traced(inner, model_id, i, out))
    return len(layers)


def read(path: Path, model: str | None = None) -> dict[int, list[list[int]]]:
    """Per layer, the experts of each token, in order; of `model`, which may be left out when the
    trace holds one model."""
    layers: dict[int, list[list[int]]] = {}
    seen: set[str] = set()
    with path.open() as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                seen.add(rec["model"])
                if model is None or rec["model"] == model:
                    layers.setdefault(int(rec["layer"]), []).extend(rec["experts"])
    if model is None and len(seen) > 1:
        raise ValueError(f"{path} holds several models ({', '.join(sorted(seen))}): name one")
    return layers


def replay(trace: dict[int, list[list[int]]], capacity: int) -> dict[str, float]:
    """Hit rate of each policy and of Belady's optimum at `capacity` experts per layer, over all layers."""
    uses = {layer: sum(len(set(t)) for t in tokens) for layer, tokens in trace.items()}
    total = sum(uses.values())
    rates: dict[str, float] = {}
    for name in (*POLICIES, "belady"):
        hits = 0.0  # each layer's hit rate weighted by its expert uses
        for layer, tokens in trace.items():
            if name == "belady":
                rate = belady_hit_rate(tokens, capacity)
            else:
                rate = hit_rate(tokens, make_policy(name, capacity))
            hits += rate * uses[layer]
        rates[name] = hits / total if total else 1.0
    return rates


def num_experts(trace: dict[int, list[list[int]]]) -> int:
    return 1 + max((e for tokens in trace.values() for t in tokens for e in t), default=-1)


def report(trace: dict[int, list[list[int]]], capacities: list[int]) -> Iterator[dict[str, Any]]:
    for c in capacities:
        yield {"capacity": c, **{k: round(v, 4) for k, v in replay(trace, c).items()}}


def capacities(text: str, experts: int) -> list[int]:
    """ "0.25,0.5,3": fractions of the experts per layer, or counts."""
    out = []
    for part in text.split(","):
        value = float(part)
        n = round(value * experts) if value < 1 else int(value)
        if not 1 <= n <= experts:
            raise ValueError(f"capacity {part} is not between 1 and {experts} experts")
        out.append(n)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mlx-flash experts", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("replay", help="hit rate of each cache policy and Belady's optimum on a trace")
    r.add_argument("trace", type=Path)
    r.add_argument("--model", help="which model of the trace (needed when it holds several)")
    r.add_argument("--capacity", default="0.25,0.5", help="experts per layer: fractions or counts")
    args = p.parse_args(argv)
    try:
        trace = read(args.trace, args.model)
        sizes = capacities(args.capacity, num_experts(trace))
    except (OSError, ValueError, KeyError) as e:
        p.error(str(e))
    print(f"{len(trace)} layers, {num_experts(trace)} experts, {len(next(iter(trace.values()), []))} tokens")  # noqa: T201
    print("capacity  " + "  ".join(f"{k:>7s}" for k in (*POLICIES, "belady")))  # noqa: T201
    for row in report(trace, sizes):
        print(f"{row['capacity']:8d}  " + "  ".join(f"{row[k]:7.1%}" for k in (*POLICIES, "belady")))  # noqa: T201
    return 0
