"""Turning messages or text into prompt tokens with the model's own tokenizer and chat template."""

from __future__ import annotations

from typing import Any

import jinja2
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mlx_flash.api.errors import InvalidRequest


def encode_chat(
    tokenizer: TokenizerWrapper, messages: list[dict[str, Any]], template_kwargs: dict[str, Any]
) -> list[int]:
    if tokenizer.chat_template is None:
        raise InvalidRequest(
            "This model has no chat template; use /v1/completions with a prompt instead.",
            param="messages",
        )
    try:
        ids = tokenizer.apply_chat_template(  # type: ignore[no-untyped-call]
            messages, add_generation_prompt=True, tokenize=True, **template_kwargs
        )
    except (jinja2.TemplateError, TypeError, ValueError) as e:
        # The template's own raise_exception(), or what it or the tokenizer made of the client's messages
        # and template variables (the only input of this call).
        raise InvalidRequest(f"The chat template rejected the messages: {e}", param="messages") from None
    return [int(t) for t in ids]


def encode_text(tokenizer: TokenizerWrapper, prompt: str) -> list[int]:
    # The same rule as mlx_lm.generate, so raw completions match it token for token.
    bos = tokenizer.bos_token
    add_special = bos is None or not prompt.startswith(bos)
    return [int(t) for t in tokenizer.encode(prompt, add_special_tokens=add_special)]
