"""Constrained decoding with llguidance: output that must match a JSON schema, or a tool call.

A constraint is an llguidance grammar (its JSON form). Each request gets its own matcher, run as the last
of its mlx-lm logits processors: it advances with the token sampled last and masks every token the
grammar does not allow next, so what is generated always parses. End-of-sequence is allowed only where
the grammar may end, and is all that is allowed once it must. Why llguidance and not xgrammar:
bench/structured_output.py measures both (README "Structured output").
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any, cast

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np
from llguidance import LLMatcher, LLTokenizer

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

log = logging.getLogger(__name__)

# Compact JSON with Python's separators: no runs of whitespace for a small model to get lost in.
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def json_schema_grammar(schema: dict[str, Any] | None = None) -> str:
    """The grammar of JSON text matching `schema` (None: any JSON object)."""
    return LLMatcher.grammar_from_json_schema(schema or ANY_OBJECT, defaults=JSON_OPTIONS)


def tool_call_grammar(
    tools: list[dict[str, Any]],
    name: str | None = None,
    start: str = '"<tool_call>"',
    end: str = '"</tool_call>"',
    parallel: bool = True,
) -> str:
    """The grammar of one (or, if `parallel`, several) tool calls in the model's format:
    `start{"name": N, "arguments": {...}}end`, N one of `tools` (OpenAI function tools:
    `{"type": "function", "function": {"name", "parameters"}}`) or exactly `name`, the arguments
    matching that tool's parameters schema. `start` and `end` are Lark terms: a quoted string, or a
    special token (`<[id]>`); `Grammars.tool_calls` picks them for the model."""
    choices = []
    for tool in tools:
        fn = tool.get("function", tool)
        if name is not None and fn["name"] != name:
            continue
        choices.append(
            {
                "type": "object",
                "properties": {
                    "name": {"const": fn["name"]},
                    "arguments": fn.get("parameters") or ANY_OBJECT,
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    if not choices:
        raise ValueError(f"no tool named {name!r}" if name else "no tools")
    schema = choices[0] if len(choices) == 1 else {"anyOf": choices}
    # Templates put the JSON on a line of its own (Qwen: "<tool_call>\n{...}\n</tool_call>"): allowed,
    # so the model writes a forced call the way it learned to write calls.
    nl = json.dumps("\n")
    call = f"{start} {nl}? %json{json.dumps({'x-guidance': JSON_OPTIONS, **schema})} {nl}? {end}"
    body = f"call ({nl} call)*" if parallel else "call"
    return LLMatcher.grammar_from_lark(f"start: {body}\ncall: {call}\n")


class Grammars:
    """One model's grammar machinery: its llguidance tokenizer (built on first use; about a second for
    a large vocabulary) and the per-request processors that enforce a grammar."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self._eos = eos_token_ids
        self._tokenizer: LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._hf, n_vocab=self.vocab_size, eos_token=self._eos
                )
            return self._tokenizer

    def tool_calls(
        self,
        tools: list[dict[str, Any]],
        start: str,
        end: str,
        name: str | None = None,
        parallel: bool = True,
    ) -> str:
        """The grammar of tool calls between the model's `start` and `end` markers (see
        `tool_call_grammar`); a marker that is one special token must be that token."""
        return tool_call_grammar(tools, name, self._term(start), self._term(end), parallel)

    def _term(self, text: str) -> str:
        token = self._hf.get_added_vocab().get(text)
        return f"<[{token}]>" if token is not None else json.dumps(text)

    def compile(self, grammar: str) -> Masker:
        """A fresh processor for one request; ValueError says why `grammar` cannot be enforced (an
        unsupported schema feature, say). Up to a second for big grammars: call it off the event loop."""
        matcher = LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return Masker(matcher, self.vocab_size, self._eos)


class Masker:
    """An mlx-lm logits processor for one request: called once per generated token, in order, with
    the tokens so far (the last is the token sampled at the previous step, or the prompt's last on
    the first call); masks what the grammar does not allow next."""

    def __init__(self, matcher: LLMatcher, vocab_size: int, eos: list[int]) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos = eos
        self.started = False

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self.started:
            self.matcher.consume_token(cast(int, tokens.reshape(-1)[-1].item()))
        self.started = True
        if self.matcher.is_error():
            # Cannot happen with our own masks; end the output rather than emit what does not match.
            log.error("constrained decoding failed", extra={"error": self.matcher.get_error()})
            allowed = np.zeros(self.vocab_size, dtype=bool)
            allowed[self.eos] = True
        else:
            words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
            allowed = np.unpackbits(words, bitorder="little")[: self.vocab_size].astype(bool)
        return mx.where(mx.array(allowed), logits, mx.array(-float("inf"), dtype=logits.dtype))
