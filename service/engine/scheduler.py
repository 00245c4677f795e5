"""Continuous batching: decides which requests run this step and how many tokens each, within the limits.

Running requests go first, in arrival order (decodes, with their drafts, and unfinished chunked prefills),
then waiting requests are admitted while request slots, the token budget and memory allow. A running request
that cannot get memory preempts the most recently admitted ones (their memory freed, they wait at the front
and recompute later); memory is only ever handed out by the MemoryManager.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from .config import EngineConfig
from .kvstate import GdnStep
from .memory import MemoryManager
from .sequence import Sequence, Status

log = logging.getLogger(__name__)


@dataclass
class ScheduledSeq:
    seq: Sequence
    n: int  # tokens fed this step, drafts included
    drafts: list[int]
    step: GdnStep

    @property
    def samples(self) -> bool:
        """The step reaches the request's last token, so it yields logits to sample from."""
        return self.seq.num_computed + self.n - len(self.drafts) == self.seq.num_tokens


class Scheduler:
    def __init__(self, config: EngineConfig, memory: MemoryManager) -> None:
        self.config, self.memory = config, memory
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.config.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            remaining = seq.num_tokens - seq.num_computed
            drafts = seq.drafts[:budget - 1] if remaining == 1 else []
            n = min(remaining, budget) + len(drafts)
            while (step := self.memory.try_reserve(seq, n)) is None:
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if step is not None:
                batch.append(ScheduledSeq(seq, n, drafts, step))
                budget -= n
        while (self.waiting and not preempted and budget > 0
               and len(self.running) < self.config.max_running_requests):
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if (step := self.memory.try_reserve(seq, n)) is None:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSeq(seq, n, [], step))
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        log.info("preempting %s: out of memory; it will recompute", seq.request_id)
        self.preemptions += 1
        self.running.remove(seq)
        self.memory.free(seq)
        seq.status = Status.WAITING
        seq.drafts = []
        self.waiting.appendleft(seq)
