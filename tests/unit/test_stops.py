from mlx_flash.engine.stops import StopMatcher


def feed(stops: list[str], tokens: list[str]) -> tuple[str, bool, list[int]]:
    """Run tokens through a matcher; return (emitted text, stopped, ids of emitted items)."""
    m: StopMatcher[int] = StopMatcher(stops)
    out, ids = [], []
    for i, t in enumerate(tokens):
        pieces, stopped = m.push(t, i)
        out += [p.text for p in pieces]
        ids += [p.item for p in pieces]
        if stopped:
            return "".join(out), True, ids
    pieces = m.flush()
    return "".join(out + [p.text for p in pieces]), False, ids + [p.item for p in pieces]


def test_stop_string_split_across_tokens_is_removed() -> None:
    assert feed(["END"], ["Hello", " E", "N", "D", " more"]) == ("Hello ", True, [0, 1])


def test_text_that_only_looks_like_a_stop_prefix_is_released() -> None:
    text, stopped, ids = feed(["END"], ["a", "E", "N", "x", "b"])
    assert (text, stopped, ids) == ("aENxb", False, [0, 1, 2, 3, 4])


def test_held_back_text_is_flushed_at_the_end() -> None:
    assert feed(["STOP"], ["go", " ST"]) == ("go ST", False, [0, 1])


def test_earliest_of_several_stops_wins() -> None:
    assert feed(["cd", "b"], ["abcd"]) == ("a", True, [0])


def test_stop_at_the_very_start_emits_nothing() -> None:
    assert feed(["x"], ["x", "y"]) == ("", True, [])


def test_pieces_are_released_as_soon_as_they_cannot_start_a_stop() -> None:
    m: StopMatcher[int] = StopMatcher(["###"])
    assert [p.text for p in m.push("abc", 0)[0]] == ["abc"]
    assert m.push("#", 1)[0] == []
    assert [p.text for p in m.push("x", 2)[0]] == ["#", "x"]


def test_empty_piece_waits_for_the_text_that_completes_it() -> None:
    m: StopMatcher[int] = StopMatcher([])
    assert m.push("", 0) == ([], False)  # half of a UTF-8 character
    pieces, _ = m.push("é", 1)
    assert [(p.text, p.item) for p in pieces] == [("", 0), ("é", 1)]


def test_the_stop_string_that_matched_first_is_reported() -> None:
    m: StopMatcher[int] = StopMatcher(["world", "lo w"])
    assert m.matched is None
    for i, t in enumerate(["hel", "lo", " wor", "ld"]):
        _, stopped = m.push(t, i)
        if stopped:
            break
    assert stopped and m.matched == "lo w"
