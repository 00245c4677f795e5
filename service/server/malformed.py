"""Requests whose bytes do not parse as their message get INVALID_ARGUMENT, not grpc's UNKNOWN and a traceback.

grpc.aio parses a request before any handler runs and answers a parse error with UNKNOWN, logging it at ERROR with
its traceback, once per request: any client could flood the log. `MalformedRequestInterceptor` wraps the parser of
every method that takes one request message, so that bytes that do not parse reach the handler as a marker, which
the wrapped handler refuses with INVALID_ARGUMENT; a warning is logged at most once per interval, with the count.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)

WARNING_INTERVAL_S = 60.0


class RateLimitedWarning:
    """Logs a warning at most once per interval, saying how many occurrences it stands for."""

    def __init__(self, logger: logging.Logger, interval_s: float) -> None:
        self._logger, self._interval = logger, interval_s
        self._count = 0
        self._next = 0.0

    def warn(self, message: str) -> None:
        self._count += 1
        now = time.monotonic()
        if now < self._next:
            return
        self._logger.warning("%s (%d in the last %.0f s; this warning is logged at most once per %.0f s)", message,
                             self._count, self._interval, self._interval)
        self._count, self._next = 0, now + self._interval


class _Malformed:
    """What the guarded parser returns for bytes that are not a message."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self._warning = RateLimitedWarning(log, WARNING_INTERVAL_S)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler  # a streamed request is parsed inside its handler, where an error is the handler's
        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        behaviour = self._guarded(getattr(handler, kind), handler_call_details.method)
        if behaviour is None:
            return handler
        return handler._replace(request_deserializer=_parser(handler.request_deserializer), **{kind: behaviour})

    def _guarded(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any] | None:
        """behaviour, refusing a _Malformed request; None for a synchronous handler (this server has none)."""
        async def refuse(request: _Malformed, context: grpc.aio.ServicerContext) -> None:
            self._warning.warn(f"refused a request to {method} that does not parse: {request.reason}")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {request.reason}")

        if inspect.isasyncgenfunction(behaviour):
            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, _Malformed):
                    await refuse(request, context)
                async for response in behaviour(request, context):
                    yield response

            return stream
        if inspect.iscoroutinefunction(behaviour):
            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Malformed):
                    await refuse(request, context)
                return await behaviour(request, context)

            return call
        return None


def _parser(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """parse, returning a _Malformed (what is wrong, e.g. "String field had bad UTF-8") for bytes it rejects."""
    message = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)  # a generated message's FromString
    name = message.full_name if message is not None else "request message"

    def guarded(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return _Malformed(f"not a valid {name}: {str(exc).rpartition(': ')[2]}")

    return guarded
