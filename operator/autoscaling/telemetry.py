"""What the replicas report: one scrape of a replica's Prometheus `/metrics` (names in docs/METRICS.md) as a
`ReplicaSample`, rates between two samples as a `ReplicaLoad`, and a `FleetObservation` for the policy.

Samples carry cumulative counters; rates need two of them, so `FleetScraper` keeps each replica's previous
sample in memory. After an operator restart the first round has gauges only (queue, running, slots), which is
enough to scale up and, by the policy's rule, never enough to scale down. A counter lower than before means the
replica restarted: its increase is then counted from zero, as Prometheus' `rate()` does.
"""

from __future__ import annotations

import bisect
import math
import time
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

PATHS = ("stateless", "buffered", "recurrent")
SCRAPE_TIMEOUT_S = 2.0


class ScrapeError(RuntimeError):
    """A replica's /metrics could not be read or parsed; the message names the replica and why."""


@dataclass(frozen=True)
class ReplicaSample:
    """One scrape of one replica: counters (cumulative since the replica started) and gauges, at `at` (epoch s)."""

    at: float
    decoded_tokens: Mapping[str, float]  # kvbuffer_decoded_tokens_total by path
    output_tokens: float  # kvbuffer_tokens_total{type="output"}: tokens of finished requests
    requests_finished: float  # kvbuffer_request_duration_seconds_count, every method and status
    requests_ok: float  # ... {status="OK"}
    requests_refused: float  # ... {status="RESOURCE_EXHAUSTED"}
    tpot_sum: float  # kvbuffer_request_time_per_output_token_seconds_sum: one value per request of 2+ tokens
    tpot_count: float
    ttft_sum: float
    ttft_count: float
    ttft_buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count), ascending, +Inf last
    running: float
    waiting: float
    inflight: float
    state_slots_used: float
    state_slots_total: float
    buffer_slots_used: float
    buffer_slots_total: float

    @property
    def occupancy(self) -> float:
        """Share of the tighter slot pool in use (0..1): what bounds the replica's concurrency."""
        pools = [(used, total) for used, total in ((self.state_slots_used, self.state_slots_total),
                                                   (self.buffer_slots_used, self.buffer_slots_total)) if total > 0]
        return max((used / total for used, total in pools), default=0.0)

    @property
    def slot_capacity(self) -> float:
        """Requests the replica could run at once if each held the slots its running requests hold now; with none
        running, the smaller pool (one slot per request)."""
        if self.running > 0 and self.occupancy > 0:
            return self.running / self.occupancy
        return min((t for t in (self.state_slots_total, self.buffer_slots_total) if t > 0), default=0.0)


def parse_metrics(text: str, at: float) -> ReplicaSample:
    """A sample from the Prometheus text exposition of `kvbuffer serve`; metrics a replica has not recorded yet
    (histograms before the first request) read as zero. Raises ValueError when the text is not Prometheus'."""
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    if not any(name.startswith("kvbuffer_") for name, _ in values):
        raise ValueError("no kvbuffer_* metrics in the response")

    def total(name: str, **labels: str) -> float:
        """Sum over the series of `name` whose labels include `labels`."""
        return sum(v for (n, series), v in values.items()
                   if n == name and all((k, labels[k]) in series for k in labels))

    buckets = sorted((math.inf if dict(series)["le"] == "+Inf" else float(dict(series)["le"]), v)
                     for (n, series), v in values.items() if n == "kvbuffer_request_time_to_first_token_seconds_bucket")
    duration = "kvbuffer_request_duration_seconds"
    return ReplicaSample(
        at=at,
        decoded_tokens={path: total("kvbuffer_decoded_tokens_total", path=path) for path in PATHS},
        output_tokens=total("kvbuffer_tokens_total", type="output"),
        requests_finished=total(f"{duration}_count"),
        requests_ok=total(f"{duration}_count", status="OK"),
        requests_refused=total(f"{duration}_count", status="RESOURCE_EXHAUSTED"),
        tpot_sum=total("kvbuffer_request_time_per_output_token_seconds_sum"),
        tpot_count=total("kvbuffer_request_time_per_output_token_seconds_count"),
        ttft_sum=total("kvbuffer_request_time_to_first_token_seconds_sum"),
        ttft_count=total("kvbuffer_request_time_to_first_token_seconds_count"),
        ttft_buckets=tuple(buckets),
        running=total("kvbuffer_running_requests"),
        waiting=total("kvbuffer_queue_depth"),
        inflight=total("kvbuffer_inflight_requests"),
        state_slots_used=total("kvbuffer_state_slots_used"),
        state_slots_total=total("kvbuffer_state_slots_total"),
        buffer_slots_used=total("kvbuffer_buffer_slots_used"),
        buffer_slots_total=total("kvbuffer_buffer_slots_total"),
    )


def scrape(url: str, timeout_s: float = SCRAPE_TIMEOUT_S, clock: Callable[[], float] = time.time) -> ReplicaSample:
    """GET url (a replica's http://host:port/metrics) and parse it; ScrapeError names the url and the cause."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            text = response.read().decode()
        return parse_metrics(text, at=clock())
    except (OSError, ValueError) as exc:
        raise ScrapeError(f"{url}: {exc}") from None


def _increase(before: float, after: float) -> float:
    """Counter increase; a counter that went down was reset by a restart and counts from zero."""
    return after if after < before else after - before


def _quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """histogram_quantile over (upper bound, cumulative count) buckets, linear within a bucket; None if empty."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    i = bisect.bisect_left([count for _, count in buckets], rank)
    upper, count = buckets[i]
    lower, below = buckets[i - 1] if i > 0 else (0.0, 0.0)
    if math.isinf(upper):
        return lower
    return lower + (upper - lower) * ((rank - below) / (count - below) if count > below else 1.0)


@dataclass(frozen=True)
class Rates:
    """What happened on a replica between two samples, per second or per request over that interval."""

    interval_s: float
    decode_tokens_per_s: Mapping[str, float]  # by path
    arrivals_per_s: float  # requests received: finished (any status, refusals included) + growth of in-flight
    refused_per_s: float
    tokens_per_request: float | None  # output tokens per finished OK request; None without one
    service_time_s: float | None  # mean time a request decodes: time per output token x tokens per request
    ttft_mean_s: float | None
    ttft_p90_s: float | None

    @property
    def decode_per_s(self) -> float:
        return sum(self.decode_tokens_per_s.values())


def rates_between(before: ReplicaSample, after: ReplicaSample) -> Rates | None:
    """Rates over (before.at, after.at]; None unless time moved forward."""
    dt = after.at - before.at
    if dt <= 0:
        return None

    def inc(name: str) -> float:
        return _increase(getattr(before, name), getattr(after, name))

    ok, ttft_count, tpot_count = inc("requests_ok"), inc("ttft_count"), inc("tpot_count")
    per_request = inc("output_tokens") / ok if ok > 0 else None
    ttft_mean = inc("ttft_sum") / ttft_count if ttft_count > 0 else None
    restarted = after.ttft_count < before.ttft_count
    earlier = {} if restarted else dict(before.ttft_buckets)
    buckets = [(le, count - earlier.get(le, 0.0)) for le, count in after.ttft_buckets]
    # Decode time from the finished requests' own pace, not duration - TTFT: those two means cover different
    # requests (those that finished, those that started), which over- or underestimates while a queue changes.
    service = inc("tpot_sum") / tpot_count * per_request if tpot_count > 0 and per_request else None
    return Rates(
        interval_s=dt,
        decode_tokens_per_s={p: _increase(before.decoded_tokens.get(p, 0.0), after.decoded_tokens.get(p, 0.0)) / dt
                             for p in PATHS},
        arrivals_per_s=max(0.0, inc("requests_finished") + after.inflight - before.inflight) / dt,
        refused_per_s=inc("requests_refused") / dt,
        tokens_per_request=per_request,
        service_time_s=service,
        ttft_mean_s=ttft_mean,
        ttft_p90_s=_quantile(0.9, buckets),
    )


@dataclass(frozen=True)
class ReplicaLoad:
    """A replica's latest sample and the rates since the one before (None after a single sample)."""

    sample: ReplicaSample
    rates: Rates | None
    saturated_before: bool = False  # requests were waiting at the previous sample too

    @classmethod
    def between(cls, before: ReplicaSample | None, after: ReplicaSample) -> ReplicaLoad:
        if before is None:
            return cls(after, None)
        return cls(after, rates_between(before, after), before.waiting > 0)


@dataclass(frozen=True)
class FleetObservation:
    """Everything the policy sees at one decision.

    replicas: the count in effect (the Deployment's spec.replicas); ready: how many of them are Ready; the rest
    are starting (pending, pulling, loading the model) and count as capacity on the way. loads: by pod name, for
    the ready replicas scraped at least once (an old sample stays here and grows stale when scrapes fail).
    """

    replicas: int
    ready: int
    loads: Mapping[str, ReplicaLoad] = field(default_factory=dict)

    @property
    def starting(self) -> int:
        return max(0, self.replicas - self.ready)


class FleetScraper:
    """Scrapes every ready replica each round and keeps the previous sample of each, in memory, for rates.

    fetch is `scrape` unless a test passes another way of reading a replica.
    """

    def __init__(self, fetch: Callable[[str], ReplicaSample] = scrape, max_workers: int = 16) -> None:
        self._fetch = fetch
        self._max_workers = max_workers
        self._latest: dict[str, ReplicaLoad] = {}
        self.errors: dict[str, str] = {}  # pod name -> why its last scrape failed

    def observe(self, endpoints: Mapping[str, str], replicas: int) -> FleetObservation:
        """endpoints: pod name -> metrics URL of each Ready pod; replicas: the count in effect."""
        self._latest = {name: load for name, load in self._latest.items() if name in endpoints}
        self.errors = {}
        if endpoints:
            with ThreadPoolExecutor(min(self._max_workers, len(endpoints))) as pool:
                results = dict(zip(endpoints, pool.map(self._try_fetch, endpoints.values()), strict=True))
            for name, result in results.items():
                if isinstance(result, ScrapeError):
                    self.errors[name] = str(result)
                    continue
                previous = self._latest.get(name)
                self._latest[name] = ReplicaLoad.between(previous.sample if previous else None, result)
        return FleetObservation(replicas=replicas, ready=len(endpoints), loads=dict(self._latest))

    def _try_fetch(self, url: str) -> ReplicaSample | ScrapeError:
        try:
            return self._fetch(url)
        except ScrapeError as exc:
            return exc
