"""`NativeEngine`: the `Engine` interface over `EngineCore`, with the step loop on a background thread.

Requests reach the loop through an inbox (no lock is taken on the event loop for `generate`); chunks come back
to each request's asyncio queue via `call_soon_threadsafe`. Cancelling (closing the iterator, or `cancel`)
takes the step lock, so when it returns the request's slots, buffer and KV blocks are already free.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

from .api import EngineStats, GenerateChunk, GenerateRequest, InvalidRequestError, ModelInfo, OverloadedError
from .config import EngineConfig
from .core import EngineCore

log = logging.getLogger(__name__)


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
        self._stopping = False

    # Engine interface
    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Validates now (InvalidRequestError); the request is queued when iteration starts (OverloadedError
        then). Closing the iterator before the last chunk cancels the request."""
        prompt_ids = self._core.validate(request)
        return self._generate(request, prompt_ids)

    async def _generate(self, request: GenerateRequest, prompt_ids: list[int]) -> AsyncIterator[GenerateChunk]:
        rid = request.request_id
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._ids:
            if rid in self._streams:
                raise InvalidRequestError("request_id", f"{rid!r} is already in use")
            waiting = self._inbox.qsize() + len(self._core.scheduler.waiting)
            if waiting >= self._config.max_waiting_requests:
                raise OverloadedError(f"{waiting} requests are waiting (max_waiting_requests)")
            self._streams[rid] = stream
        self._inbox.put((request, prompt_ids))
        await self.start()
        self._wake.set()
        done = False
        try:
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
        return self._core.stats()

    def model_info(self) -> ModelInfo:
        return self._core.model_info()

    def config(self) -> dict[str, object]:
        plan = self._core.plan
        return {**asdict(self._config), "resolved_device": str(self._core.device),
                "resolved_dtype": str(self._core.dtype).removeprefix("torch."),
                "request_slots": plan.request_slots, "state_slots": plan.state_slots,
                "kv_cache_tokens": plan.kv_blocks * plan.block_size, "pool_bytes": plan.total_bytes}

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kvbuffer-engine", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        with self._lock:
            self._drain()
            self._deliver(self._core.abort_all("cancelled"))

    # the engine thread
    def _drain(self) -> None:
        while True:
            try:
                request, prompt_ids = self._inbox.get_nowait()
            except queue.Empty:
                return
            if request.request_id in self._streams:  # not cancelled while in the inbox
                self._core.add(request, prompt_ids)

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            if self._stopping:
                return
            with self._lock:
                self._wake.clear()
                self._drain()
                try:
                    outputs = self._core.step()
                except Exception:
                    log.exception("engine step failed; ending the requests in flight")
                    outputs = self._core.abort_all("error")
                if self._core.has_work():
                    self._wake.set()
            self._deliver(outputs)

    def _cancel(self, request_id: str) -> None:
        with self._lock:
            self._drain()
            if (chunk := self._core.abort(request_id)) is not None:
                self._deliver([(request_id, chunk)])

    def _deliver(self, outputs: list[tuple[str, GenerateChunk]]) -> None:
        """Hands chunks to their streams; a request's id is released with its last chunk."""
        for rid, chunk in outputs:
            with self._ids:
                stream = self._streams.pop(rid) if chunk.finish_reason else self._streams.get(rid)
            if stream is not None and not stream.loop.is_closed():
                stream.loop.call_soon_threadsafe(stream.chunks.put_nowait, chunk)
