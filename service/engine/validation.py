"""Checks a GenerateRequest before anything is allocated; every error names the offending field (`prompt`,
`prompt_token_ids[3]`, `sampling.top_p`). These are the only range checks of a request: the gRPC service checks
just what its protocol implies (presence, list sizes) and renames these fields to its own. Both engines (native and
the SGLang adapter) check requests here, so a bad request gets the same error from either."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .api import GenerateRequest, InvalidRequestError

if TYPE_CHECKING:  # the model package imports torch; the gRPC service's checks import this module without it
    from ..model import Tokenizer


def validate_request(req: GenerateRequest, tokenizer: Tokenizer, max_context_length: int) -> list[int]:
    """Returns the prompt's token ids, or raises InvalidRequestError(field, message)."""
    if not req.request_id:
        raise InvalidRequestError("request_id", "must not be empty")
    if (req.prompt is None) == (req.prompt_token_ids is None):
        raise InvalidRequestError("prompt", "set exactly one of prompt and prompt_token_ids")
    field = "prompt" if req.prompt is not None else "prompt_token_ids"
    if req.prompt_token_ids is not None:  # its length first: a huge list is refused before any id is looked at
        check_prompt_length(len(req.prompt_token_ids), field, max_context_length)
    ids = tokenizer.encode(req.prompt) if req.prompt is not None else list(req.prompt_token_ids or ())
    if not ids:
        raise InvalidRequestError(field, "must not be empty")
    check_prompt_length(len(ids), field, max_context_length)
    _check_token_ids(ids, field, tokenizer, indexed=req.prompt is None)
    _validate_sampling(req, tokenizer, max_context_length)
    return ids


def check_prompt_length(length: int, field: str, max_context_length: int) -> None:
    """A prompt must leave room for at least one generated token within max_context_length."""
    if length >= max_context_length:
        raise InvalidRequestError(field, f"{length} tokens leave no room to generate within max_context_length "
                                         f"{max_context_length}")


def _check_token_ids(ids: Sequence[int], field: str, tokenizer: Tokenizer, *, indexed: bool = True) -> None:
    """Every id in the vocabulary; the error names `field[i]` for the offending id (just `field` if not indexed)."""
    for i, t in enumerate(ids):
        if not isinstance(t, int) or not 0 <= t < tokenizer.vocab_size:
            raise InvalidRequestError(f"{field}[{i}]" if indexed else field,
                                      f"token id {t} is outside the vocabulary [0, {tokenizer.vocab_size})")


def _validate_sampling(req: GenerateRequest, tokenizer: Tokenizer, max_context_length: int) -> None:
    s = req.sampling
    if not 1 <= s.max_new_tokens <= max_context_length:
        raise InvalidRequestError("sampling.max_new_tokens", f"must be in [1, {max_context_length}], "
                                                             f"got {s.max_new_tokens}")
    if not math.isfinite(s.temperature) or s.temperature < 0:
        raise InvalidRequestError("sampling.temperature", f"must be finite and >= 0, got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise InvalidRequestError("sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise InvalidRequestError("sampling.top_k", f"must be >= 0 (0 disables it), got {s.top_k}")
    if s.seed is not None and not 0 <= s.seed < 2**64:
        raise InvalidRequestError("sampling.seed", f"must be in 0..2**64-1 (a uint64), got {s.seed}")
    _check_token_ids(s.stop_token_ids, "sampling.stop_token_ids", tokenizer)
    for i, stop in enumerate(s.stop_strings):
        if not isinstance(stop, str) or not stop:
            raise InvalidRequestError(f"sampling.stop_strings[{i}]", "must be a non-empty string")
