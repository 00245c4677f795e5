"""Traces and metrics of the service (OpenTelemetry SDK); names and meanings are documented in docs/METRICS.md.

Each server owns its providers (nothing global), so several can live in one process (tests) and each
exposes exactly its own metrics. A request's span continues the caller's trace when the call carries one (W3C
`traceparent` metadata, through the propagators OTEL_PROPAGATORS names). Traces go wherever the standard OTEL_*
variables say; metrics are
scraped by Prometheus from an HTTP port, and the KVBuffer counters are read from Engine.stats() at
each scrape (observable instruments), once per collection so that every instrument reports the same
snapshot, and the engine keeps no exporter-specific code.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from http.server import ThreadingHTTPServer
from typing import Any

import grpc
from kvbuffer.service.engine.api import EngineStats, GenerateChunk, GenerateRequest, RequestStats
from opentelemetry import propagate
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)

SCOPE = "kvbuffer.service"
# gRPC server spans are errors only for these codes (OpenTelemetry RPC conventions); the rest are the caller's.
_SERVER_ERROR_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
                       grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS}
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                 0.5, 0.75, 1.0, 2.5)
_DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)

# Engine gauges: OpenTelemetry name -> (EngineStats attribute, unit, description).
_ENGINE_GAUGES = {
    "kvbuffer.queue_depth": ("waiting_requests", "{request}", "Requests admitted by the engine, waiting to run"),
    "kvbuffer.running_requests": ("running_requests", "{request}", "Requests the engine is decoding (their last "
                                  "token on the device included)"),
    "kvbuffer.state_slots_used": ("state_slots_used", "{slot}", "Linear-attention state slots in use"),
    "kvbuffer.state_slots_total": ("state_slots_total", "{slot}", "Linear-attention state slots in the pool"),
    "kvbuffer.buffer_slots_used": ("buffer_slots_used", "{slot}", "KVBuffer buffer slots in use"),
    "kvbuffer.buffer_slots_total": ("buffer_slots_total", "{slot}", "KVBuffer buffer slots in the pool"),
    "kvbuffer.buffer_occupancy": ("buffer_occupancy", "1", "Mean buffered entries per request holding a buffer "
                                  "slot, as a fraction of buffer_size"),
}
# Engine counters (cumulative since start): OpenTelemetry name -> (EngineStats attribute, unit, description).
_ENGINE_COUNTERS = {
    "kvbuffer.flushes": ("flushes", "{flush}", "Buffers folded into their request's state"),
    "kvbuffer.speculative.drafted_tokens": ("drafted_tokens", "{token}", "Speculative draft tokens proposed"),
    "kvbuffer.speculative.accepted_tokens": ("accepted_tokens", "{token}", "Speculative draft tokens accepted"),
}


def span_exporters_from_env() -> list[SpanExporter]:
    """Exporters named by OTEL_TRACES_EXPORTER (otlp, console, none); unset: otlp if an OTLP endpoint is set."""
    names = os.environ.get("OTEL_TRACES_EXPORTER")
    if names is None:
        endpoint_set = any(os.environ.get(v) for v in ("OTEL_EXPORTER_OTLP_ENDPOINT",
                                                       "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        names = "otlp" if endpoint_set else "none"
    exporters: list[SpanExporter] = []
    for name in (n.strip().lower() for n in names.split(",")):
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())  # endpoint, headers, TLS: from the OTEL_EXPORTER_OTLP_* variables
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name not in ("none", ""):
            log.warning("OTEL_TRACES_EXPORTER=%s: unsupported exporter %r ignored (supported: otlp, console, "
                        "none)", names, name)
    return exporters


class Telemetry:
    """The tracer and instruments of one server, and its Prometheus registry."""

    def __init__(self, model: str, span_processors: Sequence[SpanProcessor] = (),
                 metric_readers: Sequence[MetricReader] = ()) -> None:
        """span_processors and metric_readers come in addition to the OTEL_* exporters and Prometheus (tests
        pass in-memory ones)."""
        # the environment's OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win over the default name
        resource = Resource.create({SERVICE_NAME: "kvbuffer"}).merge(OTELResourceDetector().detect())
        self.model = model
        self.tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        for processor in (*span_processors, *(BatchSpanProcessor(e) for e in span_exporters_from_env())):
            self.tracer_provider.add_span_processor(processor)
        self.tracer = self.tracer_provider.get_tracer(SCOPE)
        self.prometheus_registry = CollectorRegistry()
        prometheus = PrometheusMetricReader(registry=self.prometheus_registry, scope_info_enabled=False)
        self.meter_provider = MeterProvider(metric_readers=[prometheus, *metric_readers], resource=resource,
                                            shutdown_on_exit=False)
        meter = self.meter_provider.get_meter(SCOPE)
        self.ttft = meter.create_histogram(
            "kvbuffer.request.time_to_first_token", unit="s", explicit_bucket_boundaries_advisory=_TTFT_BUCKETS,
            description="Time from receiving a request to sending its first token")
        self.tpot = meter.create_histogram(
            "kvbuffer.request.time_per_output_token", unit="s", explicit_bucket_boundaries_advisory=_TPOT_BUCKETS,
            description="Mean time between output tokens after the first, per request")
        self.duration = meter.create_histogram(
            "kvbuffer.request.duration", unit="s", explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
            description="Time from receiving a request to its last response or error, by method and gRPC status")
        self.tokens = meter.create_counter(
            "kvbuffer.tokens", unit="{token}", description="Prompt (type=input) and generated (type=output) tokens "
                                                          "of the requests the engine ended (finished, cancelled, "
                                                          "failed)")
        self._meter = meter
        self._metrics_http: ThreadingHTTPServer | None = None

    def observe(self, engine_stats: Callable[[], EngineStats], in_flight: Callable[[], int]) -> None:
        """Registers the instruments read at each collection: the engine's counters, the service's in-flight count."""
        stats = _OncePerCollection(engine_stats)

        def reader(attribute: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
            return lambda _options: [Observation(getattr(stats.get(attribute), attribute))]

        for name, (attribute, unit, description) in _ENGINE_GAUGES.items():
            self._meter.create_observable_gauge(name, [reader(attribute)], unit=unit, description=description)
        for name, (attribute, unit, description) in _ENGINE_COUNTERS.items():
            self._meter.create_observable_counter(name, [reader(attribute)], unit=unit, description=description)
        self._meter.create_observable_counter(
            "kvbuffer.decoded_tokens",
            [lambda _options: [Observation(n, {"path": path})
                               for path, n in stats.get("tokens_by_path").tokens_by_path.items()]],
            unit="{token}", description="Tokens decoded, by the path that produced them: stateless (no state), "
                                        "buffered (checkpoint + buffer), recurrent (baseline)")
        self._meter.create_observable_gauge(
            "kvbuffer.inflight_requests", [lambda _options: [Observation(in_flight())]], unit="{request}",
            description="Requests the service has admitted and not yet answered (bounded by max_running_requests "
                        "+ max_waiting_requests)")

    def serve_metrics(self, host: str, port: int) -> int:
        """Starts the Prometheus endpoint (GET /metrics) in a thread; returns its port."""
        self._metrics_http, _thread = start_http_server(port, addr=host, registry=self.prometheus_registry)
        return self._metrics_http.server_address[1]

    def request(self, method: str, metadata: Sequence[tuple[str, str | bytes]] = ()) -> RequestRecord:
        """The record of one request; its span is a child of the trace context metadata carries, if any."""
        return RequestRecord(self, method, metadata)

    def shutdown(self) -> None:
        """Stops the metrics endpoint and flushes pending spans."""
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


class _OncePerCollection:
    """Engine stats read once per metrics collection, shared by that collection's instruments.

    The SDK runs one collection's callbacks one after another under its lock, each once; so a callback asking
    a second time starts the next collection, which reads a fresh snapshot.
    """

    def __init__(self, read: Callable[[], EngineStats]) -> None:
        self._read = read
        self._stats: EngineStats | None = None
        self._asked: set[str] = set()

    def get(self, instrument: str) -> EngineStats:
        if self._stats is None or instrument in self._asked:
            self._stats, self._asked = self._read(), set()
        self._asked.add(instrument)
        return self._stats


class RequestRecord:
    """The span and measurements of one generation request, fed by the servicer as the request progresses."""

    def __init__(self, telemetry: Telemetry, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._telemetry = telemetry
        self._method = method
        self._start = time.perf_counter()
        self._first_token: float | None = None
        self._last_token = self._start
        self._output_tokens = 0
        self._final: GenerateChunk | None = None
        carrier: dict[str, Any] = {key: value for key, value in metadata if isinstance(value, str)}  # not -bin
        self.span = telemetry.tracer.start_span(
            f"text_completion {telemetry.model}", context=propagate.extract(carrier), kind=SpanKind.SERVER,
            attributes={"gen_ai.operation.name": "text_completion", "gen_ai.provider.name": "kvbuffer",
                        "gen_ai.request.model": telemetry.model, "rpc.system": "grpc",
                        "rpc.service": "kvbuffer.v1.KVBufferService", "rpc.method": method})

    def admitted(self, request: GenerateRequest, response_id: str) -> None:
        sampling = request.sampling
        attributes = {"gen_ai.response.id": response_id, "kvbuffer.engine_request_id": request.request_id,
                      "gen_ai.request.max_tokens": sampling.max_new_tokens,
                      "gen_ai.request.temperature": sampling.temperature, "gen_ai.request.top_p": sampling.top_p,
                      "gen_ai.request.top_k": sampling.top_k, "gen_ai.response.model": self._telemetry.model}
        if sampling.seed is not None:
            attributes["gen_ai.request.seed"] = sampling.seed
        if sampling.stop_strings:
            attributes["gen_ai.request.stop_sequences"] = list(sampling.stop_strings)
        self.span.set_attributes(attributes)

    def sent(self, chunk: GenerateChunk) -> None:
        """A chunk went out to the client (the last one included)."""
        if chunk.finish_reason is not None:
            self._final = chunk
        if not chunk.token_ids:
            return
        now = time.perf_counter()
        if self._first_token is None:
            self._first_token = now
            self._telemetry.ttft.record(now - self._start)
            self.span.add_event("kvbuffer.first_token", {"kvbuffer.time_to_first_token_s": now - self._start})
        self._last_token = now
        self._output_tokens += len(chunk.token_ids)

    def ended(self, final: GenerateChunk | None) -> None:
        """The engine's last chunk of a request whose call was cancelled or ran out of time (None if it never
        reached the engine): its usage and statistics, though nothing more went out."""
        self._final = final

    def finish(self, code: grpc.StatusCode, error: str = "") -> None:
        """Ends the span and records the request's metrics, with the usage of its last chunk, if any."""
        telemetry, span, final = self._telemetry, self.span, self._final
        telemetry.duration.record(time.perf_counter() - self._start, {"method": self._method, "status": code.name})
        if self._first_token is not None and self._output_tokens > 1:
            telemetry.tpot.record((self._last_token - self._first_token) / (self._output_tokens - 1))
        if final is not None:
            telemetry.tokens.add(final.prompt_tokens, {"type": "input"})
            telemetry.tokens.add(final.completion_tokens, {"type": "output"})
            span.set_attributes({"gen_ai.usage.input_tokens": final.prompt_tokens,
                                 "gen_ai.usage.output_tokens": final.completion_tokens,
                                 "gen_ai.response.finish_reasons": [final.finish_reason or ""]})
            if final.stats is not None:
                self._stats(final.stats)
        elif code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
            span.set_attribute("gen_ai.response.finish_reasons", ["cancelled"])
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            span.set_attribute("error.type", code.name)
            if code in _SERVER_ERROR_CODES:
                span.set_status(Status(StatusCode.ERROR, error or code.name))
        span.end()

    def _stats(self, stats: RequestStats) -> None:
        self.span.set_attributes({**{f"kvbuffer.tokens.{path}": n for path, n in stats.tokens_by_path.items()},
                                  "kvbuffer.flushes": stats.flushes})
        if stats.drafted_tokens:
            self.span.add_event("kvbuffer.speculative_acceptance", {
                "kvbuffer.speculative.drafted_tokens": stats.drafted_tokens,
                "kvbuffer.speculative.accepted_tokens": stats.accepted_tokens,
                "kvbuffer.speculative.acceptance_rate": stats.accepted_tokens / stats.drafted_tokens})
