"""Capacity and shutdown: RESOURCE_EXHAUSTED beyond max_running_requests + max_waiting_requests (never an unbounded
queue), and the drain: health NOT_SERVING, new requests UNAVAILABLE, in-flight ones finish or are cancelled at the
end of the grace period, freeing the engine's memory. A failed engine: health NOT_SERVING, requests UNAVAILABLE."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest
from kvbuffer.service.engine import build_engine
from kvbuffer.service.server.app import Server, StartupError
from kvbuffer.service.server.settings import load_settings
from kvbuffer.v1 import kvbuffer_pb2 as pb
from service_harness import RunningServer

LONG = {"max_new_tokens": 3000, "ignore_eos": True}


async def _first_token(call: grpc.aio.UnaryStreamCall) -> None:
    async for response in call:
        if response.token_ids:
            return


def test_overload_is_resource_exhausted_and_recovers() -> None:
    server = RunningServer(max_running_requests=1, max_waiting_requests=1)
    try:
        async def go() -> None:
            async with server.client() as client:
                running = client.generate("first", **LONG)
                await _first_token(running)
                waiting = client.generate("second", **LONG)  # queued behind the first: no token yet
                assert await server.until(lambda: server.server.admission.in_flight == 2)
                for _ in range(3):
                    with pytest.raises(grpc.aio.AioRpcError) as error:
                        await client.generate_unary("third", max_new_tokens=2)
                    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "max_running_requests + max_waiting_requests" in error.value.details()
                running.cancel()
                waiting.cancel()
                assert await server.until(lambda: server.server.admission.in_flight == 0)
                assert len((await client.generate_unary("fourth", max_new_tokens=2)).token_ids) == 2

        asyncio.run(go())
        assert server.wait_until(lambda: server.server.engine.stats().running_requests == 0)
    finally:
        server.stop()


def test_drain_lets_in_flight_requests_finish() -> None:
    server = RunningServer(shutdown_grace_period_s=60)

    async def go() -> None:
        async with server.client() as client:
            call = client.generate("in flight", max_new_tokens=400, ignore_eos=True)
            await _first_token(call)
            drained = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(server.server.drain(), server._loop))
            statuses = [await client.health(""), await client.health()]
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await client.generate_unary("late", max_new_tokens=2)
            rest = [response async for response in call]
            await asyncio.wait_for(drained, 30)
        assert statuses == ["NOT_SERVING", "NOT_SERVING"]
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH and rest[-1].usage.completion_tokens == 400

    asyncio.run(go())
    server.stop()  # already drained: returns at once


def test_drain_cancels_what_outlives_the_grace_period() -> None:
    server = RunningServer(shutdown_grace_period_s=0.5)

    async def go() -> None:
        async with server.client() as client:
            call = client.generate("too long", **LONG)
            await _first_token(call)
            start = time.monotonic()
            server.run(server.server.drain())
            assert time.monotonic() - start < 10
            with pytest.raises(grpc.aio.AioRpcError) as error:
                async for _response in call:
                    pass
            assert error.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)

    asyncio.run(go())
    stats = server.server.engine.stats()
    assert (stats.running_requests, stats.state_slots_used, stats.buffer_slots_used) == (0, 0, 0)
    server.stop()


def test_engine_failure_turns_health_not_serving_and_requests_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine thread dies (a step fails and so does the recovery from it): the replica must stop attracting
    traffic, and say why to the requests that still reach it."""
    server = RunningServer()
    core = server.server.engine._core  # the native engine's, as in test_engine_async

    def broken(*_args: object) -> None:
        raise RuntimeError("injected failure")

    real_abort_all = core.abort_all
    try:
        async def go() -> None:
            async with server.client() as client:
                assert [await client.health(""), await client.health()] == ["SERVING", "SERVING"]
                monkeypatch.setattr(core.runner, "run", broken)
                monkeypatch.setattr(core, "abort_all", broken)
                in_flight = [response async for response in client.generate("doomed", max_new_tokens=4)]
                assert in_flight[-1].finish_reason == pb.FINISH_REASON_ERROR
                assert [await client.health(""), await client.health()] == ["NOT_SERVING", "NOT_SERVING"]
                for call in (lambda: client.generate_unary("late", max_new_tokens=2),
                             lambda: _drain(client.generate("late", max_new_tokens=2))):
                    with pytest.raises(grpc.aio.AioRpcError) as error:
                        await call()
                    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
                    assert "engine failed" in error.value.details()

        asyncio.run(go())
        assert not server.server.engine.healthy
    finally:
        monkeypatch.setattr(core, "abort_all", real_abort_all)  # the drain frees what the core still holds
        server.stop()


async def _drain(call: grpc.aio.UnaryStreamCall) -> None:
    async for _response in call:
        pass


@pytest.mark.parametrize("setting", ["port", "metrics_port"])
def test_port_in_use_fails_startup_naming_the_setting(setting: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = load_settings({"host": "127.0.0.1", "port": 0, "metrics_port": 0, "device": "cpu",
                                  setting: taken.getsockname()[1]})
        server = Server(settings, build_engine(settings.engine_config()))
        with pytest.raises(StartupError, match=rf"^{'host/port' if setting == 'port' else setting}: cannot"):
            asyncio.run(server.start())
