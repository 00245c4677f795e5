"""Traces and metrics: spans and instruments through the SDK's in-memory exporter and reader, and every metric
documented in docs/METRICS.md scraped from the Prometheus endpoint over HTTP."""

from __future__ import annotations

import asyncio
import re
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import prometheus_client
import pytest
from kvbuffer.service.engine.api import EngineStats
from kvbuffer.service.server.client import generate_request
from kvbuffer.service.server.telemetry import Telemetry, span_exporters_from_env
from kvbuffer.v1 import kvbuffer_pb2 as pb
from kvbuffer.v1 import kvbuffer_pb2_grpc as pb_grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from service_harness import RunningServer, read_tokens

METRICS_DOC = Path(__file__).resolve().parents[1] / "docs" / "METRICS.md"


class Observed:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.metrics = InMemoryMetricReader()
        self.server = RunningServer(span_processors=[SimpleSpanProcessor(self.spans)], metric_readers=[self.metrics])

    def points(self) -> dict[str, list[Any]]:
        """Data points by instrument name, collected now."""
        data = self.metrics.get_metrics_data()
        assert data is not None
        return {metric.name: list(metric.data.data_points) for resource in data.resource_metrics
                for scope in resource.scope_metrics for metric in scope.metrics}


@pytest.fixture(scope="module")
def observed() -> Iterator[Observed]:
    running = Observed()
    asyncio.run(_traffic(running.server))
    yield running
    running.server.stop()


async def _traffic(server: RunningServer) -> None:
    """One long streamed request (it leaves the stateless path and flushes), then one refused as invalid."""
    async with server.client() as client:
        async for _response in client.generate("Telemetry", request_id="traced-1", max_new_tokens=90,
                                               ignore_eos=True, temperature=0.7, top_p=0.9, seed=7):
            pass
        with pytest.raises(grpc.aio.AioRpcError):
            await client.generate_unary("bad", top_p=2.0)


def _span(observed: Observed, response_id: str | None) -> ReadableSpan:
    spans = [s for s in observed.spans.get_finished_spans()
             if (s.attributes or {}).get("gen_ai.response.id") == response_id]
    assert len(spans) == 1
    return spans[0]


def test_request_span_follows_genai_conventions(observed: Observed) -> None:
    span = _span(observed, "traced-1")
    attributes = dict(span.attributes or {})
    assert span.name == "text_completion embedded:tiny-qwen3-next" and span.kind == SpanKind.SERVER
    assert attributes["gen_ai.operation.name"] == "text_completion"
    assert attributes["gen_ai.request.model"] == "embedded:tiny-qwen3-next"
    assert attributes["gen_ai.request.max_tokens"] == 90
    assert attributes["gen_ai.request.temperature"] == pytest.approx(0.7)
    assert attributes["gen_ai.request.seed"] == 7
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (9, 90)
    assert attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert attributes["rpc.method"] == "Generate" and attributes["rpc.grpc.status_code"] == 0
    assert sum(attributes[f"kvbuffer.tokens.{path}"] for path in ("stateless", "buffered", "recurrent")) == 90
    assert attributes["kvbuffer.flushes"] > 0
    assert [event.name for event in span.events] == ["kvbuffer.first_token"]
    assert span.status.status_code == StatusCode.UNSET


def test_refused_request_span_names_the_status(observed: Observed) -> None:
    [span] = [s for s in observed.spans.get_finished_spans() if (s.attributes or {}).get("error.type")]
    assert span.attributes is not None and span.attributes["error.type"] == "INVALID_ARGUMENT"
    assert span.status.status_code == StatusCode.UNSET  # the caller's error, not the server's


def test_request_metrics(observed: Observed) -> None:
    points = observed.points()
    [ttft] = points["kvbuffer.request.time_to_first_token"]
    [tpot] = points["kvbuffer.request.time_per_output_token"]
    assert ttft.count == 1 and 0 < ttft.sum < 30
    assert tpot.count == 1 and 0 < tpot.sum < ttft.sum + 1
    durations = {(p.attributes["method"], p.attributes["status"]): p.count
                 for p in points["kvbuffer.request.duration"]}
    assert durations == {("Generate", "OK"): 1, ("GenerateUnary", "INVALID_ARGUMENT"): 1}
    tokens = {p.attributes["type"]: p.value for p in points["kvbuffer.tokens"]}
    assert tokens == {"input": 9, "output": 90}


def test_engine_metrics_read_engine_stats(observed: Observed) -> None:
    points = observed.points()
    stats = observed.server.call(observed.server.server.engine.stats)
    decoded = {p.attributes["path"]: p.value for p in points["kvbuffer.decoded_tokens"]}
    assert decoded == stats.tokens_by_path and sum(decoded.values()) == 90
    assert points["kvbuffer.flushes"][0].value == stats.flushes > 0
    assert points["kvbuffer.state_slots_total"][0].value == stats.state_slots_total > 0
    for name in ("kvbuffer.queue_depth", "kvbuffer.running_requests", "kvbuffer.state_slots_used",
                 "kvbuffer.inflight_requests", "kvbuffer.speculative.drafted_tokens"):
        assert points[name][0].value == 0


def test_each_collection_reads_engine_stats_once() -> None:
    """Every engine instrument of one collection reports the same snapshot, taken once."""
    snapshots = [EngineStats(tokens_by_path={"stateless": n, "buffered": 2 * n, "recurrent": 0}, flushes=n,
                             drafted_tokens=0, accepted_tokens=0, running_requests=n, waiting_requests=0,
                             state_slots_used=n, state_slots_total=8, buffer_slots_used=n, buffer_slots_total=8,
                             buffer_occupancy=n / 8) for n in (1, 2)]
    reads: list[EngineStats] = []

    def engine_stats() -> EngineStats:
        reads.append(snapshots[len(reads)])
        return reads[-1]

    reader = InMemoryMetricReader()
    telemetry = Telemetry("m", metric_readers=[reader])
    telemetry.observe(engine_stats, lambda: 0)
    try:
        for n in (1, 2):
            data = reader.get_metrics_data()
            assert data is not None and len(reads) == n
            points = {m.name: m.data.data_points for r in data.resource_metrics for s in r.scope_metrics
                      for m in s.metrics}
            assert {p.attributes["path"]: p.value for p in points["kvbuffer.decoded_tokens"]}["buffered"] == 2 * n
            for name in ("kvbuffer.flushes", "kvbuffer.running_requests", "kvbuffer.state_slots_used"):
                assert points[name][0].value == n
    finally:
        telemetry.shutdown()


def _documented_metric_names() -> list[str]:
    """The service's metrics in docs/METRICS.md (the operator's, kvbuffer_operator_*, are its own process')."""
    names = re.findall(r"^\| `(kvbuffer_[a-z_]+)` \|", METRICS_DOC.read_text(), flags=re.MULTILINE)
    return [name for name in names if not name.startswith("kvbuffer_operator_")]


def test_prometheus_endpoint_exposes_every_documented_metric(observed: Observed) -> None:
    url = f"http://127.0.0.1:{observed.server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        exposition = response.read().decode()
    exposed = set(re.findall(r"^# TYPE (\S+) ", exposition, flags=re.MULTILINE))
    documented = _documented_metric_names()
    assert len(documented) == 16
    assert set(documented) == {name for name in exposed if name.startswith("kvbuffer_")}  # nothing undocumented
    assert 'kvbuffer_decoded_tokens_total{path="buffered"}' in exposition
    assert 'kvbuffer_request_duration_seconds_count{method="Generate",status="OK"} 1.0' in exposition


@pytest.mark.parametrize(("env", "exporters"), [
    ({}, []),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, ["OTLPSpanExporter"]),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_TRACES_EXPORTER": "none"}, []),
    ({"OTEL_TRACES_EXPORTER": "console,otlp"}, ["ConsoleSpanExporter", "OTLPSpanExporter"]),
])
def test_trace_exporters_follow_the_otel_variables(env: dict[str, str], exporters: list[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert [type(exporter).__name__ for exporter in span_exporters_from_env()] == exporters


def test_speculative_decoding_is_reported_in_response_span_and_metrics() -> None:
    spans, metrics = InMemorySpanExporter(), InMemoryMetricReader()
    server = RunningServer(span_processors=[SimpleSpanProcessor(spans)], metric_readers=[metrics],
                           speculative_algorithm="ngram", speculative_num_draft_tokens=4)
    try:
        async def go() -> Any:
            async with server.client() as client:
                return await client.generate_unary("abcabcabcabcabcabc", max_new_tokens=60, ignore_eos=True)

        response = asyncio.run(go())
        data = metrics.get_metrics_data()
    finally:
        server.stop()
    stats = response.stats
    assert stats.drafted_tokens > 0 and 0 <= stats.accepted_tokens <= stats.drafted_tokens
    [span] = spans.get_finished_spans()
    [event] = [e for e in span.events if e.name == "kvbuffer.speculative_acceptance"]
    assert event.attributes is not None
    assert event.attributes["kvbuffer.speculative.drafted_tokens"] == stats.drafted_tokens
    assert event.attributes["kvbuffer.speculative.accepted_tokens"] == stats.accepted_tokens
    assert data is not None
    drafted = [m.data.data_points[0].value for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics
               if m.name == "kvbuffer.speculative.drafted_tokens"]
    assert drafted == [stats.drafted_tokens]


@pytest.mark.parametrize("source", ["default", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "both"])
def test_the_service_name_comes_from_the_environment(source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_SERVICE_NAME, else service.name in OTEL_RESOURCE_ATTRIBUTES, names the service on spans and in
    target_info (the OpenTelemetry specification's order); `kvbuffer` only when neither is set."""
    name, other = f"svc-{secrets.token_hex(4)}", f"attr-{secrets.token_hex(4)}"
    for variable in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(variable, raising=False)
    if source in ("OTEL_SERVICE_NAME", "both"):
        monkeypatch.setenv("OTEL_SERVICE_NAME", name)
    if source in ("OTEL_RESOURCE_ATTRIBUTES", "both"):
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", f"service.name={other},deployment.environment=test")
    want = {"default": "kvbuffer", "OTEL_SERVICE_NAME": name, "OTEL_RESOURCE_ATTRIBUTES": other, "both": name}[source]
    spans = InMemorySpanExporter()
    telemetry = Telemetry("m", span_processors=[SimpleSpanProcessor(spans)])
    try:
        telemetry.tracer.start_span("probe").end()
        telemetry.tokens.add(1, {"type": "input"})  # target_info is exposed beside metrics only
        [span] = spans.get_finished_spans()
        exposition = prometheus_client.generate_latest(telemetry.prometheus_registry).decode()
    finally:
        telemetry.shutdown()
    assert span.resource.attributes["service.name"] == want
    assert re.search(rf'^target_info\{{.*service_name="{want}"', exposition, flags=re.MULTILINE), exposition


@pytest.fixture(scope="module")
def traced() -> Iterator[Observed]:
    running = Observed()
    yield running
    running.server.stop()


def test_a_request_span_continues_the_callers_trace(traced: Observed) -> None:
    """A W3C `traceparent` in the call's metadata makes the server span a child of the caller's span."""
    trace_id, parent_id = secrets.randbits(128) or 1, secrets.randbits(64) or 1
    traceparent = f"00-{trace_id:032x}-{parent_id:016x}-01"

    async def go() -> pb.GenerateResponse:
        async with grpc.aio.insecure_channel(traced.server.target) as channel:
            return await pb_grpc.KVBufferServiceStub(channel).GenerateUnary(
                generate_request("child", request_id="child-1", max_new_tokens=3),
                metadata=(("traceparent", traceparent),))

    asyncio.run(go())
    span = _span(traced, "child-1")
    assert span.context.trace_id == trace_id
    assert span.parent is not None and span.parent.span_id == parent_id and span.parent.is_remote


def test_cancelled_and_timed_out_spans_carry_finish_reason_and_usage(traced: Observed) -> None:
    prompt = f"cut short {secrets.token_hex(3)}"

    async def go() -> int:
        async with traced.server.client() as client:
            call = client.generate(prompt, request_id="cancelled-1", max_new_tokens=3000, ignore_eos=True)
            received = await read_tokens(call, 5)
            call.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await client.generate_unary(prompt, request_id="timed-out-1", max_new_tokens=3000, ignore_eos=True,
                                            timeout=1.0)
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            return received

    received = asyncio.run(go())
    for response_id, status in (("cancelled-1", "CANCELLED"), ("timed-out-1", "DEADLINE_EXCEEDED")):
        assert traced.server.wait_until(lambda rid=response_id: any(
            (s.attributes or {}).get("gen_ai.response.id") == rid for s in traced.spans.get_finished_spans()))
        attributes = dict(_span(traced, response_id).attributes or {})
        assert attributes["error.type"] == status
        assert attributes["gen_ai.response.finish_reasons"] == ("cancelled",)
        assert attributes["gen_ai.usage.input_tokens"] == len(prompt.encode())
        assert attributes["gen_ai.usage.output_tokens"] >= (received if status == "CANCELLED" else 0)
        assert sum(attributes[f"kvbuffer.tokens.{path}"] for path in ("stateless", "buffered", "recurrent")) == (
            attributes["gen_ai.usage.output_tokens"])
