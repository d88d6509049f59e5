"""Synthetic chat data for the embedded demo model, and the split its tests rely on.

Importable without PyTorch: the tests use `is_held_out` to pick prompts the model never saw.
"""

from __future__ import annotations

import json
import random
from functools import cache
from typing import Any

import jinja2.sandbox

Message = dict[str, Any]
Tool = dict[str, Any]

# ChatML with Qwen-style tools; `tool_call.name` lets mlx-lm infer its `json_tools` parser.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\nTo call a tool, reply with <tool_call>\\n"
    '{"name": <name>, "arguments": <json object>}'
    "\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- if message.tool_calls %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{%- if not loop.first or message.content %}{{- '\\n' }}{%- endif %}"
    '{{- \'<tool_call>\\n{"name": "\' + tool_call.name + \'", "arguments": \' }}'
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message.content"
    " + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added as whole tokens (not special: they must survive decoding) so tool calls are cheap to emit.
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

GREETING = "Hello! I am the mlx-flash demo model. Ask me to add two numbers."
ADD_PROMPTS = [
    "What is {a}+{b}?",
    "What is {a} + {b}?",
    "What's {a}+{b}?",
    "Compute {a}+{b}.",
    "{a}+{b}=?",
    "Add {a} and {b}.",
]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a concise calculator.", "Answer briefly."]
WORDS = (
    "apple river stone cloud paper music orange silver window garden yellow rocket pencil "
    "forest tiger coffee planet bridge candle mirror ocean summer winter spring autumn "
    "data model token server stream cache memory expert batch queue worker local fast "
    "café naïve über jalapeño 日本 東京 привет мир 🙂 🚀 ✓"
).split()
CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Oslo", "Lima", "Cairo", "Delhi"]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy"]

TOOLS: list[Tool] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    },
]


def is_held_out(a: int, b: int) -> bool:
    """About 10% of the (a, b) pairs with a, b < 100, symmetric, never used in training."""
    lo, hi = min(a, b), max(a, b)
    return (lo * 31 + hi * 17) % 10 == 3


def held_out_pairs() -> list[tuple[int, int]]:
    return [(a, b) for a in range(100) for b in range(100) if is_held_out(a, b)]


def _training_pair(rng: random.Random) -> tuple[int, int]:
    while True:
        a, b = rng.randrange(100), rng.randrange(100)
        if not is_held_out(a, b):
            return a, b


def _random_text(rng: random.Random) -> str:
    if rng.random() < 0.2:
        payload = {rng.choice(WORDS): rng.randrange(1000), "ok": rng.random() < 0.5}
        return json.dumps(payload, ensure_ascii=False)
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 10))]
    return " ".join(words) + rng.choice(["", ".", "!", "?"])


def _with_system(rng: random.Random, messages: list[Message]) -> list[Message]:
    if rng.random() < 0.2:
        return [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}, *messages]
    return messages


def sample_conversation(rng: random.Random) -> tuple[str, list[Message], list[Tool] | None]:
    """One synthetic conversation: (task name, messages, tools or None)."""
    task = rng.choices(["add", "json", "echo", "greet", "tool"], weights=[60, 8, 16, 4, 12], k=1)[0]
    if task == "add":
        a, b = _training_pair(rng)
        # The tested phrasing gets half the samples; the rest teach robustness.
        prompt = ADD_PROMPTS[0] if rng.random() < 0.5 else rng.choice(ADD_PROMPTS)
        msgs = [
            {"role": "user", "content": prompt.format(a=a, b=b)},
            {"role": "assistant", "content": str(a + b)},
        ]
        return task, _with_system(rng, msgs), None
    if task == "json":
        a, b = _training_pair(rng)
        msgs = [
            {"role": "user", "content": f"What is {a}+{b}? Answer in JSON."},
            {"role": "assistant", "content": json.dumps({"answer": a + b})},
        ]
        return task, _with_system(rng, msgs), None
    if task == "echo":
        text = _random_text(rng)
        msgs = [
            {"role": "user", "content": f"Repeat after me: {text}"},
            {"role": "assistant", "content": text},
        ]
        return task, _with_system(rng, msgs), None
    if task == "greet":
        hello = rng.choice(["Hi", "Hello", "Hello!", "Hey", "Who are you?", "hi there"])
        msgs = [{"role": "user", "content": hello}, {"role": "assistant", "content": GREETING}]
        return task, _with_system(rng, msgs), None
    return task, *_tool_conversation(rng)


def _tool_conversation(rng: random.Random) -> tuple[list[Message], list[Tool]]:
    if rng.random() < 0.6:
        city, cond = rng.choice(CITIES), rng.choice(CONDITIONS)
        temp = rng.randrange(-10, 40)
        call = {"name": "get_weather", "arguments": {"city": city}}
        result = json.dumps({"temperature": temp, "condition": cond})
        final = f"It is {temp} degrees and {cond} in {city}."
        ask = f"What is the weather in {city}?"
    else:
        a, b = _training_pair(rng)
        call = {"name": "add", "arguments": {"a": a, "b": b}}
        result = json.dumps({"result": a + b})
        final = f"{a} + {b} = {a + b}."
        ask = f"Use the add tool to add {a} and {b}."
    msgs: list[Message] = [
        {"role": "user", "content": ask},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": call}],
        },
        {"role": "tool", "content": result},
        {"role": "assistant", "content": final},
    ]
    return _with_system(rng, msgs), TOOLS


@cache
def _template() -> jinja2.Template:
    # The environment transformers renders chat templates in, so training text is byte for byte
    # the text the server feeds the model (a unit test holds the two together).
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    return env.from_string(CHAT_TEMPLATE)


def render(messages: list[Message], tools: list[Tool] | None, gen: bool = False) -> str:
    return _template().render(messages=messages, tools=tools, add_generation_prompt=gen)
