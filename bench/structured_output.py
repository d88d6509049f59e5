"""llguidance vs xgrammar for constrained decoding, side by side in one run: schema coverage, grammar
compile time, per-token mask time, and end-to-end decode speed on the demo model.

xgrammar needs PyTorch, which mlx-flash never depends on, so this runs in a venv with both libraries:

    python -m venv /tmp/sovenv && /tmp/sovenv/bin/pip install ".[test]" xgrammar torch==2.13.0
    /tmp/sovenv/bin/python bench/structured_output.py   # writes bench/results/structured_output.json

Coverage is measured, not read off feature lists: for each JSON-schema feature, a grammar must accept a
valid document and reject an invalid one token by token. A library that compiles the schema but accepts
the invalid document ignores the feature silently (the failure a server must never pass on); one that
refuses the schema lets us answer 400. Mask time is the cost per generated token of computing the allowed
set and advancing the matcher, on the demo tokenizer (830 tokens) and on a 65,536-token byte-level BPE
trained here on the Python standard library (a real model's vocabulary is 32k-256k).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np
import xgrammar as xgr
from llguidance import LLMatcher
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.utils import load
from transformers import PreTrainedTokenizerFast

from mlx_flash.demo import DEMO_MODEL_PATH
from mlx_flash.engine.constrain import JSON_OPTIONS, Masker
from results import header, write

RESULTS = Path(__file__).with_name("results") / "structured_output.json"

# (feature, schema, a valid document, an invalid one)
CASES: list[tuple[str, dict[str, Any], Any, Any]] = [
    (
        "types and required",
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
            "required": ["a", "b"],
        },
        {"a": 1, "b": "x"},
        {"a": 1},
    ),
    (
        "additionalProperties false",
        {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
        {"a": 1},
        {"a": 1, "z": 2},
    ),
    ("enum", {"enum": ["red", "green"]}, "red", "blue"),
    ("const", {"const": "fixed"}, "fixed", "other"),
    (
        "nested objects and arrays",
        {
            "type": "object",
            "properties": {
                "xs": {
                    "type": "array",
                    "items": {"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"]},
                }
            },
            "required": ["xs"],
        },
        {"xs": [{"n": 1.5}, {"n": 2}]},
        {"xs": [{"m": 1}]},
    ),
    ("anyOf", {"anyOf": [{"type": "integer"}, {"type": "string"}]}, 5, True),
    ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "s"),
    (
        "allOf",
        {
            "allOf": [
                {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]},
            ]
        },
        {"a": 1, "b": 2},
        {"a": 1},
    ),
    (
        "$ref and $defs",
        {
            "$defs": {"p": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
            "type": "object",
            "properties": {"p": {"$ref": "#/$defs/p"}},
            "required": ["p"],
        },
        {"p": {"x": 1}},
        {"p": {}},
    ),
    (
        "recursive $ref",
        {
            "$defs": {
                "t": {
                    "type": "object",
                    "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/t"}}},
                }
            },
            "$ref": "#/$defs/t",
        },
        {"kids": [{"kids": []}]},
        {"kids": [1]},
    ),
    ("string pattern", {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"}, "abc-12", "abc-123"),
    ("string minLength/maxLength", {"type": "string", "minLength": 2, "maxLength": 4}, "abc", "abcdef"),
    (
        "string format date-time",
        {"type": "string", "format": "date-time"},
        "2026-12-06T03:04:05Z",
        "yesterday",
    ),
    ("string format email", {"type": "string", "format": "email"}, "a@b.co", "not an email"),
    ("integer minimum/maximum", {"type": "integer", "minimum": 1, "maximum": 9}, 5, 12),
    ("exclusiveMinimum", {"type": "number", "exclusiveMinimum": 0}, 0.5, 0),
    ("multipleOf", {"type": "integer", "multipleOf": 5}, 15, 7),
    (
        "array minItems/maxItems",
        {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
        [1, 2],
        [1, 2, 3],
    ),
    (
        "prefixItems (tuple)",
        {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
        [1, "a"],
        ["a", 1],
    ),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    (
        "patternProperties",
        {"type": "object", "patternProperties": {"^x_": {"type": "integer"}}, "additionalProperties": False},
        {"x_a": 1},
        {"y": 1},
    ),
    ("propertyNames", {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}}, {"ab": 1}, {"A1": 1}),
    ("minProperties", {"type": "object", "minProperties": 1}, {"a": 1}, {}),
    ("not", {"not": {"type": "string"}}, 1, "s"),
    ("if/then/else", {"if": {"type": "integer"}, "then": {"minimum": 0}, "else": {"type": "string"}}, 3, -3),
    ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}, {"a": 1, "b": 2}, {"a": 1}),
]


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "))


def big_tokenizer(directory: Path, vocab: int = 65536) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the Python standard library's sources (cached in `directory`)."""
    path = directory / f"bpe-{vocab}.json"
    if not path.exists():
        from tokenizers import ByteLevelBPETokenizer

        files = [
            str(p) for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py") if p.stat().st_size < 1 << 20
        ]
        bpe = ByteLevelBPETokenizer()
        bpe.train(files[:3000], vocab_size=vocab, min_frequency=2, special_tokens=["<|endoftext|>"])
        bpe.save(str(path))
    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|endoftext|>")  # type: ignore[no-untyped-call]


class Lib(Protocol):
    name: str

    def compile(self, schema: dict[str, Any]) -> Any: ...
    def matcher(self, compiled: Any) -> Any: ...
    def step(self, matcher: Any, token: int) -> bool: ...  # mask, then consume: False if not allowed
    def accepts_end(self, matcher: Any) -> bool: ...


class Llg:
    name = "llguidance"

    def __init__(self, tok: PreTrainedTokenizerFast, vocab: int) -> None:
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        self.vocab = vocab

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        error = LLMatcher.validate_grammar(grammar, self.tok)
        if error:
            raise ValueError(error)
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return LLMatcher(self.tok, compiled, log_level=0)

    def step(self, m: Any, token: int) -> bool:
        mask = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return bool(mask[token]) and m.consume_token(token)

    def accepts_end(self, m: Any) -> bool:
        return bool(m.is_accepting())


class Xgr:
    name = "xgrammar"

    def __init__(self, tok: PreTrainedTokenizerFast, vocab: int) -> None:
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)
        self.vocab = vocab

    def compile(self, schema: dict[str, Any]) -> Any:
        # The same compact separators as ours, no free whitespace.
        return self.compiler.compile_json_schema(schema, any_whitespace=False, separators=(", ", ": "))

    def matcher(self, compiled: Any) -> Any:
        return [xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, self.vocab)]

    def step(self, m: Any, token: int) -> bool:
        matcher, bitmask = m
        matcher.fill_next_token_bitmask(bitmask)
        words = bitmask[0].numpy().view(np.uint8)
        allowed = np.unpackbits(words, bitorder="little")
        return bool(allowed[token]) and matcher.accept_token(token)

    def accepts_end(self, m: Any) -> bool:
        matcher = m[0]
        return bool(matcher.is_terminated()) or bool(matcher.accept_token(self.info.stop_token_ids[0]))


def follow(lib: Lib, compiled: Any, tokens: list[int]) -> tuple[bool, list[float]]:
    """Feed `tokens` through a fresh matcher: (all allowed and the end accepted, seconds per token)."""
    m = lib.matcher(compiled)
    times = []
    for t in tokens:
        start = time.perf_counter()
        ok = lib.step(m, t)
        times.append(time.perf_counter() - start)
        if not ok:
            return False, times
    return lib.accepts_end(m), times


def coverage(lib: Lib, tok: PreTrainedTokenizerFast) -> dict[str, Any]:
    rows, per_token, compile_ms = {}, [], []
    for feature, schema, good, bad in CASES:
        start = time.perf_counter()
        try:
            compiled = lib.compile(schema)
        except Exception as e:  # noqa: BLE001 - each library raises its own kinds
            rows[feature] = {"result": "refused", "error": str(e)[:200]}
            continue
        compile_ms.append((time.perf_counter() - start) * 1e3)
        good_ok, times = follow(lib, compiled, tok.encode(dumps(good), add_special_tokens=False))
        bad_ok, _ = follow(lib, compiled, tok.encode(dumps(bad), add_special_tokens=False))
        per_token.extend(times)
        result = "enforced" if good_ok and not bad_ok else "ignored" if good_ok else "rejects valid"
        rows[feature] = {"result": result}
    counts = {
        k: sum(r["result"] == k for r in rows.values())
        for k in ("enforced", "refused", "ignored", "rejects valid")
    }
    return {
        "features": rows,
        "counts": counts,
        "compile_ms_median": statistics.median(compile_ms),
        "mask_us_per_token_median": statistics.median(per_token) * 1e6,
        "mask_us_per_token_p90": float(np.percentile(per_token, 90)) * 1e6,
        "tokens_timed": len(per_token),
    }


class XgrMasker:
    """xgrammar as an mlx-lm logits processor, the same way Masker drives llguidance."""

    def __init__(self, lib: Xgr, compiled: Any) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, lib.vocab)
        self.vocab = lib.vocab
        self.started = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.started:
            self.matcher.accept_token(cast(int, tokens.reshape(-1)[-1].item()))
        self.started = True
        if self.matcher.is_terminated():  # mlx-lm computes one step past the end of sequence
            return logits
        self.matcher.fill_next_token_bitmask(self.bitmask)
        allowed = np.unpackbits(self.bitmask[0].numpy().view(np.uint8), bitorder="little")[: self.vocab]
        return mx.where(mx.array(allowed.astype(bool)), logits, mx.array(-float("inf"), dtype=logits.dtype))


def decode_speed(repeats: int, max_tokens: int = 300) -> dict[str, Any]:
    """Greedy decode tokens/s on the demo model, free and held to a schema by each library, in one
    harness (mlx-lm's `stream_generate` with a logits processor). End of sequence is pushed far down
    (but stays possible, so a finished grammar can end) so every variant decodes long enough to time."""
    model, wrapper = load(str(DEMO_MODEL_PATH))[:2]
    tok, vocab = wrapper._tokenizer, int(model.args.vocab_size)
    eos = sorted(wrapper.eos_token_ids)
    llg = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=eos)
    xg = Xgr(tok, vocab)
    schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    xg_compiled = xg.compile(schema)
    messages = [{"role": "user", "content": "Tell me a story"}]
    prompt = wrapper.apply_chat_template(messages, add_generation_prompt=True)  # type: ignore[no-untyped-call]
    late_end = make_logits_processors(logit_bias={t: -1e4 for t in eos})
    makers: dict[str, Callable[[], list[Any]]] = {
        "none": lambda: [],
        "llguidance": lambda: [Masker(LLMatcher(llg, grammar, log_level=0), vocab, eos)],
        "xgrammar": lambda: [XgrMasker(xg, xg_compiled)],
    }
    runs: dict[str, list[tuple[int, float]]] = {}
    for _ in range(repeats):  # interleaved, so drift hits every variant alike
        for name, make in makers.items():
            tokens, start = 0, time.perf_counter()
            processors = [*late_end, *make()]
            sampler = make_sampler(0.0)
            for r in stream_generate(
                model, wrapper, prompt, max_tokens=max_tokens, sampler=sampler, logits_processors=processors
            ):
                tokens = r.generation_tokens
            runs.setdefault(name, []).append((tokens, time.perf_counter() - start))
    summary: dict[str, Any] = {}
    for name, timed in runs.items():
        rate = statistics.median(n / s for n, s in timed)
        summary[name] = {"tokens_per_second": rate, "tokens": timed[0][0]}
    for name in ("llguidance", "xgrammar"):
        summary[name]["ratio_to_free"] = (
            summary[name]["tokens_per_second"] / summary["none"]["tokens_per_second"]
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="interleaved decode runs per variant")
    p.add_argument("--max-tokens", type=int, default=300)
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mlx-flash-bench")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    started = time.time()
    result: dict[str, Any] = {
        **header("structured_output", args, started, omit=("cache",)),
        "versions": {name: _version(name) for name in ("llguidance", "xgrammar", "torch")},
    }
    demo = load(str(DEMO_MODEL_PATH))[1]
    tokenizers = {"demo": (demo._tokenizer, 830), "bpe65536": (big_tokenizer(args.cache), 65536)}
    libraries: dict[str, Any] = {}
    for label, (tok, vocab) in tokenizers.items():
        for lib in (Llg(tok, vocab), Xgr(tok, vocab)):
            cov = libraries.setdefault(lib.name, {})[label] = coverage(lib, tok)
            print(f"{label} {lib.name}: {cov['counts']} {cov['mask_us_per_token_median']:.1f} us/token")
    result["libraries"] = libraries
    result["decode"] = decode = decode_speed(args.repeats, args.max_tokens)
    ours = libraries["llguidance"]["bpe65536"]["counts"]
    result["summary"] = {
        "targets": {
            "no_silent_ignores": {
                "target": "the chosen library never compiles a schema it does not enforce",
                "value": f"{ours['ignored']} ignored, {ours['rejects valid']} rejecting valid documents",
                "pass": ours["ignored"] == 0 and ours["rejects valid"] == 0,
            },
            "decode_overhead": {
                "target": "constrained decode >= 0.95x free",
                "value": f"{decode['llguidance']['ratio_to_free']:.3f}x",
                "pass": decode["llguidance"]["ratio_to_free"] >= 0.95,
            },
        }
    }
    write(result, args.out, started)
    return 0


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    sys.exit(main())
