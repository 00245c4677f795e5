"""Server assembly: the engine behind the kvbuffer.v1 servicer, plus standard health and reflection services,
optional TLS and bearer-token auth, the Prometheus endpoint, and the graceful drain that SIGTERM starts.

The drain: health NOT_SERVING, new requests UNAVAILABLE, and shutdown_grace_period_s for the requests in flight.
Those still running then are ended by the engine (finish reason CANCELLED), so that every call gets its last
response with usage and statistics before the server stops. A second SIGTERM or SIGINT exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from kvbuffer.service import stacks
from kvbuffer.service.engine import build_engine
from kvbuffer.service.engine.api import Engine, EngineFailedError
from kvbuffer.service.server.admission import Admission
from kvbuffer.service.server.malformed import MalformedRequestInterceptor
from kvbuffer.service.server.servicer import KVBufferServicer
from kvbuffer.service.server.settings import ServiceSettings, SettingsError
from kvbuffer.service.server.telemetry import Telemetry
from kvbuffer.v1 import SERVICE_NAME
from kvbuffer.v1 import kvbuffer_pb2_grpc as pb_grpc
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace import SpanProcessor

log = logging.getLogger(__name__)

HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
# Once the engine has ended the requests that outlived the grace period, how long their calls get to send their
# last response and status before the rest are cut (a client that does not read them).
FINAL_RESPONSES_S = 5.0


class StartupError(RuntimeError):
    """The server cannot start as configured; the message names the setting involved."""


# Once a connection has reached max_connection_age_s, gRPC sends GOAWAY: the client opens a new connection
# (re-resolving the name) for new calls; calls in flight finish on the old one, whatever their length.
_UNBOUNDED_GRACE_MS = 2**31 - 1


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """gRPC server channel arguments; so_reuseport off: a second server on a taken port must fail, not
    silently share it."""
    options = [("grpc.so_reuseport", 0)]
    if settings.max_connection_age_s > 0:
        options += [("grpc.max_connection_age_ms", max(1, round(settings.max_connection_age_s * 1000))),
                    ("grpc.max_connection_age_grace_ms", _UNBOUNDED_GRACE_MS)]
    return options


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects RPCs lacking `authorization: Bearer <token>` with UNAUTHENTICATED; health checks stay open so
    that Kubernetes probes and load balancers need no token."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if (handler is None or handler_call_details.method.startswith(HEALTH_METHOD_PREFIX)
                or self._authorized(handler_call_details.invocation_metadata or ())):
            return handler
        return _unauthenticated(handler)

    def _authorized(self, metadata: Sequence[tuple[str, str | bytes]]) -> bool:
        values = [value for key, value in metadata if key == "authorization"]
        given = values[0] if len(values) == 1 else ""
        return hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected)


def _unauthenticated(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as handler that answers UNAUTHENTICATED."""
    async def reject(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or wrong bearer token (metadata `authorization: Bearer <token>`)")

    factory = {(False, False): grpc.unary_unary_rpc_method_handler,
               (False, True): grpc.unary_stream_rpc_method_handler,
               (True, False): grpc.stream_unary_rpc_method_handler,
               (True, True): grpc.stream_stream_rpc_method_handler}[handler.request_streaming,
                                                                     handler.response_streaming]
    return factory(reject, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


class Server:
    """One kvbuffer server around a started-by-us engine. Lifecycle: start() -> drain()."""

    def __init__(self, settings: ServiceSettings, engine: Engine, *, span_processors: Sequence[SpanProcessor] = (),
                 metric_readers: Sequence[MetricReader] = ()) -> None:
        """span_processors and metric_readers come in addition to the OTEL_* exporters and Prometheus."""
        self.settings = settings
        self.engine = engine
        self.telemetry = Telemetry(settings.model, span_processors, metric_readers)
        self.admission = Admission(settings.max_in_flight_requests)
        self.health = health_aio.HealthServicer()
        self._grpc: grpc.aio.Server | None = None  # made in start(): it binds to the running event loop
        self._drain_task: asyncio.Task[None] | None = None
        self._engine_failed_task: asyncio.Task[None] | None = None
        self.port = 0
        self.metrics_port = 0

    async def start(self) -> None:
        """Starts the engine, then serves; health turns SERVING only once everything is up. On failure, what
        was started is stopped again."""
        await self.engine.start()
        try:
            await self._serve()
        except BaseException:
            await self._stop()
            raise

    async def _serve(self) -> None:
        settings = self.settings
        self.telemetry.observe(self.engine.stats, lambda: self.admission.in_flight)
        interceptors: list[grpc.aio.ServerInterceptor] = [MalformedRequestInterceptor()]
        if settings.auth.token:
            interceptors.append(BearerTokenInterceptor(settings.auth.token.get_secret_value()))
        self._grpc = grpc.aio.server(interceptors=interceptors, options=server_options(settings))
        servicer = KVBufferServicer(self.engine, self.admission, self.telemetry, settings.engine)
        pb_grpc.add_KVBufferServiceServicer_to_server(servicer, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._grpc)
        self.port = self._bind(self._grpc, f"{settings.host}:{settings.port}")
        await self._grpc.start()
        try:
            self.metrics_port = self.telemetry.serve_metrics(settings.host, settings.metrics_port)
        except OSError as exc:
            raise StartupError(f"metrics_port: cannot serve metrics on {settings.host}:{settings.metrics_port}: "
                               f"{exc.strerror}") from None
        log.info(loaded_summary(self.engine.config()))
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        self._watch_engine()
        log.info("serving %s on %s:%d (%s), metrics on http://%s:%d/metrics", SERVICE_NAME, settings.host,
                 self.port, "TLS" if settings.tls.enabled else "plaintext", settings.host, self.metrics_port)

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    def _watch_engine(self) -> None:
        """Has the engine report its failure onto this event loop (the engine thread must not touch health
        itself), so that health turns NOT_SERVING at once rather than at the next poll."""
        loop = asyncio.get_running_loop()

        def notify() -> None:
            with contextlib.suppress(RuntimeError):  # the event loop has closed: the server is gone
                loop.call_soon_threadsafe(self._engine_failed)

        self.engine.on_failure(notify)

    def _engine_failed(self) -> None:
        """Health NOT_SERVING for good, so that Kubernetes and load balancers stop routing to this replica,
        whose requests are all refused UNAVAILABLE now."""
        log.error("the engine failed: health NOT_SERVING, requests refused UNAVAILABLE; restart this replica")
        if self._engine_failed_task is None:
            self._engine_failed_task = asyncio.ensure_future(
                self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))

    def _bind(self, server: grpc.aio.Server, address: str) -> int:
        tls = self.settings.tls
        try:
            if tls.cert_file is not None and tls.key_file is not None:
                credentials = grpc.ssl_server_credentials([(tls.key_file.read_bytes(), tls.cert_file.read_bytes())])
                return server.add_secure_port(address, credentials)
            return server.add_insecure_port(address)
        except RuntimeError as exc:
            raise StartupError(f"host/port: cannot listen on {address} (in use, or not an address of this "
                               f"machine): {exc}") from None

    async def drain(self) -> None:
        """The graceful shutdown, started once (later calls wait for the same one): health NOT_SERVING, new
        requests UNAVAILABLE, in-flight ones get shutdown_grace_period_s to finish, the rest are ended CANCELLED."""
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())
        await asyncio.shield(self._drain_task)

    async def _drain(self) -> None:
        grace = self.settings.shutdown_grace_period_s
        log.info("draining: %d requests in flight, grace period %.1f s", self.admission.in_flight, grace)
        await self.health.enter_graceful_shutdown()
        if not await self.admission.drain(grace):
            log.warning("grace period over: ending %d requests (finish reason CANCELLED)", self.admission.in_flight)
            await self.engine.shutdown()  # each call then sends its last response, with usage and statistics
        await self._stop()
        log.info("stopped")

    async def _stop(self) -> None:
        """Stops serving (calls still open get FINAL_RESPONSES_S to finish, then are cancelled), then stops the
        engine and flushes telemetry."""
        if self._grpc is not None:
            await self._grpc.stop(grace=FINAL_RESPONSES_S)
        await self.engine.shutdown()
        await asyncio.to_thread(self.telemetry.shutdown)  # flushing spans may wait on the OTLP collector


def loaded_summary(config: Mapping[str, object]) -> str:
    """One line saying what the engine loaded and how it sized its pools, from Engine.config()."""
    names = {"model": "model", "resolved_device": "device", "resolved_dtype": "dtype", "decode_mode": "decode_mode",
             "buffer_size": "buffer_size", "chunk_size": "chunk_size", "speculative_algorithm": "speculative_algorithm",
             "request_slots": "request_slots", "state_slots": "state_slots", "kv_cache_tokens": "kv_cache_tokens"}
    facts = [f"{shown} {config[key]}" for key, shown in names.items() if key in config]
    if isinstance(pool_bytes := config.get("pool_bytes"), int):
        facts.append(f"pools {pool_bytes / 2**20:.1f} MiB of memory_budget_bytes {config.get('memory_budget_bytes')}")
    return "loaded " + ", ".join(facts)


def exit_now(code: int) -> NoReturn:
    """Ends the process at once, its log flushed, without the interpreter's teardown (seconds once torch is
    loaded): for when the server has stopped, or a second signal says not to wait."""
    logging.shutdown()
    os._exit(code)


def make_engine(settings: ServiceSettings) -> Engine:
    """The engine the settings ask for; engine sglang checks its settings against SGLang's ServerArgs here."""
    if settings.engine == "sglang":
        from kvbuffer.service.sglang.engine import build_sglang_engine

        return build_sglang_engine(settings)
    return build_engine(settings.engine_config())


async def serve(settings: ServiceSettings) -> None:
    """Runs a server until SIGTERM or SIGINT has drained it; a second signal exits at once. The signals are
    handled from the start, so one that comes while the model loads drains the server as soon as it is up."""
    import torch  # for its OutOfMemoryError (the native engine imports torch anyway)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set():
            log.warning("%s again: exiting without draining", signum.name)
            exit_now(128 + signum)
        stop.set()

    def handle_signals() -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)

    handle_signals()
    try:
        server = Server(settings, make_engine(settings))
        with stacks.report_if_slow(settings.startup_report_s, "the server has not started"):
            await server.start()
    except SettingsError as exc:  # engine sglang: a setting SGLang refuses (it checks the whole combination)
        raise StartupError(str(exc)) from None
    except torch.OutOfMemoryError as exc:  # the model's weights plus the pools do not fit on the device
        reason = next(iter(str(exc).splitlines()), "out of memory")
        raise StartupError(f"memory_budget_bytes: the model {settings.model!r} and pools of memory_budget_bytes="
                           f"{settings.memory_budget_bytes} do not fit on the device; lower memory_budget_bytes "
                           f"({reason})") from None
    except (OSError, ValueError, EngineFailedError) as exc:  # e.g. a model directory that is missing or not a
        # supported model, or SGLang failing to start
        raise StartupError(f"engine start-up failed (model={settings.model!r}, device={settings.device}): "
                           f"{exc}") from None
    handle_signals()  # an engine may claim them while it starts (SGLang's does): SIGTERM drains the server
    await stop.wait()
    await server.drain()
