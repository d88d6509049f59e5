"""Expert cache policies and Belady's optimum on small traces with known answers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from mlx_flash.experts import trace
from mlx_flash.experts.policy import (
    LRU,
    POLICIES,
    belady_hit_rate,
    groups,
    hit_rate,
    make_policy,
    static_hit_rate,
)


def decode(passes: list[list[int]]) -> list[tuple[bool, list[int]]]:
    """Decode steps (not bulk prompt chunks)."""
    return [(False, p) for p in passes]


def test_lru_misses_every_time_on_a_cycle_one_larger_than_the_cache() -> None:
    passes = [[e] for e in [0, 1, 2] * 10]
    assert hit_rate(decode(passes), LRU(2)) == 0.0
    assert belady_hit_rate(passes, 2) > 0.4  # the optimum keeps one of the two it will need soonest


def test_lfu_keeps_the_hot_expert_that_lru_drops() -> None:
    passes = [[0], [1], [0], [2], [0], [3], [4], [0], [5], [6], [0]]
    assert hit_rate(decode(passes), make_policy("lfu", 2)) > hit_rate(decode(passes), make_policy("lru", 2))


def test_decay_follows_a_shift_that_lfu_does_not() -> None:
    old = [[0], [1]] * 30  # experts 0 and 1 were hot for a long time
    new = [[2], [3], [4]] * 30  # now 2, 3 and 4 are
    passes = old + new
    decay, lfu = make_policy("decay", 3), make_policy("lfu", 3)
    assert hit_rate(decode(passes), decay) > hit_rate(decode(passes), lfu)


def test_experts_needed_by_the_same_pass_are_never_evicted_for_each_other() -> None:
    for name in POLICIES:
        p = make_policy(name, 3)
        p.access([0, 1, 2])
        out = p.access([2, 3, 4])
        assert out.hits == 1 and out.misses == [3, 4] and sorted(out.evicted) == [0, 1]
        assert p.resident == {2, 3, 4}
        with pytest.raises(ValueError, match="room for 3"):
            p.access([5, 6, 7, 8])


@pytest.mark.parametrize("seed", range(5))
def test_no_policy_beats_belady(seed: int) -> None:
    rng = random.Random(seed)
    hot = [rng.randrange(16) for _ in range(4)]
    passes = [rng.sample(hot, 2) if rng.random() < 0.6 else rng.sample(range(16), 2) for _ in range(300)]
    for capacity in (2, 4, 8):
        best = belady_hit_rate(passes, capacity)
        for name in POLICIES:
            assert hit_rate(decode(passes), make_policy(name, capacity)) <= best + 1e-12
    assert belady_hit_rate(passes, 16) == pytest.approx(1 - 16 / 600, abs=0.03)  # only first uses miss


def test_a_pass_larger_than_the_pool_is_served_resident_experts_first() -> None:
    assert groups([5, 1, 2, 3, 1], 2, {3, 2}) == [[2, 3], [5, 1]]
    assert groups([5, 1], 2, set()) == [[5, 1]]
    # Belady serves the same groups: after a pass needing all four, the last group stays resident.
    assert belady_hit_rate([[0, 1, 2, 3], [2, 3]], 2) == pytest.approx(2 / 6)


def test_the_best_fixed_set_holds_the_most_used_experts() -> None:
    passes = [[0, 1], [0, 2], [0, 1, 1], [3]]  # uses: 0 three times, 1 twice (once per pass), 2 and 3 once
    assert static_hit_rate(passes, 2) == pytest.approx(5 / 7)
    assert static_hit_rate(passes, 4) == 1.0 and static_hit_rate([], 2) == 1.0


def test_a_prompt_chunk_does_not_flush_what_decoding_uses() -> None:
    for name in POLICIES:
        p = make_policy(name, 4)
        for _ in range(5):
            p.access([0, 1])  # decoding keeps using 0 and 1
        p.access([2, 3], bulk=True)  # a prompt chunk needs others: they must be loaded
        p.access([4, 5], bulk=True)  # ... and more: the chunk's own experts go first
        p.access([6, 7, 0], bulk=True)
        assert {0, 1} <= p.resident, name
        assert p.access([0, 1]).hits == 2, name


def test_shrinking_evicts_by_the_policy_and_keeps_the_rest() -> None:
    p = make_policy("lru", 4)
    for e in (0, 1, 2, 3, 0, 1):
        p.access([e])
    assert sorted(p.resize(2)) == [2, 3] and p.resident == {0, 1}
    assert p.resize(5) == [] and p.access([4]).evicted == []
    with pytest.raises(ValueError, match="at least one"):
        p.resize(0)


def test_unknown_policy_and_empty_cache_are_refused() -> None:
    with pytest.raises(ValueError, match="lru, lfu, decay"):
        make_policy("fifo", 2)
    with pytest.raises(ValueError, match="at least one"):
        LRU(0)


def test_replay_refuses_what_is_not_a_trace_and_skips_a_torn_last_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = json.dumps({"model": "m", "layer": 0, "bulk": False, "experts": [[0, 3]]})

    def replay(text: str, *flags: str) -> tuple[int, str]:
        path = tmp_path / "trace.jsonl"
        path.write_text(text)
        try:
            code = trace.main(["replay", str(path), *flags])
        except SystemExit as e:
            code = int(e.code or 0)
        out = capsys.readouterr()
        return code, out.out + out.err

    assert replay(f"{good}\n{good}\n" + good[:20], "--capacity", "2") == (
        0,
        replay(f"{good}\n{good}\n", "--capacity", "2")[1],
    )
    refused = {
        "": "holds no passes",
        f"{good}\n": "holds no passes of model 'other'",
        "[1, 2]\n": "trace.jsonl:1: not a trace record",
        f"{good}\nnot json\n{good}\n": "trace.jsonl:2: not JSON",
        '{"model": "m", "layer": 0, "experts": [1, 2]}\n': "trace.jsonl:1: a record needs",
        '{"model": "m", "layer": 0, "experts": [["a"]]}\n': "trace.jsonl:1: a record needs",
        '{"model": "m", "layer": 0}\n': "trace.jsonl:1: a record needs",
        '{"model": "m", "layer": 0, "num_experts": 3, "experts": [[0, 3]]}\n': "above every expert id",
    }
    for text, message in refused.items():
        flags = ("--model", "other") if "other" in message else ()
        code, said = replay(text, *flags)
        assert code == 2 and message in said and "Traceback" not in said, (text, said)
    for capacity in ("inf", "nan", "lots"):
        code, said = replay(f"{good}\n", "--capacity", capacity)
        assert code == 2 and "Traceback" not in said, said


def test_capacities_are_shares_of_the_experts_recorded_not_of_those_used(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    record = {"model": "m", "layer": 0, "bulk": False, "experts": [[0, 3]]}
    path.write_text(json.dumps(record) + "\n")
    assert trace.num_experts(trace.read(path)) == 4  # an old trace: as far as it shows
    path.write_text(json.dumps({**record, "num_experts": 16}) + "\n")
    per_layer = trace.read(path)
    assert trace.num_experts(per_layer) == 16
    assert trace.capacities("0.25,0.5", trace.num_experts(per_layer)) == [4, 8]
