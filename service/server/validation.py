"""Request validation: one function per kvbuffer.v1 message, each turning it into the engine's type or
raising InvalidRequestError naming the field (`sampling.top_p`), which the servicer maps to INVALID_ARGUMENT.

Checks here are the ones the protocol itself implies (presence, ranges, list sizes, vocabulary); the
engine still checks what only it knows (tokenized prompt length) with the same error type.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from kvbuffer.service.engine.api import GenerateRequest, InvalidRequestError, SamplingParams
from kvbuffer.v1 import kvbuffer_pb2 as pb

MAX_REQUEST_ID_CHARS = 128
MAX_STOP_TOKEN_IDS = 64
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
_DEFAULTS = SamplingParams()


@dataclass(frozen=True)
class Limits:
    """What the served model accepts (from Engine.model_info())."""

    vocab_size: int
    max_context_length: int


def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise InvalidRequestError(field, message)


def _check_token_ids(ids: Sequence[int], field: str, limits: Limits) -> None:
    for i, token in enumerate(ids):
        _check(token < limits.vocab_size, f"{field}[{i}]", f"token id {token} is outside the vocabulary "
               f"[0, {limits.vocab_size})")


def validate_token_ids(message: pb.TokenIds, field: str, limits: Limits) -> tuple[int, ...]:
    """A prompt given as token ids: non-empty, in the vocabulary, leaving room for one generated token."""
    ids = tuple(message.ids)
    _check(len(ids) > 0, f"{field}.ids", "must not be empty")
    _check(len(ids) < limits.max_context_length, f"{field}.ids", f"{len(ids)} tokens leave no room to generate "
           f"within max_context_length {limits.max_context_length}")
    _check_token_ids(ids, f"{field}.ids", limits)
    return ids


def validate_sampling_params(message: pb.SamplingParams, field: str, limits: Limits) -> SamplingParams:
    """Sampling settings; unset optional fields take the engine's defaults."""
    max_new_tokens = message.max_new_tokens if message.HasField("max_new_tokens") else _DEFAULTS.max_new_tokens
    _check(1 <= max_new_tokens <= limits.max_context_length, f"{field}.max_new_tokens",
           f"must be in [1, {limits.max_context_length}], got {max_new_tokens}")
    _check(math.isfinite(message.temperature) and message.temperature >= 0, f"{field}.temperature",
           f"must be a finite number >= 0, got {message.temperature}")
    top_p = message.top_p if message.HasField("top_p") else _DEFAULTS.top_p
    _check(0 < top_p <= 1, f"{field}.top_p", f"must be in (0, 1], got {top_p}")  # also false for NaN
    _check(len(message.stop_token_ids) <= MAX_STOP_TOKEN_IDS, f"{field}.stop_token_ids",
           f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(message.stop_token_ids)}")
    _check_token_ids(message.stop_token_ids, f"{field}.stop_token_ids", limits)
    _check(len(message.stop_strings) <= MAX_STOP_STRINGS, f"{field}.stop_strings",
           f"at most {MAX_STOP_STRINGS} strings, got {len(message.stop_strings)}")
    for i, stop in enumerate(message.stop_strings):
        _check(0 < len(stop) <= MAX_STOP_STRING_CHARS, f"{field}.stop_strings[{i}]",
               f"must have 1 to {MAX_STOP_STRING_CHARS} characters, got {len(stop)}")
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=message.temperature,
        top_p=top_p,
        top_k=message.top_k,
        seed=message.seed if message.HasField("seed") else None,
        stop_token_ids=tuple(message.stop_token_ids),
        stop_strings=tuple(message.stop_strings),
        ignore_eos=message.ignore_eos,
        logprobs=message.logprobs,
    )


def validate_generate_request(message: pb.GenerateRequest, limits: Limits) -> GenerateRequest:
    """A generation request. The engine request id is always fresh and unique: callers' ids may collide."""
    request_id = message.request_id
    _check(len(request_id) <= MAX_REQUEST_ID_CHARS and (request_id.isascii() and request_id.isprintable()),
           "request_id", f"must be at most {MAX_REQUEST_ID_CHARS} printable ASCII characters")
    prompt = message.WhichOneof("prompt")
    _check(prompt is not None, "prompt", "set either text or token_ids")
    if prompt == "text":
        _check(len(message.text) > 0, "text", "must not be empty")
    sampling = validate_sampling_params(message.sampling, "sampling", limits)
    return GenerateRequest(
        request_id=uuid.uuid4().hex,
        prompt=message.text if prompt == "text" else None,
        prompt_token_ids=validate_token_ids(message.token_ids, "token_ids", limits) if prompt == "token_ids"
        else None,
        sampling=sampling,
    )
