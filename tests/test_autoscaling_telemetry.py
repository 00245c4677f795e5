"""The autoscaler's view of a replica: the service's own Prometheus exposition (its real Telemetry, fed random
engine stats and requests) parsed into samples, rates between samples (counter resets included), the TTFT
quantile from histogram buckets, and the fleet scraper over real HTTP."""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from kvbuffer.operator.autoscaling.telemetry import (
    PATHS,
    FleetScraper,
    ReplicaSample,
    ScrapeError,
    parse_metrics,
    rates_between,
    scrape,
)
from kvbuffer.service.engine.api import EngineStats
from kvbuffer.service.server.telemetry import Telemetry
from prometheus_client import generate_latest

TTFT_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)


class ServedReplica:
    """The service's Telemetry with random engine stats and requests: what `kvbuffer serve` would expose."""

    def __init__(self, rng: random.Random) -> None:
        self.stats = EngineStats(
            tokens_by_path={p: rng.randint(1, 10**6) for p in PATHS}, flushes=rng.randint(1, 999),
            drafted_tokens=rng.randint(1, 999), accepted_tokens=rng.randint(1, 99),
            running_requests=rng.randint(1, 64), waiting_requests=rng.randint(1, 64),
            state_slots_used=rng.randint(1, 40), state_slots_total=rng.randint(41, 99),
            buffer_slots_used=rng.randint(1, 40), buffer_slots_total=rng.randint(41, 99),
            buffer_occupancy=rng.random())
        self.inflight = rng.randint(1, 128)
        self.telemetry = Telemetry("embedded:tiny-qwen3-next")
        self.telemetry.observe(lambda: self.stats, lambda: self.inflight)
        self.ttfts = [rng.uniform(0.001, 30.0) for _ in range(rng.randint(20, 60))]
        for ttft in self.ttfts:
            self.telemetry.ttft.record(ttft)
        self.ok_durations = [rng.uniform(0.1, 60.0) for _ in range(rng.randint(5, 30))]
        for d in self.ok_durations:
            self.telemetry.duration.record(d, {"method": rng.choice(["Generate", "GenerateUnary"]), "status": "OK"})
        self.tpots = [rng.uniform(0.001, 0.2) for _ in range(len(self.ok_durations) - 1)]
        for tpot in self.tpots:
            self.telemetry.tpot.record(tpot)
        self.refused = rng.randint(1, 20)
        for _ in range(self.refused):
            self.telemetry.duration.record(0.001, {"method": "Generate", "status": "RESOURCE_EXHAUSTED"})
        self.output_tokens = rng.randint(1, 10**5)
        self.telemetry.tokens.add(self.output_tokens, {"type": "output"})
        self.telemetry.tokens.add(rng.randint(1, 10**5), {"type": "input"})

    def text(self) -> str:
        return generate_latest(self.telemetry.prometheus_registry).decode()


@pytest.fixture
def rng() -> random.Random:
    return random.Random()


def test_the_service_exposition_parses_into_the_values_it_was_fed(rng: random.Random) -> None:
    replica = ServedReplica(rng)
    try:
        sample = parse_metrics(replica.text(), at=123.0)
    finally:
        replica.telemetry.shutdown()
    s = replica.stats
    assert sample.at == 123.0
    assert sample.decoded_tokens == pytest.approx(s.tokens_by_path)
    assert (sample.running, sample.waiting, sample.inflight) == (s.running_requests, s.waiting_requests,
                                                                 replica.inflight)
    assert (sample.state_slots_used, sample.state_slots_total, sample.buffer_slots_used, sample.buffer_slots_total) \
        == (s.state_slots_used, s.state_slots_total, s.buffer_slots_used, s.buffer_slots_total)
    assert sample.requests_ok == len(replica.ok_durations)
    assert sample.requests_refused == replica.refused
    assert sample.requests_finished == len(replica.ok_durations) + replica.refused
    assert (sample.tpot_count, sample.tpot_sum) == (len(replica.tpots), pytest.approx(sum(replica.tpots)))
    assert sample.output_tokens == replica.output_tokens
    assert (sample.ttft_count, sample.ttft_sum) == (len(replica.ttfts), pytest.approx(sum(replica.ttfts)))
    expected = [sum(t <= le for t in replica.ttfts) for le in (*TTFT_BOUNDS, math.inf)]
    assert [count for _, count in sample.ttft_buckets] == expected
    assert sample.occupancy == pytest.approx(max(s.state_slots_used / s.state_slots_total,
                                                 s.buffer_slots_used / s.buffer_slots_total))


def test_a_fresh_replica_without_requests_reads_as_zero_and_text_without_kvbuffer_metrics_is_refused() -> None:
    telemetry = Telemetry("m")
    zero = EngineStats(dict.fromkeys(PATHS, 0), 0, 0, 0, 0, 0, 0, 4, 0, 4, 0.0)
    telemetry.observe(lambda: zero, lambda: 0)
    try:
        sample = parse_metrics(generate_latest(telemetry.prometheus_registry).decode(), at=1.0)
    finally:
        telemetry.shutdown()
    assert (sample.requests_finished, sample.ttft_count, sample.ttft_buckets) == (0, 0, ())
    assert sample.slot_capacity == 4  # nothing running: one slot a request
    with pytest.raises(ValueError, match="no kvbuffer"):
        parse_metrics("# HELP up x\n# TYPE up gauge\nup 1\n", at=1.0)


def _sample(rng: random.Random, at: float, **values: float) -> ReplicaSample:
    base = {name: rng.uniform(1, 1000) for name in (
        "output_tokens", "requests_finished", "requests_ok", "requests_refused", "tpot_sum", "tpot_count",
        "ttft_sum", "ttft_count", "running", "waiting", "inflight", "state_slots_used", "state_slots_total",
        "buffer_slots_used", "buffer_slots_total")}
    decoded = {p: values.pop(p, rng.uniform(1, 10**5)) for p in PATHS}
    return ReplicaSample(at=at, decoded_tokens=decoded, ttft_buckets=values.pop("buckets", ()), **{**base, **values})


def test_rates_are_counter_increases_over_the_interval(rng: random.Random) -> None:
    a = _sample(rng, at=100.0)
    dt = rng.uniform(5, 30)
    grow = {name: getattr(a, name) + rng.uniform(1, 500) for name in (
        "output_tokens", "requests_ok", "requests_refused", "tpot_sum", "tpot_count", "ttft_sum", "ttft_count")}
    finished = a.requests_finished + (grow["requests_ok"] - a.requests_ok) + (grow["requests_refused"]
                                                                              - a.requests_refused)
    decoded = {p: a.decoded_tokens[p] + rng.uniform(1, 10**4) for p in PATHS}
    b = _sample(rng, at=100.0 + dt, requests_finished=finished, inflight=a.inflight + rng.uniform(-5, 50), **grow,
                **decoded)
    r = rates_between(a, b)
    assert r is not None and r.interval_s == pytest.approx(dt)
    assert r.decode_tokens_per_s == pytest.approx({p: (decoded[p] - a.decoded_tokens[p]) / dt for p in PATHS})
    ok = grow["requests_ok"] - a.requests_ok
    assert r.arrivals_per_s == pytest.approx((finished - a.requests_finished + b.inflight - a.inflight) / dt)
    assert r.refused_per_s == pytest.approx((grow["requests_refused"] - a.requests_refused) / dt)
    assert r.tokens_per_request == pytest.approx((grow["output_tokens"] - a.output_tokens) / ok)
    ttft = (grow["ttft_sum"] - a.ttft_sum) / (grow["ttft_count"] - a.ttft_count)
    assert r.ttft_mean_s == pytest.approx(ttft)
    tpot = (grow["tpot_sum"] - a.tpot_sum) / (grow["tpot_count"] - a.tpot_count)
    assert r.service_time_s == pytest.approx(tpot * r.tokens_per_request)
    assert rates_between(b, a) is None  # time must move forward


def test_a_counter_that_went_down_restarted_and_counts_from_zero(rng: random.Random) -> None:
    a = _sample(rng, at=0.0, stateless=5000.0, buffered=7000.0, recurrent=100.0)
    b = _sample(rng, at=10.0, stateless=300.0, buffered=7300.0, recurrent=100.0)  # stateless restarted at 0
    r = rates_between(a, b)
    assert r is not None
    assert r.decode_tokens_per_s == pytest.approx({"stateless": 30.0, "buffered": 30.0, "recurrent": 0.0})


def test_ttft_p90_lies_in_the_bucket_of_the_true_p90(rng: random.Random) -> None:
    def buckets(values: list[float]) -> tuple[tuple[float, float], ...]:
        return tuple((le, float(sum(v <= le for v in values))) for le in (*TTFT_BOUNDS, math.inf))

    before = [rng.uniform(0.001, 3.0) for _ in range(rng.randint(10, 50))]
    new = [rng.lognormvariate(-1.0, 1.0) for _ in range(rng.randint(50, 200))]
    a = _sample(rng, at=0.0, buckets=buckets(before), ttft_count=len(before))
    b = _sample(rng, at=15.0, buckets=buckets(before + new), ttft_count=len(before) + len(new))
    r = rates_between(a, b)
    assert r is not None and r.ttft_p90_s is not None
    true_p90 = sorted(new)[math.ceil(0.9 * len(new)) - 1]
    edges = (0.0, *TTFT_BOUNDS, math.inf)
    bucket = next(i for i in range(len(edges) - 1) if edges[i] < true_p90 <= edges[i + 1])
    assert edges[bucket] <= r.ttft_p90_s <= edges[bucket + 1]


class _MetricsHandler(BaseHTTPRequestHandler):
    texts: ClassVar[dict[str, str]] = {}

    def do_GET(self) -> None:
        text = self.texts.get(self.path)
        if text is None:
            self.send_error(404)
            return
        body = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[str, dict[str, str]]]:
    """A real HTTP server on loopback serving the texts put into its dict, by path."""
    texts: dict[str, str] = {}
    handler = type("Handler", (_MetricsHandler,), {"texts": texts})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", texts
    server.shutdown()
    server.server_close()


def test_scrape_errors_name_the_url_and_the_cause(http_server: tuple[str, dict[str, str]]) -> None:
    base, texts = http_server
    texts["/garbage"] = "this is not { prometheus"
    with pytest.raises(ScrapeError, match=f"{base}/missing: .*404"):
        scrape(f"{base}/missing")
    with pytest.raises(ScrapeError, match=f"{base}/garbage: "):
        scrape(f"{base}/garbage")
    with pytest.raises(ScrapeError, match=r"127\.0\.0\.1:9/metrics: .*refused"):
        scrape("http://127.0.0.1:9/metrics", timeout_s=1.0)


def test_the_fleet_scraper_keeps_previous_samples_for_rates_and_stale_ones_when_a_scrape_fails(
        http_server: tuple[str, dict[str, str]], rng: random.Random) -> None:
    base, texts = http_server
    replicas = {name: ServedReplica(rng) for name in ("pod-a", "pod-b")}
    clock = iter([10.0, 11.0, 25.0, 26.0, 40.0, 41.0])
    scraper = FleetScraper(fetch=lambda url: scrape(url, clock=lambda: next(clock)), max_workers=1)
    endpoints = {name: f"{base}/{name}" for name in replicas}
    try:
        for name, replica in replicas.items():
            texts[f"/{name}"] = replica.text()
        first = scraper.observe(endpoints, replicas=3)
        assert (first.replicas, first.ready, first.starting) == (3, 2, 1)
        assert all(load.rates is None for load in first.loads.values())  # one sample: gauges only

        grown = rng.randint(1, 10**4)
        replicas["pod-a"].stats.tokens_by_path["buffered"] += grown
        for name, replica in replicas.items():
            texts[f"/{name}"] = replica.text()
        second = scraper.observe(endpoints, replicas=3)
        rates = second.loads["pod-a"].rates
        assert rates is not None and rates.decode_tokens_per_s["buffered"] == pytest.approx(grown / 15.0)

        del texts["/pod-b"]  # pod-b stops answering: its last sample stays (and grows stale), the error is kept
        third = scraper.observe(endpoints, replicas=3)
        assert third.loads["pod-b"] is second.loads["pod-b"]
        assert "pod-b" in scraper.errors and "404" in scraper.errors["pod-b"]
        fourth = scraper.observe({"pod-a": endpoints["pod-a"]}, replicas=1)  # pod-b gone: forgotten
        assert set(fourth.loads) == {"pod-a"}
    finally:
        for replica in replicas.values():
            replica.telemetry.shutdown()
