"""Typed, range-checked access to request fields, with errors that name the parameter."""

from __future__ import annotations

from typing import Any

from mlx_flash.api.errors import InvalidRequest


class Fields:
    """Wraps a JSON object (or a nested one, with `prefix` for messages like `stream_options.x`)."""

    def __init__(self, body: dict[str, Any], prefix: str = "") -> None:
        self.body = body
        self.prefix = prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def _fail(self, key: str, what: str) -> InvalidRequest:
        return InvalidRequest(f"{self.name(key)} {what}", param=self.name(key))

    def present(self, key: str) -> bool:
        return self.body.get(key) is not None

    def string(self, key: str, *, required: bool = False) -> str | None:
        value = self.body.get(key)
        if value is None:
            if required:
                raise self._fail(key, "is required")
            return None
        if not isinstance(value, str):
            raise self._fail(key, "must be a string")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.body.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._fail(key, "must be a boolean")
        return value

    def integer(
        self, key: str, default: int | None, lo: int | None = None, hi: int | None = None
    ) -> int | None:
        value = self.body.get(key)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, "must be an integer")
        if lo is not None and value < lo:
            raise self._fail(
                key, f"must be at least {lo}" if hi is None else f"must be between {lo} and {hi}"
            )
        if hi is not None and value > hi:
            raise self._fail(key, f"must be at most {hi}" if lo is None else f"must be between {lo} and {hi}")
        return value

    def number(
        self,
        key: str,
        default: float | None,
        lo: float | None = None,
        hi: float | None = None,
        *,
        lo_open: bool = False,
    ) -> float | None:
        value = self.body.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(key, "must be a number")
        number = float(value)
        low_bad = lo is not None and (number <= lo if lo_open else number < lo)
        high_bad = hi is not None and number > hi
        if low_bad or high_bad:
            left = "(" if lo_open else "["
            if lo is not None and hi is not None:
                raise self._fail(key, f"must be in {left}{lo:g}, {hi:g}]")
            if lo is not None:
                raise self._fail(key, f"must be {'greater than' if lo_open else 'at least'} {lo:g}")
            raise self._fail(key, f"must be at most {hi:g}")
        return number

    def obj(self, key: str) -> dict[str, Any] | None:
        value = self.body.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self._fail(key, "must be an object")
        return value
