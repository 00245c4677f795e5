"""What the service sees of an engine: requests in, streamed token deltas out, errors with a field name.

Every engine (the native one, later SGLang) implements `Engine`; the gRPC layer talks only to this.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "cancelled", "error"]
DecodePath = Literal["stateless", "buffered", "recurrent"]


log = logging.getLogger(__name__)


def notify_failure(callbacks: list[Callable[[], None]]) -> None:
    """Runs an engine's `on_failure` callbacks; one broken observer must not keep the failure from the others."""
    for callback in callbacks:
        try:
            callback()
        except Exception:
            log.exception("engine failure callback failed")


class InvalidRequestError(ValueError):
    """A request the engine refuses as given; `field` names the offending field (e.g. `sampling.top_p`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class OverloadedError(RuntimeError):
    """The engine is at capacity (waiting queue full, memory budget exhausted); the caller should retry later."""


class EngineFailedError(RuntimeError):
    """The engine has failed and serves no more requests; unlike OverloadedError, retrying here will not help."""


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters; a seed makes sampling repeatable."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False


@dataclass(frozen=True)
class GenerateRequest:
    """Exactly one of prompt (text) or prompt_token_ids is set."""

    request_id: str
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class RequestStats:
    """Per-request KVBuffer statistics: tokens by the decode path that produced them, speculation."""

    tokens_by_path: dict[str, int] = field(default_factory=lambda: {"stateless": 0, "buffered": 0,
                                                                     "recurrent": 0})
    flushes: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0


@dataclass
class GenerateChunk:
    """One streamed delta. The last chunk of a request has finish_reason set and carries the final stats."""

    token_ids: list[int]
    text: str
    logprobs: list[float] | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stats: RequestStats | None = None


@dataclass(frozen=True)
class EngineStats:
    """Engine-wide counters and gauges the service exports as metrics (cumulative counters since start).

    A snapshot: the engine publishes a new one after each step or cancel and never changes one it published.
    """

    tokens_by_path: dict[str, int]
    flushes: int
    drafted_tokens: int
    accepted_tokens: int
    running_requests: int
    waiting_requests: int
    state_slots_used: int
    state_slots_total: int
    buffer_slots_used: int
    buffer_slots_total: int
    buffer_occupancy: float  # mean buffered entries per request holding a buffer slot / buffer_size


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    vocab_size: int
    max_context_length: int
    num_layers: int
    num_linear_attention_layers: int
    device: str
    dtype: str


class Engine(Protocol):
    """The engine interface. `generate` yields chunks until one carries a finish_reason.

    Raises InvalidRequestError before allocating anything for a bad request, OverloadedError when it
    cannot admit it (running and waiting requests all taken, or shut down), EngineFailedError once it has
    failed. Closing the generator early (`aclose()`) cancels the request and frees its memory. `stats()` and
    `healthy` are cheap and may be read from any thread.
    """

    def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateChunk, None]:
        """Validates (and tokenizes) the request now, raising InvalidRequestError; the request is queued when
        iteration starts. Callable from any thread: the service calls it off its event loop, as a long prompt
        takes milliseconds to tokenize."""
        ...

    async def cancel(self, request_id: str) -> None:
        """Ends the request and frees its memory; its stream then yields a last chunk, finish_reason
        "cancelled", with usage and stats (shutdown() does the same for every request)."""
        ...

    def stats(self) -> EngineStats: ...

    @property
    def healthy(self) -> bool:
        """False once the engine has failed for good (a failure that persists: an accelerator error, steps
        failing again and again); a shut-down engine has not failed."""
        ...

    def on_failure(self, callback: Callable[[], None]) -> None:
        """Calls callback once when the engine fails, from whatever thread detects it, so that the service
        can report it at once (health checks) instead of polling; at once if it has already failed."""
        ...

    def model_info(self) -> ModelInfo: ...

    def config(self) -> dict[str, object]: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...
