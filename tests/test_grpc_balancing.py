"""Client-side load balancing: one client target naming three `kvbuffer serve` replicas spreads its calls over all
of them (gRPC round_robin), as it would over a headless Service's pods; the server's maximum connection age
recycles connections without cutting the calls in flight."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator

import pytest
from kvbuffer.service.server.client import KVBufferClient
from kvbuffer.service.server.settings import load_settings
from kvbuffer.v1 import kvbuffer_pb2 as pb
from serve_subprocess import ServeProcess, start_all

REPLICAS = 3
OK_UNARY = frozenset({("method", "GenerateUnary"), ("status", "OK")})


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[ServeProcess]]:
    # The last one recycles its connections every 0.3 s: the stream test below outlives that age.
    servers = start_all([[], [], ["--max-connection-age-s", "0.3"]])
    yield servers
    for server in servers:
        server.stop()


def _ok_unary_calls(server: ServeProcess) -> float:
    return server.samples("kvbuffer_request_duration_seconds_count").get(OK_UNARY, 0.0)


def test_calls_spread_over_every_resolved_address(replicas: list[ServeProcess]) -> None:
    before = [_ok_unary_calls(server) for server in replicas]
    target = "ipv4:" + ",".join(server.address for server in replicas)
    calls = 8 * REPLICAS

    async def generate_all() -> list[pb.GenerateResponse]:
        async with KVBufferClient(target) as client:
            assert await client.health() == "SERVING"
            return [await client.generate_unary(random.choice(["spread", "me", "around"]), max_new_tokens=2)
                    for _ in range(calls)]

    responses = asyncio.run(generate_all())
    assert all(r.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP) for r in responses)
    served = [_ok_unary_calls(server) - base for server, base in zip(replicas, before, strict=True)]
    assert sum(served) == calls
    # pick_first (gRPC's default) would send all of them to one replica; round robin reaches each of them.
    assert all(count > 0 for count in served), served


def test_connection_age_does_not_cut_a_call_in_flight(replicas: list[ServeProcess]) -> None:
    aged = replicas[-1]
    tokens = random.randint(150, 250)

    async def stream_then_call() -> tuple[list[pb.GenerateResponse], str]:
        async with KVBufferClient(aged.address) as client:
            responses = [r async for r in client.generate("a long answer", max_new_tokens=tokens, ignore_eos=True)]
            await asyncio.sleep(0.5)  # past the age: the next call must find (or open) a live connection
            return responses, await client.health()

    responses, health = asyncio.run(stream_then_call())
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert sum(len(r.token_ids) for r in responses) == tokens
    assert health == "SERVING"


@pytest.mark.parametrize("value", ["-1", "soon"])
def test_connection_age_setting_is_validated(value: str) -> None:
    with pytest.raises(ValueError, match="max_connection_age_s"):
        load_settings({"max_connection_age_s": value})
