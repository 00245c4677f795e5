"""A request as the engine tracks it: its tokens, where its memory is, and what has been streamed."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

from .api import FinishReason, RequestStats, SamplingParams


class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt, then generated tokens
    prompt_len: int
    sampling: SamplingParams
    seed: int | None  # of its sampling draws (sampler.row_seed); None for greedy
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose keys, values and state updates are in the caches
    # memory, owned by the MemoryManager
    req_slot: int = -1  # buffer + conv-state slot
    state_slot: int = -1  # checkpoint slot, -1 while stateless
    buf_len: int = 0  # entries in its buffer (the same in every GDN layer)
    block_table: list[int] = field(default_factory=list)
    drafts: list[int] = field(default_factory=list)  # speculative tokens proposed for the next step
    # an overlapped decode step (core.InFlight) chose this request's next token on the device, not yet read back:
    # it counts in num_tokens, and the step after it reads it from row pending_row of the runner's last_tokens
    pending: int = 0
    pending_row: int = -1
    stats: RequestStats = field(default_factory=RequestStats)
    finish_reason: FinishReason | None = None
    # incremental detokenization (output.text_delta); offsets count output tokens
    read_offset: int = 0  # output tokens whose text is settled (they decode to whole characters)
    prefix_offset: int = 0  # where the previous settled span starts: decoding context for the tokens after it
    held_text: str = ""  # settled text not streamed yet: it could be the start of a stop string
    sent_ahead: int = 0  # characters already streamed of the unsettled text past read_offset

    @property
    def num_tokens(self) -> int:
        """Tokens of the context, the one still on the device included."""
        return len(self.token_ids) + self.pending

    @property
    def num_output_tokens(self) -> int:
        """Output tokens on the host."""
        return len(self.token_ids) - self.prompt_len

    @property
    def next_position(self) -> int:
        """Output position of the next token sampled: what its draw is seeded from (sampler.row_seed)."""
        return self.num_tokens - self.prompt_len

    @property
    def in_decode(self) -> bool:
        """Only the last sampled token is not yet in the caches."""
        return self.num_computed == self.num_tokens - 1
