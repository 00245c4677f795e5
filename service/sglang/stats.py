"""KVBuffer statistics of engine sglang: the decode-path counts and speculation figures the service exports as
metrics and trace attributes (docs/METRICS.md), from SGLang's per-request outputs and the KVBuffer plugin.

Engine-wide, the KVBuffer plugin counts decoded tokens by path and flushes in SGLang's scheduler processes
(kvbuffer.service.sglang.plugin.counters, one rank per parallel group, summed through a Prometheus multi-process
directory); `PluginCounters` reads them. Per request the plugin keeps no counts: a request's tokens count under its
decode mode's path (kvbuffer: buffered; recurrent: SGLang's own recurrent decode), its flushes as zero. Speculation
comes from SGLang itself: a finished request's output carries its proposed and accepted drafts. Until the plugin's
counters have been read once (or without them), the engine-wide path counts are the requests' sums.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvbuffer.service.engine.api import EngineStats, RequestStats

PATHS = ("stateless", "buffered", "recurrent")
# Keys of a finished request's meta_info (SGLang 0.5.17, TokenizerManager._calculate_spec_decoding_metrics).
PROPOSED_DRAFTS = "spec_num_proposed_drafts"
ACCEPTED_DRAFTS = "spec_num_correct_drafts"


@dataclass(frozen=True)
class PathCounts:
    """Engine-wide decode-path counts since start."""

    tokens_by_path: Mapping[str, int]
    flushes: int = 0


class DecodePathCounters(Protocol):
    """The KVBuffer plugin's engine-wide counters as the adapter reads them (cheap, from any thread)."""

    def engine(self) -> PathCounts | None:
        """Counts since start, the tensor-parallel ranks of one request counted once; None: none yet."""
        ...


class PluginCounters:
    """The plugin's counters from the Prometheus multi-process directory SGLang's processes write them to."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def engine(self) -> PathCounts | None:
        from .plugin.counters import read_counters

        counts = read_counters(self.directory)
        by_path = {path: int(n) for path, n in counts["decoded_tokens"].items()}
        return PathCounts(by_path, int(counts["flushes"])) if by_path else None


def decode_path(decode_mode: str) -> str:
    return "buffered" if decode_mode == "kvbuffer" else "recurrent"


def request_stats(decode_mode: str, completion_tokens: int, meta: Mapping[str, Any]) -> RequestStats:
    by_path = dict.fromkeys(PATHS, 0)
    by_path[decode_path(decode_mode)] = completion_tokens
    return RequestStats(tokens_by_path=by_path, drafted_tokens=int(meta.get(PROPOSED_DRAFTS, 0)),
                        accepted_tokens=int(meta.get(ACCEPTED_DRAFTS, 0)))


@dataclass
class EngineCounters:
    """The adapter's engine-wide counts, kept on the event loop; `snapshot()` may run on any thread (it reads
    ints and a fixed-key dict only)."""

    plugin: DecodePathCounters | None
    decode_mode: str
    waiting: int = 0  # sent to SGLang, nothing streamed yet (queued, or in prefill)
    running: int = 0  # streaming
    slots_total: int = 0  # requests SGLang runs at once, each holding a state slot
    drafted: int = 0
    accepted: int = 0
    tokens_by_path: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))

    def started(self) -> None:
        self.waiting -= 1
        self.running += 1

    def left(self, started: bool) -> None:
        if started:
            self.running -= 1
        else:
            self.waiting -= 1

    def decoded(self, tokens: int) -> None:
        self.tokens_by_path[decode_path(self.decode_mode)] += tokens

    def finished(self, stats: RequestStats) -> None:
        self.drafted += stats.drafted_tokens
        self.accepted += stats.accepted_tokens

    def snapshot(self) -> EngineStats:
        counts = (self.plugin.engine() if self.plugin is not None else None) or PathCounts(self.tokens_by_path)
        return EngineStats(tokens_by_path={path: counts.tokens_by_path.get(path, 0) for path in PATHS},
                           flushes=counts.flushes, drafted_tokens=self.drafted, accepted_tokens=self.accepted,
                           running_requests=self.running, waiting_requests=self.waiting,
                           state_slots_used=self.running, state_slots_total=self.slots_total,
                           buffer_slots_used=0, buffer_slots_total=0, buffer_occupancy=0.0)
