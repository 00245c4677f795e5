"""Capacity and shutdown: RESOURCE_EXHAUSTED beyond max_running_requests + max_waiting_requests (never an unbounded
queue), and the drain: health NOT_SERVING, new requests UNAVAILABLE, in-flight ones finish or are cancelled at the
end of the grace period, freeing the engine's memory. A failed engine: health NOT_SERVING, requests UNAVAILABLE."""

from __future__ import annotations

import asyncio
import logging
import socket

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


def test_drain_ends_what_outlives_the_grace_period_with_a_cancelled_final_message() -> None:
    """Streams and unary calls still running when the grace period ends get their final response, finish reason
    CANCELLED with usage and stats, and status OK; then the server stops with the engine's memory free."""
    server = RunningServer(shutdown_grace_period_s=0.5)

    async def go() -> None:
        async with server.client() as client:
            streams = [client.generate(f"too long {i}", **LONG) for i in range(3)]
            for call in streams:
                await _first_token(call)
            unary = asyncio.ensure_future(client.generate_unary("too long unary", **LONG))
            assert await server.until(lambda: server.server.admission.in_flight == 4)
            drained = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(server.server.drain(), server._loop))
            for call in streams:
                rest = [response async for response in call]
                final = rest[-1]
                assert final.finish_reason == pb.FINISH_REASON_CANCELLED
                assert await call.code() == grpc.StatusCode.OK
                received = 1 + sum(len(r.token_ids) for r in rest)  # _first_token consumed one token
                assert final.usage.completion_tokens >= received > 1
                stats = final.stats
                assert stats.stateless_tokens + stats.buffered_tokens + stats.recurrent_tokens == (
                    final.usage.completion_tokens)
            whole = await unary
            assert whole.finish_reason == pb.FINISH_REASON_CANCELLED
            assert whole.usage.completion_tokens == len(whole.token_ids) > 0
            await asyncio.wait_for(drained, 30)

    asyncio.run(go())
    stats = server.server.engine.stats()
    assert (stats.running_requests, stats.state_slots_used, stats.buffer_slots_used) == (0, 0, 0)
    server.stop()


def test_a_burst_within_running_capacity_is_admitted() -> None:
    """Requests handed to the engine but not yet scheduled have running slots waiting for them: with room for 64
    running requests and 1 waiting, 32 concurrent requests all succeed."""
    server = RunningServer(max_waiting_requests=1)
    try:
        async def go() -> list[pb.GenerateResponse]:
            async with server.client() as client:
                return await asyncio.gather(*(client.generate_unary(f"burst {i}", max_new_tokens=8, ignore_eos=True)
                                              for i in range(32)))

        responses = asyncio.run(go())
        assert [r.usage.completion_tokens for r in responses] == [8] * 32
    finally:
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
                doomed = client.generate("doomed", max_new_tokens=4)
                with pytest.raises(grpc.aio.AioRpcError) as ended:
                    await _drain(doomed)
                assert ended.value.code() == grpc.StatusCode.UNAVAILABLE  # this replica is gone: retry elsewhere
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


def test_persistently_failing_steps_turn_health_not_serving_and_fail_their_requests(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every step raises (an error that does not clear): each request ends with a non-OK status, streams after
    their final FINISH_REASON_ERROR message; after MAX_CONSECUTIVE_FAILED_STEPS the replica reports NOT_SERVING
    and refuses new requests UNAVAILABLE, and its spans and metrics record the failures."""
    from kvbuffer.service.engine.engine import MAX_CONSECUTIVE_FAILED_STEPS

    server = RunningServer()

    def broken(*_args: object) -> None:
        raise RuntimeError("injected failure")

    try:
        async def go() -> None:
            async with server.client() as client:
                monkeypatch.setattr(server.server.engine._core.runner, "run", broken)
                for i in range(MAX_CONSECUTIVE_FAILED_STEPS):
                    assert await client.health() == "SERVING"
                    call = client.generate(f"failing {i}", max_new_tokens=4)
                    with pytest.raises(grpc.aio.AioRpcError) as error:
                        async for response in call:
                            assert response.finish_reason in (pb.FINISH_REASON_UNSPECIFIED, pb.FINISH_REASON_ERROR)
                    last = i == MAX_CONSECUTIVE_FAILED_STEPS - 1
                    assert error.value.code() == (grpc.StatusCode.UNAVAILABLE if last else grpc.StatusCode.INTERNAL)
                    assert "engine" in error.value.details()
                assert [await client.health(""), await client.health()] == ["NOT_SERVING", "NOT_SERVING"]
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await client.generate_unary("late", max_new_tokens=2)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        asyncio.run(go())
    finally:
        server.stop()


def test_startup_log_says_what_was_loaded(caplog: pytest.LogCaptureFixture) -> None:
    """One info line names the model, device, dtype, decode mode, buffer and chunk sizes, and the pools sized from
    memory_budget_bytes (their slots and bytes), as the engine reports them."""
    caplog.set_level(logging.INFO)
    server = RunningServer(buffer_size=48, chunk_size=16)
    try:
        config = server.server.engine.config()
    finally:
        server.stop()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "loaded" in r.getMessage()]
    assert len(lines) == 1, lines
    for fact in ("model embedded:tiny-qwen3-next", "device cpu", "dtype float32", "decode_mode kvbuffer",
                 "buffer_size 48", "chunk_size 16", f"request_slots {config['request_slots']}",
                 f"state_slots {config['state_slots']}", f"kv_cache_tokens {config['kv_cache_tokens']}",
                 f"pools {config['pool_bytes'] / 2**20:.1f} MiB"):
        assert fact in lines[0], (fact, lines[0])
