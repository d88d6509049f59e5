"""Log probabilities in the OpenAI shape: chosen token, raw bytes, and the top alternatives."""

from __future__ import annotations

from functools import cache
from typing import cast

import mlx.core as mx
from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper

from mlx_flash.engine.request import TokenLogprob, TopLogprob


@cache
def _gpt2_byte_decoder() -> dict[str, int]:
    # GPT-2's reversible byte→unicode map, inverted (byte-level BPE token strings → bytes).
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    extra = (b for b in range(256) if b not in printable)
    mapping = {chr(b): b for b in printable}
    mapping.update({chr(256 + n): b for n, b in enumerate(extra)})
    return mapping


class TokenBytes:
    """Raw bytes of single tokens, which may be half of a UTF-8 character."""

    def __init__(self, tokenizer: TokenizerWrapper) -> None:
        self._tokenizer = tokenizer
        # mlx-lm already decided whether the vocabulary is byte-level when it chose a detokenizer.
        self._byte_level = isinstance(tokenizer.detokenizer, BPEStreamingDetokenizer)
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        raw = self._cache.get(token_id)
        if raw is None:
            raw = self._lookup(token_id)
            self._cache[token_id] = raw
        return raw

    def _lookup(self, token_id: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if self._byte_level and isinstance(piece, str):
            table = _gpt2_byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        if isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x"):
            return bytes([int(piece[3:5], 16)])  # SentencePiece byte fallback
        return str(self._tokenizer.decode([token_id])).encode()


def display(raw: bytes) -> str:
    """A token's text, or OpenAI's `bytes:\\xe2\\x80` form when it is only part of a character
    (so distinct partial tokens never collide as keys of legacy `top_logprobs`)."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def token_logprob(
    logprobs: mx.array, token_id: int, text: str, top_n: int, token_bytes: TokenBytes
) -> TokenLogprob:
    """The chosen token's logprob and the `top_n` most likely alternatives (most likely first)."""
    top: tuple[TopLogprob, ...] = ()
    if top_n > 0:
        ids = mx.argpartition(-logprobs, kth=top_n - 1)[:top_n]
        values = logprobs[ids]
        order = mx.argsort(-values)
        ranked_ids = cast("list[int]", ids[order].tolist())
        ranked_values = cast("list[float]", values[order].tolist())
        top = tuple(
            TopLogprob(token=display(token_bytes(i)), logprob=v, bytes=list(token_bytes(i)))
            for i, v in zip(ranked_ids, ranked_values, strict=True)
        )
    return TokenLogprob(
        token=text,
        logprob=cast(float, logprobs[token_id].item()),
        bytes=list(token_bytes(token_id)),
        top=top,
    )
