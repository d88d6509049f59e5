"""How many prompt tokens to prefill per engine step, so running streams keep flowing.

mlx-lm's `BatchGenerator` runs, in each step, one decode step for the running streams and then one
prefill chunk of `prefill_step_size` tokens for each prompt being read. A fixed chunk that is cheap on a
GPU can take seconds on a CPU and stall every stream for that long. The pacer sizes the chunk from
measured times instead: while streams decode, a step's prefill is kept near `budget` decode steps, so a
stream's inter-token time stays near (1 + budget) times its idle time; with nothing decoding, prompts
are read in full `max_chunk` chunks. A decode step slows as the streams' contexts grow, so while a long
prompt is read the pacer re-times one every `RETIME_S` seconds (two decode steps without prefill).
"""

from __future__ import annotations

import time
from collections.abc import Callable

# Weights of the newest measurement in the moving averages.
DECODE_WEIGHT = 0.5
TOKEN_WEIGHT = 0.5
# While prompts are read beside decoding streams, a decode step is re-timed this often.
RETIME_S = 5.0


class PrefillPacer:
    def __init__(self, max_chunk: int, budget: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_chunk = max_chunk
        self.budget = budget
        self._clock = clock
        self._decode_s: float | None = None  # one decode step, timed when no prompt was being read
        self._timed_at = 0.0  # when `_decode_s` was last measured
        self._token_s: float | None = None  # prefill seconds per prompt token
        self._alone = 0  # decode steps without prefill in a row

    def chunk(self, decoding: int, prefilling: int) -> int:
        """Prompt tokens per prompt for the next step; 0 means a decode step alone, to time it."""
        if self.budget <= 0 or not decoding or not prefilling:
            return self.max_chunk
        if self._decode_s is None or self._clock() - self._timed_at > RETIME_S:
            return 0
        if self._token_s is None:
            return min(self.max_chunk, 16)
        tokens = int(self.budget * self._decode_s / (self._token_s * prefilling))
        return max(1, min(self.max_chunk, tokens))

    def observe(self, decoding: int, prompt_tokens: int, seconds: float) -> None:
        """Record one step: `decoding` streams decoded and `prompt_tokens` were prefilled.

        mlx-lm evaluates a decode step asynchronously and a prefill chunk at once, after it. So a step
        that prefills takes its own decode step plus its chunk, while a decode step alone returns before
        its work is done and the next step waits for it: only the second of two decode steps alone
        times one, and the step after them carries an extra one. Pausing prefill to time a decode step
        would cost that extra step each time, so while prompts are read they are re-timed only every
        `RETIME_S` seconds.
        """
        if not prompt_tokens:
            if decoding and self._alone:
                if self._decode_s is None:
                    self._decode_s = seconds
                else:
                    self._decode_s += DECODE_WEIGHT * (seconds - self._decode_s)
                self._timed_at = self._clock()
            self._alone = self._alone + 1 if decoding else 0
            return
        after_alone, self._alone = self._alone, 0
        if after_alone:
            return
        spent = seconds - (self._decode_s or 0.0) if decoding else seconds
        per_token = max(spent, 1e-6) / prompt_tokens
        if self._token_s is None:
            self._token_s = per_token
        else:
            self._token_s += TOKEN_WEIGHT * (per_token - self._token_s)
