from mlx_flash.engine.logprobs import display


def test_whole_characters_display_as_text() -> None:
    assert display("é".encode()) == "é"


def test_partial_characters_display_as_distinct_byte_strings() -> None:
    first, second = "é".encode()[:1], "ü".encode()[:1]
    assert display(first) == "bytes:\\xc3" and display(first) == display(second)
    assert display(b"\xe6\x9d") != display(b"\xe6\x97")
