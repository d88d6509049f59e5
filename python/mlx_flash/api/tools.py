"""Function tools of every surface, read into one `ToolSpec`: OpenAI-shaped tools for the chat template
and the engine's tool-call detector, and the tool choice. A forced choice (`required`, or one named
tool) is enforced by grammar-constrained decoding (engine/constrain.py), not asked for politely."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from starlette.concurrency import run_in_threadpool

from mlx_flash.api.errors import InvalidRequest
from mlx_flash.engine.constrain import Masker
from mlx_flash.engine.engine import Engine
from mlx_flash.engine.request import Tools

NAME = re.compile(r"^[a-zA-Z0-9_.:-]{1,128}$")
# Where in the tool-call grammar a compile error is ("at 2(7): ..."), before its reason.
_GRAMMAR_PLACE = re.compile(r"^at \d+\(\d+\): (failed to compile JSON schema: )?")
Choice = Literal["auto", "none", "required", "named"]


@dataclass(frozen=True)
class ToolSpec:
    tools: tuple[
        dict[str, Any], ...
    ] = ()  # {"type": "function", "function": {name, description, parameters}}
    choice: Choice = "auto"
    name: str | None = None  # the tool a "named" choice forces
    parallel: bool = True

    @property
    def active(self) -> bool:
        """Whether the model is shown the tools and its calls are parsed (`tool_choice: none`: neither)."""
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.active and self.choice in ("required", "named")

    def template_kwargs(self) -> dict[str, Any]:
        return {"tools": list(self.tools)} if self.active else {}

    def request_tools(self) -> Tools:
        """What the engine needs: the tools whose calls it parses, and whether it stops after one call."""
        return Tools(self.tools, self.parallel) if self.active else Tools()


NO_TOOLS = ToolSpec()


def _function(name: Any, description: Any, parameters: Any, where: str, params_key: str) -> dict[str, Any]:
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidRequest(
            f"{where}.name must be a string of 1 to 128 letters, digits, '_', '-', '.' or ':'",
            param=f"{where}.name",
        )
    if description is not None and not isinstance(description, str):
        raise InvalidRequest(f"{where}.description must be a string", param=f"{where}.description")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise InvalidRequest(
            f"{where}.{params_key} must be a JSON schema object", param=f"{where}.{params_key}"
        )
    # OpenAI's order (name, description, parameters): templates render the tools as JSON, and the
    # model reads them the way they were written in its training.
    function: dict[str, Any] = {"name": name}
    if description:
        function["description"] = description
    function["parameters"] = parameters
    return {"type": "function", "function": function}


def _tool_list(value: Any, param: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequest(f"{param} must be an array", param=param)
    return value


def _unique(tools: list[dict[str, Any]], param: str) -> tuple[dict[str, Any], ...]:
    names = [t["function"]["name"] for t in tools]
    for name in names:
        if names.count(name) > 1:
            raise InvalidRequest(f"{param}: the tool name {name!r} is used more than once", param=param)
    return tuple(tools)


def _named(tools: tuple[dict[str, Any], ...], name: Any, param: str) -> str:
    if not isinstance(name, str):
        raise InvalidRequest(f"{param} must be a string", param=param)
    if name not in {t["function"]["name"] for t in tools}:
        raise InvalidRequest(f"{param}: no tool named {name!r} among the tools", param=param)
    return name


def _check_choice(spec: ToolSpec, param: str, said: str | None = None) -> ToolSpec:
    """`said`: the choice as the client's API names it, when that is not ours."""
    if spec.choice in ("required", "named") and not spec.tools:
        raise InvalidRequest(f"{param} {said or repr(spec.choice)} needs tools", param=param)
    return spec


def openai_tools(body: dict[str, Any], *, flat: bool) -> ToolSpec:
    """Chat completions (`flat=False`: `{"type": "function", "function": {...}}`) or Responses (`flat`:
    `{"type": "function", "name", "parameters", ...}`) tools and `tool_choice`."""
    tools = []
    for i, tool in enumerate(_tool_list(body.get("tools"), "tools")):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        if tool.get("type") != "function":
            raise InvalidRequest(
                f"{where}.type: only function tools are supported (got {tool.get('type')!r})", f"{where}.type"
            )
        fn = tool if flat else tool.get("function")
        at = where if flat else f"{where}.function"
        if not isinstance(fn, dict):
            raise InvalidRequest(f"{at} must be an object", param=at)
        if fn.get("strict") is not None and not isinstance(fn.get("strict"), bool):
            raise InvalidRequest(f"{at}.strict must be a boolean", param=f"{at}.strict")
        tools.append(_function(fn.get("name"), fn.get("description"), fn.get("parameters"), at, "parameters"))
    spec_tools = _unique(tools, "tools")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise InvalidRequest("parallel_tool_calls must be a boolean", param="parallel_tool_calls")
    choice = body.get("tool_choice")
    if choice is None:
        return ToolSpec(spec_tools, "auto", None, parallel)
    if choice in ("auto", "none", "required"):
        return _check_choice(ToolSpec(spec_tools, choice, None, parallel), "tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice if flat else choice.get("function")
        at = "tool_choice.name" if flat else "tool_choice.function.name"
        name = _named(spec_tools, fn.get("name") if isinstance(fn, dict) else None, at)
        return ToolSpec(spec_tools, "named", name, parallel)
    raise InvalidRequest(
        "tool_choice must be 'none', 'auto', 'required' or a function tool choice", param="tool_choice"
    )


def anthropic_tools(body: dict[str, Any]) -> ToolSpec:
    """Anthropic `tools` (`{name, description, input_schema}`) and `tool_choice`
    (`{"type": "auto" | "any" | "tool" | "none", "name", "disable_parallel_tool_use"}`)."""
    tools = []
    for i, tool in enumerate(_tool_list(body.get("tools"), "tools")):
        where = f"tools.{i}"
        if not isinstance(tool, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        if tool.get("type") not in (None, "custom"):
            raise InvalidRequest(
                f"{where}.type: server tools ({tool.get('type')!r}) are not supported; define a custom tool",
                param=f"{where}.type",
            )
        if not isinstance(tool.get("input_schema"), dict):
            raise InvalidRequest(
                f"{where}.input_schema must be a JSON schema object", f"{where}.input_schema"
            )
        schema = tool["input_schema"]
        tools.append(_function(tool.get("name"), tool.get("description"), schema, where, "input_schema"))
    spec_tools = _unique(tools, "tools")
    choice = body.get("tool_choice")
    if choice is None:
        return ToolSpec(spec_tools)
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise InvalidRequest("tool_choice.type must be 'auto', 'any', 'tool' or 'none'", "tool_choice.type")
    disable = choice.get("disable_parallel_tool_use", False)
    if not isinstance(disable, bool):
        raise InvalidRequest("tool_choice.disable_parallel_tool_use must be a boolean", "tool_choice")
    kind = choice["type"]
    if kind == "tool":
        name = _named(spec_tools, choice.get("name"), "tool_choice.name")
        return ToolSpec(spec_tools, "named", name, not disable)
    mapped: Choice = "required" if kind == "any" else kind
    return _check_choice(ToolSpec(spec_tools, mapped, None, not disable), "tool_choice", repr(kind))


def ollama_tools(body: dict[str, Any]) -> ToolSpec:
    """Ollama `tools` (OpenAI's chat shape); Ollama has no tool choice."""
    return openai_tools({"tools": body.get("tools")}, flat=False)


async def prepare(engine: Engine, spec: ToolSpec, constraint: Masker | None) -> Masker | None:
    """Check the model can call tools, and return the request's constraint: the grammar of its tool
    calls when the choice forces one, else `constraint` (the output format's) unchanged."""
    if not spec.active:
        return constraint
    tokenizer = engine.loaded.tokenizer
    if not tokenizer.has_tool_calling:
        raise InvalidRequest(
            f"tools: the model '{engine.loaded.id}' has no tool-call format this server knows", param="tools"
        )
    if not spec.forced:
        return constraint
    if constraint is not None:
        raise InvalidRequest(
            "a forced tool_choice cannot be combined with a structured output format", "tool_choice"
        )
    start, end = tokenizer.tool_call_start, tokenizer.tool_call_end
    try:
        grammar = engine.grammars.tool_calls(list(spec.tools), start, end, spec.name, spec.parallel)
        return await run_in_threadpool(engine.grammars.compile, grammar)
    except ValueError as e:
        # The compiler points into the grammar built here, and prints it: the client gets the reason only.
        reason = _GRAMMAR_PLACE.sub("", str(e).splitlines()[0] if str(e) else "")
        raise InvalidRequest(
            f"tools: these tool parameters cannot be enforced: {reason}", param="tools"
        ) from None
