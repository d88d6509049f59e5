"""What the API adapters hand the engine, and what the engine streams back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from mlx_flash.engine.constrain import Masker

FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; defaults are the OpenAI API's (temperature 1, no truncation)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Tools:
    """Function tools (OpenAI-shaped) the model may call: its tool-call markup becomes ToolCall events."""

    functions: tuple[dict[str, Any], ...] = ()
    parallel: bool = True  # False: generation ends once the first call is complete


@dataclass(frozen=True)
class GenerationRequest:
    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    # Output must match this request's grammar (a JSON schema, a tool call): see engine/constrain.py.
    constraint: Masker | None = None
    tools: Tools = Tools()
    # A reply after a chat template: a thinking model's reasoning comes as ReasoningDelta events, apart
    # from the text, and a leading space of the first token is dropped (mlx-lm's detokenizers do). Else a
    # raw completion, which continues its prompt: that space is part of the text.
    reply: bool = False


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: list[int]


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: `token` is its share of the streamed text, `bytes` its raw bytes."""

    token: str
    logprob: float
    bytes: list[int]
    top: tuple[TopLogprob, ...]


@dataclass(frozen=True)
class TextDelta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ReasoningDelta:
    """Text of the model's thinking (between its reasoning markers), apart from the reply."""

    text: str


@dataclass(frozen=True)
class ToolCall:
    """One complete call the model made: `arguments` is the JSON text of an object."""

    index: int  # 0, 1, ... in the order the model made its calls
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    stop_sequence: str | None = None  # the stop string that ended generation (Anthropic reports it)


@dataclass(frozen=True)
class Failed:
    message: str
    public: bool = False  # a message for the client (else it is told only that the server failed)


Event = TextDelta | ReasoningDelta | ToolCall | Finished | Failed
