"""Expert traces: which experts each token used in each MoE layer, recorded while a model runs, and
replayed offline against every cache policy and Belady's optimum.

A trace file holds JSON lines `{"model": M, "layer": L, "bulk": B, "num_experts": N, "experts": [[e, ...],
...]}`, one line per forward pass of a MoE layer (B: a prompt chunk; N: the layer's experts), one list per
token of the pass, in the order they ran (a last line cut short, by a worker killed mid-write, is left
out). Replay serves it as the pools do: each pass asks for its experts once, a prompt chunk's as bulk
(they must not flush what decoding uses), in groups no larger than the pool.

    mlx-flash experts replay TRACE [--model M] [--capacity 0.25,0.5]   hit rates per policy, the best
                                                                       fixed set and Belady's
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_flash.experts.policy import POLICIES, belady_hit_rate, hit_rate, make_policy, static_hit_rate
from mlx_flash.experts.pool import experts_of, is_bulk, moe_layers


class _Traced(nn.Module):  # type: ignore[misc,name-defined]  # mlx.nn has no type information
    """Stands in for a SwitchGLU/SwitchMLP: notes the experts each token uses, then runs it."""

    stands_in = True

    def __init__(self, inner: Any, model: str, layer: int, out: IO[str]) -> None:
        super().__init__()
        self.inner = inner
        self._head = {"model": model, "layer": layer, "num_experts": experts_of(inner)}
        self._out = out

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        experts = np.array(indices).reshape(-1, indices.shape[-1]).tolist()
        self._out.write(json.dumps({**self._head, "bulk": is_bulk(x), "experts": experts}) + "\n")
        return self.inner(x, indices)  # type: ignore[no-any-return]


def record(model: Any, model_id: str, out: IO[str]) -> int:
    """Trace every MoE layer of `model` into `out` from now on; the number of layers traced. Each layer
    then waits for its router's choice before it runs: a diagnostic, slower than serving."""
    layers = moe_layers(model)
    for i, (parent, name, inner) in enumerate(layers):
        setattr(parent, name, _Traced(inner, model_id, i, out))
    return len(layers)


@dataclass(frozen=True)
class Pass:
    """One forward pass of a layer: each token's experts; `bulk` for a prompt chunk; `experts`, the
    layer's number of experts (None in traces that did not record it)."""

    bulk: bool
    tokens: list[list[int]]
    experts: int | None = None


Trace = dict[int, list[Pass]]  # per layer, its passes in order


def read(path: Path, model: str | None = None) -> Trace:
    """Per layer, its passes in order; of `model`, which may be left out when the trace holds one.
    ValueError, naming the line, for anything that is not a trace."""
    layers: Trace = {}
    seen: set[str] = set()
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                if not line.endswith("\n"):  # the last line, cut short mid-write
                    break
                raise ValueError(f"{path}:{number}: not JSON ({e})") from e
            name, layer, tokens, experts = _fields(rec, f"{path}:{number}")
            seen.add(name)
            if model is None or name == model:
                layers.setdefault(layer, []).append(Pass(bool(rec.get("bulk")), tokens, experts))
    if model is None and len(seen) > 1:
        raise ValueError(f"{path} holds several models ({', '.join(sorted(seen))}): name one")
    if not layers:
        raise ValueError(f"{path} holds no passes" + (f" of model {model!r}" if model else ""))
    return layers


def _fields(rec: Any, where: str) -> tuple[str, int, list[list[int]], int | None]:
    """A record's model, layer, experts per token and the layer's number of experts, checked."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: not a trace record (a JSON object)")
    name, layer, tokens = rec.get("model"), rec.get("layer"), rec.get("experts")
    experts = rec.get("num_experts")
    ok = (
        isinstance(name, str)
        and isinstance(layer, int)
        and isinstance(tokens, list)
        and all(isinstance(t, list) and all(type(e) is int and e >= 0 for e in t) for t in tokens)
    )
    if not ok:
        raise ValueError(f"{where}: a record needs model (text), layer (int), experts (lists of expert ids)")
    if experts is not None and not (
        type(experts) is int and all(e < experts for t in cast(list[list[int]], tokens) for e in t)
    ):
        raise ValueError(f"{where}: num_experts must be a number above every expert id of the record")
    return cast(tuple[str, int, list[list[int]], int | None], (name, layer, tokens, experts))


def needs(passes: list[Pass]) -> list[tuple[bool, list[int]]]:
    """Each pass's experts, once each, in the order its tokens use them."""
    return [(p.bulk, list(dict.fromkeys(e for t in p.tokens for e in t))) for p in passes]


def replay(trace: Trace, capacity: int) -> dict[str, float]:
    """Hit rate of each policy, of hindsight's best fixed set and of Belady's optimum at `capacity`
    experts per layer, over all layers (hits / expert uses, an expert counted once per pass that
    needs it), each pass served as the pools serve it (`policy.groups`)."""
    per_layer = {layer: needs(passes) for layer, passes in trace.items()}
    uses = {layer: sum(len(n) for _, n in passes) for layer, passes in per_layer.items()}
    total = sum(uses.values())
    rates: dict[str, float] = {}
    for name in (*POLICIES, "static", "belady"):
        hits = 0.0  # each layer's hit rate weighted by its expert uses
        for layer, passes in per_layer.items():
            if name == "belady":
                rate = belady_hit_rate([n for _, n in passes], capacity)
            elif name == "static":
                rate = static_hit_rate([n for _, n in passes], capacity)
            else:
                rate = hit_rate(passes, make_policy(name, capacity))
            hits += rate * uses[layer]
        rates[name] = hits / total if total else 1.0
    return rates


def num_experts(trace: Trace) -> int:
    """Experts per layer: as recorded, or (in a trace that did not record it) one more than the highest
    id it uses."""
    recorded = {p.experts for passes in trace.values() for p in passes if p.experts is not None}
    if recorded:
        return max(recorded)
    return 1 + max((e for passes in trace.values() for p in passes for t in p.tokens for e in t), default=-1)


def num_tokens(trace: Trace) -> int:
    return sum(len(p.tokens) for p in next(iter(trace.values()), []))


def report(trace: Trace, capacities: list[int]) -> Iterator[dict[str, Any]]:
    for c in capacities:
        yield {"capacity": c, **{k: round(v, 4) for k, v in replay(trace, c).items()}}


def capacities(text: str, experts: int) -> list[int]:
    """ "0.25,0.5,3": fractions of the experts per layer, or counts."""
    out = []
    for part in text.split(","):
        value = float(part)
        if not math.isfinite(value):
            raise ValueError(f"capacity {part} is not a number of experts")
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
    passes = len(next(iter(trace.values()), []))
    print(f"{len(trace)} layers, {num_experts(trace)} experts, {num_tokens(trace)} tokens in {passes} passes")  # noqa: T201
    columns = (*POLICIES, "static", "belady")
    print("capacity  " + "  ".join(f"{k:>7s}" for k in columns))  # noqa: T201
    for row in report(trace, sizes):
        print(f"{row['capacity']:8d}  " + "  ".join(f"{row[k]:7.1%}" for k in columns))  # noqa: T201
    return 0
