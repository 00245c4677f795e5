"""Checks a GenerateRequest before anything is allocated; every error names the offending field."""

from __future__ import annotations

import math

from ..model import Tokenizer
from .api import GenerateRequest, InvalidRequestError
from .config import EngineConfig


def validate_request(req: GenerateRequest, tokenizer: Tokenizer, config: EngineConfig) -> list[int]:
    """Returns the prompt's token ids, or raises InvalidRequestError(field, message)."""
    if not req.request_id:
        raise InvalidRequestError("request_id", "must not be empty")
    if (req.prompt is None) == (req.prompt_token_ids is None):
        raise InvalidRequestError("prompt", "set exactly one of prompt and prompt_token_ids")
    field = "prompt" if req.prompt is not None else "prompt_token_ids"
    ids = tokenizer.encode(req.prompt) if req.prompt is not None else list(req.prompt_token_ids or ())
    if not ids:
        raise InvalidRequestError(field, "must not be empty")
    if any(not isinstance(t, int) or not 0 <= t < tokenizer.vocab_size for t in ids):
        raise InvalidRequestError(field, f"token ids must be in 0..{tokenizer.vocab_size - 1}")
    if len(ids) >= config.max_context_length:
        raise InvalidRequestError(field, f"{len(ids)} tokens leave no room to generate within "
                                         f"max_context_length {config.max_context_length}")
    _validate_sampling(req, tokenizer)
    return ids


def _validate_sampling(req: GenerateRequest, tokenizer: Tokenizer) -> None:
    s = req.sampling
    if s.max_new_tokens < 1:
        raise InvalidRequestError("sampling.max_new_tokens", f"must be >= 1, got {s.max_new_tokens}")
    if not math.isfinite(s.temperature) or s.temperature < 0:
        raise InvalidRequestError("sampling.temperature", f"must be finite and >= 0, got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise InvalidRequestError("sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise InvalidRequestError("sampling.top_k", f"must be >= 0 (0 disables it), got {s.top_k}")
    if s.seed is not None and not 0 <= s.seed < 2**63:
        raise InvalidRequestError("sampling.seed", f"must be in 0..2**63-1, got {s.seed}")
    if any(not 0 <= t < tokenizer.vocab_size for t in s.stop_token_ids):
        raise InvalidRequestError("sampling.stop_token_ids", f"must be in 0..{tokenizer.vocab_size - 1}")
    if any(not isinstance(x, str) or not x for x in s.stop_strings):
        raise InvalidRequestError("sampling.stop_strings", "must be non-empty strings")
