"""The kvbuffer.v1 servicer: translates protocol messages to engine calls and engine outcomes to messages and
status codes (the engine's field names in errors to the proto's). Validation, admission and telemetry live in
their own modules; this one only wires them.

The engine's `generate` validates and tokenizes a prompt, which takes milliseconds for a long one: it runs in a
worker thread, never on the event loop that streams every other request. A request that ends in an engine error
still gets its last response (streams), then a non-OK status: INTERNAL, or UNAVAILABLE once the engine has failed
for good (retry on another replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from kvbuffer.service.engine.api import (
    Engine,
    EngineFailedError,
    GenerateChunk,
    GenerateRequest,
    InvalidRequestError,
    OverloadedError,
    RequestStats,
)
from kvbuffer.service.server.admission import Admission, DrainingError
from kvbuffer.service.server.telemetry import RequestRecord, Telemetry
from kvbuffer.service.server.validation import validate_generate_request
from kvbuffer.v1 import kvbuffer_pb2 as pb
from kvbuffer.v1 import kvbuffer_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)

_STATUS_OF_ERROR: dict[type[Exception], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DrainingError: grpc.StatusCode.UNAVAILABLE,
    EngineFailedError: grpc.StatusCode.UNAVAILABLE,  # this replica is dead: the client should go elsewhere
}
# GenerateRequest fields whose engine name differs from the proto's (the rest, `sampling.top_p`, are the same).
_PROTO_FIELDS = {"prompt": "text", "prompt_token_ids": "token_ids.ids"}
_FINISH_REASONS = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
                   "length": pb.FINISH_REASON_LENGTH, "cancelled": pb.FINISH_REASON_CANCELLED,
                   "error": pb.FINISH_REASON_ERROR}


def stats_message(stats: RequestStats) -> pb.RequestStats:
    return pb.RequestStats(**{f"{path}_tokens": n for path, n in stats.tokens_by_path.items()},
                           flushes=stats.flushes, drafted_tokens=stats.drafted_tokens,
                           accepted_tokens=stats.accepted_tokens)


def response_message(request_id: str, chunk: GenerateChunk) -> pb.GenerateResponse:
    """One engine chunk as a streamed response; the final one also carries usage and stats."""
    response = pb.GenerateResponse(request_id=request_id, text=chunk.text, token_ids=chunk.token_ids,
                                   logprobs=chunk.logprobs or (), finish_reason=_FINISH_REASONS[chunk.finish_reason])
    if chunk.finish_reason is not None:
        response.usage.CopyFrom(pb.Usage(prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens,
                                         total_tokens=chunk.prompt_tokens + chunk.completion_tokens))
        if chunk.stats is not None:
            response.stats.CopyFrom(stats_message(chunk.stats))
    return response


def merged_response(responses: list[pb.GenerateResponse]) -> pb.GenerateResponse:
    """A stream's responses as one: ids and logprobs concatenated, final fields from the last response."""
    whole = pb.GenerateResponse()
    for response in responses:
        whole.MergeFrom(response)  # appends repeated fields; the last set scalar or message wins
    whole.text = "".join(r.text for r in responses)
    return whole


def status_of(exc: Exception) -> grpc.StatusCode:
    """The status of one of the _STATUS_OF_ERROR errors, subclasses included."""
    return next(code for error, code in _STATUS_OF_ERROR.items() if isinstance(exc, error))


def proto_field(field: str) -> str:
    """An engine field name as the proto spells it: `prompt_token_ids[3]` -> `token_ids.ids[3]`."""
    name = re.split(r"[.\[]", field, maxsplit=1)[0]
    return _PROTO_FIELDS.get(name, name) + field[len(name):]


def filled(message: M, values: dict[str, Any]) -> M:
    """Sets the message's fields that values names; values of string fields are converted with str()."""
    for field in message.DESCRIPTOR.fields:
        if field.name in values:
            value = values[field.name]
            setattr(message, field.name, str(value) if field.type == field.TYPE_STRING else value)
    return message


class KVBufferServicer(pb_grpc.KVBufferServiceServicer):
    def __init__(self, engine: Engine, admission: Admission, telemetry: Telemetry, engine_name: str) -> None:
        self._engine = engine
        self._admission = admission
        self._telemetry = telemetry
        self._engine_name = engine_name
        self._max_context_length = engine.model_info().max_context_length

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        # Written with context.write rather than as an async generator: a cancelled call then always
        # surfaces as CancelledError inside _generate, which cancels the engine request at once.
        await self._generate(request, context, "Generate", context.write)

    async def GenerateUnary(self, request: pb.GenerateRequest,
                            context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        responses: list[pb.GenerateResponse] = []

        async def collect(response: pb.GenerateResponse) -> None:
            responses.append(response)

        await self._generate(request, context, "GenerateUnary", collect)
        return merged_response(responses)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        return pb.ModelInfo(**dataclasses.asdict(self._engine.model_info()))

    async def GetServerConfig(self, request: pb.GetServerConfigRequest,
                              context: grpc.aio.ServicerContext) -> pb.ServerConfig:
        return filled(pb.ServerConfig(), {"engine": self._engine_name, **self._engine.config()})

    async def _generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, method: str,
                        emit: Callable[[pb.GenerateResponse], Awaitable[None]]) -> None:
        """Runs one request to its end, mapping every outcome to a status; nothing a client sends escapes as a crash."""
        record = self._telemetry.request(method, context.invocation_metadata() or ())
        try:
            with self._admission.admit():
                engine_request = validate_generate_request(request, self._max_context_length)
                response_id = request.request_id or engine_request.request_id
                record.admitted(engine_request, response_id)
                final = await self._run(engine_request, response_id, record, emit)
        except asyncio.CancelledError:
            code = grpc.StatusCode.DEADLINE_EXCEEDED if _deadline_passed(context) else grpc.StatusCode.CANCELLED
            record.finish(code)
            raise
        except tuple(_STATUS_OF_ERROR) as exc:
            code = status_of(exc)
            record.finish(code, error=str(exc))
            await context.abort(code, str(exc))
        except Exception:
            log.exception("%s failed", method)
            record.finish(grpc.StatusCode.INTERNAL, error="internal error")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")
        else:
            if final.finish_reason != "error":
                record.finish(grpc.StatusCode.OK)
                return
            code, message = ((grpc.StatusCode.INTERNAL, "the engine failed while running this request; the server "
                                                         "log has the details") if self._engine.healthy else
                             (grpc.StatusCode.UNAVAILABLE, "the engine failed and serves no more requests; retry on "
                                                           "another replica"))
            record.finish(code, error=message)
            await context.abort(code, message)

    async def _run(self, request: GenerateRequest, response_id: str, record: RequestRecord,
                   emit: Callable[[pb.GenerateResponse], Awaitable[None]]) -> GenerateChunk:
        """Streams the engine's chunks out. Leaving early (error) closes the engine's iterator, which cancels the
        engine request and frees its memory (Engine contract); a cancelled call (client, deadline) first has the
        engine end the request, so that its last chunk (usage, statistics) reaches the span."""
        try:
            generator = await asyncio.to_thread(self._engine.generate, request)  # validates and tokenizes
        except InvalidRequestError as exc:  # the engine's checks, named as the client knows the fields
            raise InvalidRequestError(proto_field(exc.field), exc.message) from None
        chunks = _Chunks(generator)
        try:
            while True:
                chunk = await chunks.next()
                await emit(response_message(response_id, chunk))
                record.sent(chunk)
                if chunk.finish_reason is not None:
                    return chunk
        except asyncio.CancelledError:
            await self._engine.cancel(request.request_id)
            record.ended(await chunks.last(_CANCELLED_FINAL_CHUNK_S))
            raise
        finally:
            await chunks.close()


# How long a cancelled call waits for the engine's last chunk of its request (the engine hands it over as it frees
# the request, so at once; this only bounds a broken engine).
_CANCELLED_FINAL_CHUNK_S = 5.0


class _Chunks:
    """The engine's chunks of one request, read by a task of their own. A cancelled call is cancelled wherever it
    waits; were it waiting inside the engine's iterator, that would close it and lose the request's last chunk."""

    def __init__(self, generator: AsyncGenerator[GenerateChunk, None]) -> None:
        self._queue: asyncio.Queue[GenerateChunk | Exception] = asyncio.Queue()
        self._reader = asyncio.ensure_future(self._read(generator))
        self._final: GenerateChunk | None = None  # once next() has returned it

    async def _read(self, generator: AsyncGenerator[GenerateChunk, None]) -> None:
        async with contextlib.aclosing(generator) as chunks:
            try:
                async for chunk in chunks:
                    self._queue.put_nowait(chunk)
                    if chunk.finish_reason is not None:
                        return
                raise RuntimeError("the engine ended a request without a finish reason")
            except Exception as exc:  # the caller raises it, as if it had read the iterator itself
                self._queue.put_nowait(exc)

    async def next(self) -> GenerateChunk:
        item = await self._queue.get()
        if isinstance(item, Exception):
            raise item
        if item.finish_reason is not None:
            self._final = item
        return item

    async def last(self, timeout: float) -> GenerateChunk | None:
        """The final chunk, skipping those before it; None if none comes within timeout or the stream failed."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                while self._final is None:
                    await self.next()
        return self._final

    async def close(self) -> None:
        """Stops reading; an engine request not ended yet is cancelled (its iterator closed)."""
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


# The server's copy of a call's deadline runs from when the call arrived, so it passes a network latency after the
# client's, and a client cancelling at its deadline is seen about as the server's passes: within this, it counts.
_DEADLINE_MARGIN_S = 0.1


def _deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= _DEADLINE_MARGIN_S
