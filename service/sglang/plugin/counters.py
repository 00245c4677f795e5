"""Decode-path counters that leave SGLang's scheduler processes, for the service to export.

Each process counts into prometheus_client counters. SGLang runs Prometheus in multi-process mode
(`PROMETHEUS_MULTIPROC_DIR`, set before its schedulers spawn when metrics are on; the engine adapter may set it
itself), so the counts of every scheduler process land in that directory and `read_counters` sums them. Only the
first rank of each tensor-, context- or pipeline-parallel group counts (hooks.attach): its ranks run the same batch,
and would count it once each. Without the variable the counts stay in their process. Counts decided on the device
(flushes, accepted drafts) are drained every DRAIN_EVERY steps with a copy the host does not wait for, so counting
never stalls a step.
"""

from __future__ import annotations

import os
from functools import cache

import torch

DRAIN_EVERY = 32
NAMES = {  # counter name (Prometheus adds _total) -> what it counts
    "kvbuffer_sglang_decoded_tokens": "tokens decoded by SGLang's GDN layers, by path (buffered | recurrent)",
    "kvbuffer_sglang_flushes": "buffers folded into their request's state",
    "kvbuffer_sglang_speculative_drafted_tokens": "draft tokens verified",
    "kvbuffer_sglang_speculative_accepted_tokens": "draft tokens accepted",
}


@cache
def _counters() -> dict[str, object]:
    from prometheus_client import Counter

    return {name: Counter(name, doc, ["path"] if name.endswith("decoded_tokens") else [], registry=None)
            for name, doc in NAMES.items()}


def count_decoded(path: str, tokens: int) -> None:
    if tokens > 0:
        _counters()["kvbuffer_sglang_decoded_tokens"].labels(path=path).inc(tokens)


def count_drafted(tokens: int) -> None:
    if tokens > 0:
        _counters()["kvbuffer_sglang_speculative_drafted_tokens"].inc(tokens)


class DeviceTally:
    """Counts kept on the device ([flushes, accepted] int64), moved to the counters without a host wait."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values = values
        cuda = values.device.type == "cuda"
        self._host = torch.zeros(2, dtype=torch.int64, pin_memory=cuda)
        self._event = torch.cuda.Event() if cuda else None
        self._reported = [0, 0]
        self._steps = 0

    def step(self) -> None:
        """Called once per forward: every DRAIN_EVERY calls, report the copy made last time (if it has landed)
        and start a new one."""
        self._steps += 1
        if self._steps % DRAIN_EVERY == 0:
            self.drain()

    def drain(self, wait: bool = False) -> None:
        if self._event is not None and (wait or self._event.query()):
            if wait:
                self._event.synchronize()
            self._report()
        self._host.copy_(self.values, non_blocking=self._event is not None)
        if self._event is not None:
            self._event.record()
        else:
            self._report()

    def _report(self) -> None:
        counters = _counters()
        now = self._host.tolist()
        flushes, accepted = (n - r for n, r in zip(now, self._reported, strict=True))
        if flushes > 0:
            counters["kvbuffer_sglang_flushes"].inc(flushes)
        if accepted > 0:
            counters["kvbuffer_sglang_speculative_accepted_tokens"].inc(accepted)
        self._reported = now


def read_counters(path: str | None = None) -> dict[str, object]:
    """The counts of every process that wrote into the multi-process directory `path` (default
    PROMETHEUS_MULTIPROC_DIR): {"decoded_tokens": {path: n}, "flushes": n, "drafted_tokens": n,
    "accepted_tokens": n}."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    path = path or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not path:
        raise ValueError("read_counters needs the multi-process directory (PROMETHEUS_MULTIPROC_DIR is unset)")
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    out: dict[str, object] = {"decoded_tokens": {}, "flushes": 0.0, "drafted_tokens": 0.0, "accepted_tokens": 0.0}
    short = {"kvbuffer_sglang_flushes_total": "flushes",
             "kvbuffer_sglang_speculative_drafted_tokens_total": "drafted_tokens",
             "kvbuffer_sglang_speculative_accepted_tokens_total": "accepted_tokens"}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "kvbuffer_sglang_decoded_tokens_total":
                paths = out["decoded_tokens"]
                paths[sample.labels["path"]] = paths.get(sample.labels["path"], 0.0) + sample.value
            elif sample.name in short:
                out[short[sample.name]] += sample.value
    return out
