import pytest

from mlx_flash.api.errors import InvalidRequest
from mlx_flash.api.fields import Fields


def error(fn: object) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as e:
        fn()  # type: ignore[operator]
    return e.value


def test_top_p_range_message_names_the_parameter() -> None:
    e = error(lambda: Fields({"top_p": 0}).number("top_p", 1.0, 0.0, 1.0, lo_open=True))
    assert (e.param, e.message) == ("top_p", "top_p must be in (0, 1]")


def test_booleans_are_not_integers() -> None:
    e = error(lambda: Fields({"max_tokens": True}).integer("max_tokens", None, lo=1))
    assert e.message == "max_tokens must be an integer"


def test_integral_floats_are_integers() -> None:
    assert Fields({"max_tokens": 5.0}).integer("max_tokens", None, lo=1) == 5


def test_nested_prefix_appears_in_param() -> None:
    e = error(lambda: Fields({"include_usage": "yes"}, "stream_options.").boolean("include_usage", False))
    assert e.param == "stream_options.include_usage"


def test_missing_optional_fields_take_defaults() -> None:
    f = Fields({"temperature": None})
    assert f.number("temperature", 1.0, 0.0, 2.0) == 1.0
    assert f.string("user") is None
