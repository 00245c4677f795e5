"""`NativeEngine`: the `Engine` interface over `EngineCore`, with the step loop on a background thread.

Requests reach the loop through an inbox (no lock is taken on the event loop for `generate`); chunks come back
to each request's asyncio queue via `call_soon_threadsafe`. Cancelling (closing the iterator, or `cancel`)
takes the step lock, so when it returns the request's slots, buffer and KV blocks are already free. Under the
same lock, after each step or cancel, the engine publishes an `EngineStats` snapshot that `stats()` returns
to any thread (the metrics endpoint's included) without taking a lock.

A step that raises ends the requests in flight with "error" and the loop goes on: the failure may be one bad
request's. A failure that persists turns the engine unhealthy for good: an accelerator error (the device context
is lost), MAX_CONSECUTIVE_FAILED_STEPS failed steps in a row, or the engine thread itself failing. Then open
requests end with "error", new ones get EngineFailedError, and the `on_failure` callbacks run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import asdict, dataclass

import torch

from .api import (
    EngineFailedError,
    EngineStats,
    GenerateChunk,
    GenerateRequest,
    InvalidRequestError,
    ModelInfo,
    OverloadedError,
    notify_failure,
)
from .config import EngineConfig
from .core import EngineCore, dtype_name

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILED_STEPS = 3  # in a row: not one bad request but a broken replica


def is_persistent(error: Exception) -> bool:
    """An error no later step recovers from: the accelerator's (a CUDA error leaves its context unusable)."""
    return isinstance(error, torch.AcceleratorError)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    chunks: asyncio.Queue[GenerateChunk]


class NativeEngine:
    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        self._core = EngineCore(config)
        self._lock = threading.Lock()  # held for each step and each cancel
        self._wake = threading.Event()
        self._inbox: queue.SimpleQueue[tuple[GenerateRequest, list[int]]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # active request ids (guarded by _ids)
        self._ids = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False  # set by shutdown, or when the engine thread fails (guarded by _ids)
        self._failed = False  # set when the engine thread fails, never cleared (guarded by _ids)
        self._failure_callbacks: list[Callable[[], None]] = []  # (guarded by _ids)
        self._stats = self._core.stats()  # the latest snapshot, replaced under _lock

    # Engine interface
    def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateChunk, None]:
        """Validates now (InvalidRequestError); the request is queued when iteration starts (OverloadedError or
        EngineFailedError then). Closing the generator before the last chunk cancels the request."""
        prompt_ids = self._core.validate(request)
        return self._generate(request, prompt_ids)

    async def _generate(self, request: GenerateRequest, prompt_ids: list[int]
                        ) -> AsyncGenerator[GenerateChunk, None]:
        rid = request.request_id
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._ids:
            if self._failed:
                raise EngineFailedError("the engine failed (its step thread stopped) and serves no more requests; "
                                        "retry on another replica")
            if self._stopping:
                raise OverloadedError("engine is shut down")
            if rid in self._streams:
                raise InvalidRequestError("request_id", f"{rid!r} is already in use")
            # requests not yet scheduled may still have a running slot free: only running + waiting is a bound
            capacity = self._core.plan.request_slots + self._config.max_waiting_requests
            if len(self._streams) >= capacity:
                raise OverloadedError(f"{len(self._streams)} requests in the engine, as many as its running slots "
                                      f"({self._core.plan.request_slots}) and max_waiting_requests allow")
            self._streams[rid] = stream
        done = False
        try:
            self._inbox.put((request, prompt_ids))
            await self.start()
            self._wake.set()
            while not done:
                chunk = await stream.chunks.get()
                done = chunk.finish_reason is not None
                yield chunk
        finally:
            if not done:
                await self.cancel(rid)

    async def cancel(self, request_id: str) -> None:
        await asyncio.to_thread(self._cancel, request_id)

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def healthy(self) -> bool:
        return not self._failed

    def on_failure(self, callback: Callable[[], None]) -> None:
        with self._ids:
            failed = self._failed
            if not failed:
                self._failure_callbacks.append(callback)
        if failed:
            callback()

    def model_info(self) -> ModelInfo:
        return self._core.model_info()

    def config(self) -> dict[str, object]:
        plan = self._core.plan
        return {**asdict(self._config), "resolved_device": str(self._core.device),
                "resolved_dtype": dtype_name(self._core.dtype),
                "request_slots": plan.request_slots, "state_slots": plan.state_slots,
                "kv_cache_tokens": plan.kv_blocks * plan.block_size, "pool_bytes": plan.total_bytes}

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kvbuffer-engine", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        """Ends every request (finish_reason "cancelled"); later `generate` calls raise OverloadedError."""
        with self._ids:
            self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        with self._lock:
            self._drain()
            outputs = self._core.abort_all("cancelled")
            self._publish_stats()
            self._deliver(outputs)

    # the engine thread
    def _drain(self) -> None:
        """Moves queued requests into the core; one it cannot take ends at once with finish_reason "error"."""
        while True:
            try:
                request, prompt_ids = self._inbox.get_nowait()
            except queue.Empty:
                return
            if request.request_id in self._streams:  # not cancelled while in the inbox
                try:
                    self._core.add(request, prompt_ids)
                except Exception:
                    log.exception("could not queue request %s", request.request_id)
                    self._deliver([(request.request_id, GenerateChunk([], "", finish_reason="error"))])

    def _loop(self) -> None:
        failed_steps = 0  # in a row
        try:
            while True:
                self._wake.wait()
                self._wake.clear()  # before reading any state: a set() from here on is seen by the next wait()
                if self._stopping:
                    return
                with self._lock:
                    try:
                        self._drain()
                        outputs = self._core.step()
                        failed_steps = 0
                    except Exception as error:
                        failed_steps += 1
                        persistent = is_persistent(error) or failed_steps >= MAX_CONSECUTIVE_FAILED_STEPS
                        log.exception("engine step failed (%d in a row); ending the requests in flight%s",
                                      failed_steps, ": the failure persists, so the engine turns unhealthy"
                                      if persistent else "")
                        if persistent:
                            self._fail()  # first: health has turned by the time a client sees its request fail
                        outputs = self._core.abort_all("error")
                    if self._core.has_work():
                        self._wake.set()
                    self._publish_stats()
                self._deliver(outputs)
                if self._failed:
                    self._end_all_streams()  # those whose requests were still in the inbox
                    return
        except Exception:
            log.exception("engine thread failed; ending every request and refusing new ones")
            self._fail()
            self._end_all_streams()

    def _publish_stats(self) -> None:
        """Called with _lock held, after anything that changes the core's state."""
        self._stats = self._core.stats()

    def _cancel(self, request_id: str) -> None:
        with self._lock:
            self._drain()
            chunk = self._core.abort(request_id)
            self._publish_stats()
            if chunk is not None:
                self._deliver([(request_id, chunk)])

    def _deliver(self, outputs: list[tuple[str, GenerateChunk]]) -> None:
        """Hands chunks to their streams; a request's id is released with its last chunk."""
        for rid, chunk in outputs:
            with self._ids:
                stream = self._streams.pop(rid, None) if chunk.finish_reason else self._streams.get(rid)
            if stream is not None:
                _put(stream, chunk)

    def _fail(self) -> None:
        """Turns the engine unhealthy for good: new requests are refused, the loop stops after this step, and
        the `on_failure` callbacks run."""
        with self._ids:
            self._stopping = self._failed = True
            callbacks, self._failure_callbacks = self._failure_callbacks, []
        notify_failure(callbacks)

    def _end_all_streams(self) -> None:
        """The engine has failed: every stream still open ends with "error"."""
        with self._ids:
            streams, self._streams = self._streams, {}
        for stream in streams.values():
            _put(stream, GenerateChunk([], "", finish_reason="error"))


def _put(stream: _Stream, chunk: GenerateChunk) -> None:
    with contextlib.suppress(RuntimeError):  # the stream's event loop has closed: nobody is listening
        stream.loop.call_soon_threadsafe(stream.chunks.put_nowait, chunk)
