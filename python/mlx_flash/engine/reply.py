"""A reply's parts out of generated text: the one place where the model's reasoning and tool-call
markup become `ReasoningDelta` and `ToolCall` events, for every API surface.

The model's formats come from mlx-lm: its tokenizer wrapper knows the reasoning markers (`think_start`,
`think_end`), the tool-call markers (`tool_call_start`, `tool_call_end`) and the parser for what lies
between them (`mlx_lm/tool_parsers/`). Markers are found in the decoded text with mlx-lm's
`TextStateMachine`, which holds back text that could still become a marker, so no partial `<think>` or
`<tool_call>` leaks into the content while streaming.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from mlx_lm.generate import TextStateMachine
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_flash.engine.request import Event, ReasoningDelta, TextDelta, TokenLogprob, ToolCall

log = logging.getLogger(__name__)

Parser = Callable[[str, Any], Any]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_calls(parser: Parser, text: str, tools: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(id, name, arguments JSON) of each call in the text between one pair of markers; ValueError if
    it is not a well-formed call (the parser failed, no name, arguments not an object)."""
    try:
        parsed = parser(text, list(tools))
    except Exception as e:  # mlx-lm's parsers raise whatever their format's decoding raises
        raise ValueError(f"{type(e).__name__}: {e}") from None
    out = []
    for call in parsed if isinstance(parsed, list) else [parsed]:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
            raise ValueError("a tool call needs a name")
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"arguments are not JSON: {e}") from None
        if not isinstance(arguments, dict):
            raise ValueError("tool call arguments must be a JSON object")
        given = call.get("id")
        call_id = given if isinstance(given, str) and given else new_call_id()
        out.append((call_id, call["name"], json.dumps(arguments, ensure_ascii=False)))
    return out


class ReplyParser:
    """Feed it the text one request generates (after stop strings); it returns the events to emit:
    `TextDelta`s for ordinary text, `ReasoningDelta`s for the model's thinking, and one `ToolCall` per
    call, once its closing marker arrives.

    Markup that does not parse as a call is passed on as text, markers and all, so nothing the
    model wrote silently disappears. Whitespace between calls is dropped. Without parallel calls, the
    reply is `done` once its first call is complete: what the model writes after it is not a reply.
    """

    def __init__(
        self,
        tools: Sequence[dict[str, Any]] = (),
        call: tuple[str, str | None, Parser] | None = None,
        think: tuple[str, str] | None = None,
        reasoning: bool = False,
        parallel: bool = True,
    ) -> None:
        """`call`: the tool-call markers and parser (None: calls are not parsed); `think`: the
        reasoning markers (None: no reasoning); `reasoning`: the prompt left a thought open;
        `parallel`: more than one call may follow."""
        self._parser: Parser | None = call[2] if call else None
        self._start, self._end = (call[0], call[1] or "") if call else ("", "")
        self._tools = tools
        normal: list[tuple[str, str]] = []
        transitions: dict[str, list[tuple[str, str]]] = {"normal": normal}
        if call is not None:
            normal.append((self._start, "tool"))
            transitions["tool"] = [(self._end, "normal")] if self._end else []
        if think is not None:
            normal.append((think[0], "reasoning"))
            transitions["reasoning"] = [(think[1], "normal")]
        initial = "reasoning" if reasoning and think is not None else "normal"
        self._state = TextStateMachine(transitions).make_state(initial)  # type: ignore[no-untyped-call]
        self._in_call = False
        self._call_text = ""
        self._gap = ""  # whitespace after a call: dropped if another call (or the end) follows
        self._items: list[TokenLogprob] = []
        self._parallel = parallel
        self.calls = 0
        self.done = False  # one call is complete and no more may follow: generation can stop

    @classmethod
    def for_request(
        cls,
        tokenizer: TokenizerWrapper,
        tools: Sequence[dict[str, Any]] = (),
        prompt: Sequence[int] = (),
        reasoning: bool = False,
        parallel: bool = True,
    ) -> ReplyParser | None:
        """The parser a request needs: tool calls if it has tools, reasoning if asked and the model
        thinks (in reasoning from the start when the prompt opened a thought, as some templates do)."""
        calls = bool(tools) and tokenizer.has_tool_calling
        thinks = reasoning and tokenizer.has_thinking
        if not calls and not thinks:
            return None
        call = (tokenizer.tool_call_start, tokenizer.tool_call_end, tokenizer.tool_parser) if calls else None
        think = (tokenizer.think_start, tokenizer.think_end) if thinks else None
        tail = list(prompt[-64:])  # a template opens the thought at the very end of the prompt
        opened = think is not None and tokenizer.rfind_think_start(tail) > tokenizer.rfind_think_end(tail)  # type: ignore[no-untyped-call]
        return cls(tools, call, think, opened, parallel)

    def push(self, text: str, items: Sequence[TokenLogprob] = ()) -> list[Event]:
        if self.done:
            return []
        self._items.extend(items)
        self._state, segments = TextStateMachine.split(self._state, text)  # type: ignore[no-untyped-call]
        return self._segments(segments)

    def finish(self) -> list[Event]:
        """Generation ended: text held back as a possible marker is output, an open call is parsed."""
        if self.done:
            return []
        self._state, rest, _ = TextStateMachine.flush(self._state)  # type: ignore[no-untyped-call]
        out = self._segments([("tool" if self._in_call else "normal", rest)])
        if self._in_call:
            out.extend(self._close_call(closed=False))
        self._gap = ""
        return out

    def _segments(self, segments: list[tuple[str | None, str]]) -> list[Event]:
        out: list[Event] = []
        for state, text in segments:
            if self.done:
                break
            if state == "reasoning":
                if text:
                    out.append(ReasoningDelta(text))
                continue
            if state == "tool":
                if not self._in_call:  # a call starts: the text before it is all out
                    self._in_call, self._call_text, self._gap = True, "", ""
                self._call_text += text
                continue
            if self._in_call:
                out.extend(self._close_call(closed=True))
            if not text:
                continue
            if self.calls and not (self._gap + text).strip():
                self._gap += text
                continue
            out.append(TextDelta(self._gap + text, tuple(self._items)))
            self._gap, self._items = "", []
        return out

    def _close_call(self, closed: bool) -> list[Event]:
        self._in_call = False
        text, self._call_text = self._call_text, ""
        items, self._items = self._items, []
        try:
            assert self._parser is not None  # only a parser for calls enters the "tool" state
            calls = parse_calls(self._parser, text, self._tools)
        except ValueError as e:
            log.warning("the model's tool call does not parse; passed on as text", extra={"error": str(e)})
            raw = self._start + text + (self._end if closed else "")
            return [TextDelta(raw, tuple(items))]
        if not self._parallel:  # one block may hold several calls (a list, in some formats)
            calls, self.done = calls[:1], True
        out: list[Event] = []
        for call_id, name, arguments in calls:
            out.append(ToolCall(self.calls, call_id, name, arguments))
            self.calls += 1
        return out
