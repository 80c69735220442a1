"""How long a prompt may be: the one rule that `python -m core generate` and the explorer's Generate
tab share.

The prompt's tokens plus the new tokens asked for must fit in the model's context (its
max_position_embeddings, core.families.context_length). Beyond it a RoPE model runs on positions it
was never trained on (garbage, and slowly: every new token attends to the whole prompt) and GPT-2 /
OPT fail in their position table. Such a request is refused with the numbers and what would fit,
not truncated: a continuation of only the prompt's tail is not what was asked for, and a refusal
that says how much to cut leaves the choice of what to cut to the user.

Before any tokenizing, the prompt's length in characters is capped too, so that a multi-megabyte
paste is refused at once instead of holding the server while it is tokenized only to be refused.
"""
from __future__ import annotations

import torch

from .errors import DataError
from .families import context_length

# A prompt of more characters than this per token of context cannot fit: no tokenizer here comes
# near it on text (about four characters a token on English prose); the slack covers tokenizers
# that take a long run of spaces or repeated symbols as one token.
CHARS_PER_TOKEN_BOUND = 16
# The cap for any model, whatever its context says (and where the config states none).
MAX_PROMPT_CHARS = 1_000_000


class PromptTooLong(DataError):
    """A prompt (with the tokens asked for) that does not fit in the model's context."""


def max_prompt_chars(context: int | None) -> int:
    """The most characters a prompt may have before it is tokenized, for a model of `context` tokens."""
    if context is None:
        return MAX_PROMPT_CHARS
    return min(MAX_PROMPT_CHARS, CHARS_PER_TOKEN_BOUND * int(context))


def check_prompt_chars(n_chars: int, context: int | None) -> None:
    """Refuse a prompt far too long to fit, from its length alone (no tokenizer runs)."""
    limit = max_prompt_chars(context)
    if n_chars > limit:
        room = f"for a model with a {context:,}-token context" if context else "for any model"
        raise PromptTooLong(f"The prompt is {n_chars:,} characters, far more than fits: at most {limit:,} are "
                            f"read {room}. Shorten the prompt.")


def check_prompt_tokens(n_prompt: int, max_new_tokens: int, context: int | None, model: str = "the model") -> None:
    """Refuse `n_prompt` prompt tokens plus `max_new_tokens` new ones beyond `context` (None: the
    config states no context, nothing to check), saying what would fit."""
    if context is None or n_prompt + max_new_tokens <= context:
        return
    if max_new_tokens >= context:
        raise PromptTooLong(f"{max_new_tokens} new tokens asked for, but the context of {model} is {context} "
                            f"tokens, prompt included. Ask for at most {max(context - n_prompt, 1)} new tokens.")
    fewer_new = (f", or ask for at most {context - n_prompt} new tokens" if n_prompt < context else "")
    raise PromptTooLong(
        f"The prompt is {n_prompt:,} tokens and {max_new_tokens} new tokens are asked for: {n_prompt + max_new_tokens:,} "
        f"in all, beyond the {context:,}-token context of {model}. Shorten the prompt to at most "
        f"{context - max_new_tokens:,} tokens{fewer_new}.")


def prompt_ids(lm, text: str, max_new_tokens: int) -> torch.Tensor:
    """`text` (the prompt as it will be fed, a chat template already applied) tokenized as (1, n) ids
    on the model's device, after the checks above; PromptTooLong when it does not fit."""

    context = context_length(lm.model.config)
    check_prompt_chars(len(text), context)
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    check_prompt_tokens(ids.shape[1], int(max_new_tokens), context, getattr(lm, "model_id", None) or "the model")
    return ids.to(lm.device)
