"""Admission at the service: a hard bound on requests in flight, and refusal of new ones while draining.

The engine bounds its own queue too; this bound holds even if it did not, so the service never builds an
unbounded backlog of handlers (each holding a prompt and a stream) in front of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from kvbuffer.service.engine.api import OverloadedError


class DrainingError(RuntimeError):
    """The server is shutting down and takes no new requests."""


class Admission:
    """Counts admitted requests (single event loop: no lock needed)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Holds one in-flight place for the duration of the block; raises DrainingError or OverloadedError."""
        if self.draining:
            raise DrainingError("the server is draining; retry on another replica")
        if self.in_flight >= self.limit:
            raise OverloadedError(f"{self.in_flight} requests in flight, the most this server admits "
                                  f"(max_running_requests + max_waiting_requests); retry later")
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuses new requests from now on and waits for the admitted ones; True if all finished in time."""
        self.draining = True
        idle = asyncio.ensure_future(self._idle.wait())
        await asyncio.wait([idle], timeout=timeout)  # returns at the timeout rather than raising (no TimeoutError
        idle.cancel()  # to catch, whose class differed before Python 3.11)
        return self._idle.is_set()
