"""The prefill pacer against a simulated machine: a decode step takes D seconds, a prefill chunk of n
tokens a + b*n more, and mlx-lm's asynchronous decode shapes what each step's wall time shows."""

from __future__ import annotations

from mlx_flash.engine.pacing import RETIME_S, PrefillPacer

D, A, B = 0.080, 0.010, 0.002  # decode step; fixed and per-token cost of a prefill chunk


class Machine:
    """Wall time of each `BatchGenerator.next()`: a step with prefill waits for its own decode step;
    a decode step alone returns before its work is done, and the next step waits for it. `now` is
    the machine's clock, for the pacer."""

    def __init__(self) -> None:
        self.pending = 0.0
        self.decode = D
        self.now = 0.0

    def step(self, decoding: int, chunk_tokens: int) -> float:
        decode = self.decode if decoding else 0.0
        if chunk_tokens:
            wall, self.pending = self.pending + decode + A + B * chunk_tokens, 0.0
        else:
            wall, self.pending = self.pending, decode
        self.now += wall
        return wall


def run(
    pacer: PrefillPacer, steps: int, decoding: int = 4, prefilling: int = 1, machine: Machine | None = None
) -> list[int]:
    machine, chunks = machine or Machine(), []
    for _ in range(steps):
        n = pacer.chunk(decoding, prefilling)
        pacer.observe(decoding, n * prefilling, machine.step(decoding, n * prefilling))
        chunks.append(n)
    return chunks


def pacer(budget: float, machine: Machine, max_chunk: int = 512) -> PrefillPacer:
    return PrefillPacer(max_chunk, budget, clock=lambda: machine.now)


def test_full_chunks_when_nothing_decodes_or_the_budget_is_off() -> None:
    assert PrefillPacer(512, 1.0).chunk(decoding=0, prefilling=2) == 512
    assert PrefillPacer(512, 0.0).chunk(decoding=4, prefilling=1) == 512
    assert PrefillPacer(512, 1.0).chunk(decoding=4, prefilling=0) == 512


def test_times_a_decode_step_alone_first_then_converges_to_the_budget() -> None:
    machine = Machine()
    chunks = run(pacer(1.0, machine), 30, machine=machine)
    assert chunks[:2] == [0, 0]  # the second of two decode steps alone is the one that shows D
    want = int((1.0 * D - A) / B)  # a + b*n = budget * D
    assert abs(chunks[-1] - want) <= 1, chunks
    assert machine.now < RETIME_S and 0 not in chunks[2:]  # no pause again before a re-time is due


def test_a_decode_step_that_slows_is_re_timed_and_the_chunk_follows() -> None:
    """The streams' contexts grow while a long prompt is read: the budget follows their decode step."""
    machine = Machine()
    p = pacer(1.0, machine)
    run(p, 40, machine=machine)
    machine.decode = 2 * D
    start = machine.now
    chunks = run(p, int(8 * RETIME_S / (2 * 2 * D)), machine=machine)  # ~8 re-time intervals at the new pace
    assert abs(chunks[-1] - int((2 * D - A) / B)) <= 4, chunks[-10:]  # within 5%
    intervals = (machine.now - start) / RETIME_S
    # Two steps without prefill per re-time, one re-time per interval.
    assert 2 * (intervals - 2) <= chunks.count(0) <= 2 * (intervals + 1), (chunks.count(0), intervals)


def test_the_budget_scales_the_chunk_and_prompts_share_it() -> None:
    one = run(PrefillPacer(512, 1.0), 40)[-1]
    double = run(PrefillPacer(512, 2.0), 40)[-1]
    assert abs(double - int((2.0 * D - A) / B)) <= 1
    shared = run(PrefillPacer(512, 1.0), 40, prefilling=2)[-1]
    assert abs(shared - int((1.0 * D - A) / B / 2)) <= 1
    assert shared < one < double


def test_a_chunk_is_at_least_one_token_and_at_most_max_chunk() -> None:
    assert run(PrefillPacer(512, 0.05), 40)[-1] == 1  # a single token costs more than the budget
    assert run(PrefillPacer(8, 4.0), 40)[-1] == 8


def test_decode_steps_without_prefill_keep_the_timing_current() -> None:
    pacer, machine = PrefillPacer(512, 1.0), Machine()
    for _ in range(10):  # streams decode while no prompt is read
        pacer.observe(4, 0, machine.step(4, 0))
    assert pacer.chunk(decoding=4, prefilling=1) == 16  # timed already: a first guess, not a pause
