"""Protocol-level checks of kvbuffer.v1 messages, one function per message, each turning it into the engine's
type or raising InvalidRequestError naming the proto field (`sampling.stop_strings`), which the servicer maps to
INVALID_ARGUMENT.

Checks here are only the ones the protocol itself implies: which fields are set (the prompt oneof), the
request id, and the sizes of lists and strings, the token-id prompt's included (with the engine's own check, so
that a huge list is refused before its ids are converted). Every range check (vocabulary, context length of a
text prompt, sampling values) is the engine's (service/engine/validation.py); the servicer renames the fields in
its errors to the proto's.
"""

from __future__ import annotations

import uuid

from kvbuffer.service.engine.api import GenerateRequest, InvalidRequestError, SamplingParams
from kvbuffer.service.engine.validation import check_prompt_length
from kvbuffer.v1 import kvbuffer_pb2 as pb

MAX_REQUEST_ID_CHARS = 128
MAX_STOP_TOKEN_IDS = 64
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
_DEFAULTS = SamplingParams()


def _check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise InvalidRequestError(field, message)


def validate_sampling_params(message: pb.SamplingParams, field: str) -> SamplingParams:
    """Sampling settings; unset optional fields take the engine's defaults."""
    _check(len(message.stop_token_ids) <= MAX_STOP_TOKEN_IDS, f"{field}.stop_token_ids",
           f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(message.stop_token_ids)}")
    _check(len(message.stop_strings) <= MAX_STOP_STRINGS, f"{field}.stop_strings",
           f"at most {MAX_STOP_STRINGS} strings, got {len(message.stop_strings)}")
    for i, stop in enumerate(message.stop_strings):
        _check(len(stop) <= MAX_STOP_STRING_CHARS, f"{field}.stop_strings[{i}]",
               f"at most {MAX_STOP_STRING_CHARS} characters, got {len(stop)}")
    return SamplingParams(
        max_new_tokens=message.max_new_tokens if message.HasField("max_new_tokens") else _DEFAULTS.max_new_tokens,
        temperature=message.temperature,
        top_p=message.top_p if message.HasField("top_p") else _DEFAULTS.top_p,
        top_k=message.top_k,
        seed=message.seed if message.HasField("seed") else None,
        stop_token_ids=tuple(message.stop_token_ids),
        stop_strings=tuple(message.stop_strings),
        ignore_eos=message.ignore_eos,
        logprobs=message.logprobs,
    )


def validate_generate_request(message: pb.GenerateRequest, max_context_length: int) -> GenerateRequest:
    """A generation request. The engine request id is always fresh and unique: callers' ids may collide."""
    request_id = message.request_id
    _check(len(request_id) <= MAX_REQUEST_ID_CHARS and (request_id.isascii() and request_id.isprintable()),
           "request_id", f"must be at most {MAX_REQUEST_ID_CHARS} printable ASCII characters")
    prompt = message.WhichOneof("prompt")
    _check(prompt is not None, "prompt", "set either text or token_ids")
    if prompt == "token_ids":
        check_prompt_length(len(message.token_ids.ids), "token_ids.ids", max_context_length)
    return GenerateRequest(
        request_id=uuid.uuid4().hex,
        prompt=message.text if prompt == "text" else None,
        prompt_token_ids=tuple(message.token_ids.ids) if prompt == "token_ids" else None,
        sampling=validate_sampling_params(message.sampling, "sampling"),
    )
