"""Structured output requests of every surface, read into one JSON schema and enforced by the engine's
grammar-constrained decoding (engine/constrain.py). A schema that cannot be enforced is a 400 before
anything is generated."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool

from mlx_flash.api.errors import InvalidRequest
from mlx_flash.engine.constrain import ANY_OBJECT, Masker, json_schema_grammar
from mlx_flash.engine.engine import Engine


def openai_format(fmt: Any, param: str, *, nested: bool) -> dict[str, Any] | None:
    """The schema an OpenAI `response_format` (chat: `nested`, the schema under `json_schema`) or
    Responses `text.format` (flat) asks for; None for plain text."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise InvalidRequest(f"{param} must be an object", param=param)
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if kind != "json_schema":
        raise InvalidRequest(
            f"{param}.type must be 'text', 'json_object' or 'json_schema'", param=f"{param}.type"
        )
    spec, where = (fmt.get("json_schema"), f"{param}.json_schema") if nested else (fmt, param)
    if not isinstance(spec, dict):
        raise InvalidRequest(f"{where} must be an object", param=where)
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise InvalidRequest(f"{where}.name is required", param=f"{where}.name")
    schema = spec.get("schema", ANY_OBJECT)
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{where}.schema must be a JSON schema object", param=f"{where}.schema")
    return schema


def ollama_format(fmt: Any) -> dict[str, Any] | None:
    """Ollama's `format`: `"json"` or a JSON schema object."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return ANY_OBJECT
    if not isinstance(fmt, dict):
        raise InvalidRequest('format must be "json" or a JSON schema object')
    return fmt


async def constraint(engine: Engine, schema: dict[str, Any] | None, param: str) -> Masker | None:
    """The processor that holds a request's output to `schema`, or a 400 saying why it cannot."""
    if schema is None:
        return None
    try:
        grammar = json_schema_grammar(schema)
        return await run_in_threadpool(engine.grammars.compile, grammar)
    except ValueError as e:
        raise InvalidRequest(f"{param}: this JSON schema cannot be enforced: {e}", param=param) from None
