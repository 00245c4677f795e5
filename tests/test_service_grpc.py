"""The gRPC service over a real channel against the real engine (tiny model): streaming, unary, introspection,
health, reflection, bad requests, and cancellation freeing the engine's memory."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from kvbuffer.service.engine.api import EngineFailedError, OverloadedError
from kvbuffer.service.server.admission import DrainingError
from kvbuffer.service.server.servicer import status_of
from kvbuffer.v1 import SERVICE_NAME
from kvbuffer.v1 import kvbuffer_pb2 as pb
from kvbuffer.v1 import kvbuffer_pb2_grpc as pb_grpc
from qwen3_next_cases import fresh_seed
from service_harness import RunningServer, read_tokens


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = RunningServer()
    yield running
    running.stop()


def _stream(server: RunningServer, prompt: Any, **sampling: Any) -> list[pb.GenerateResponse]:
    async def go() -> list[pb.GenerateResponse]:
        async with server.client() as client:
            return [response async for response in client.generate(prompt, **sampling)]

    return asyncio.run(go())


def _unary(server: RunningServer, prompt: Any, **options: Any) -> pb.GenerateResponse:
    async def go() -> pb.GenerateResponse:
        async with server.client() as client:
            return await client.generate_unary(prompt, **options)

    return asyncio.run(go())


def _engine_idle(server: RunningServer) -> bool:
    stats = server.server.engine.stats()
    return (server.server.admission.in_flight == 0 and stats.running_requests == 0 and stats.waiting_requests == 0
            and stats.state_slots_used == 0 and stats.buffer_slots_used == 0)


def test_streaming_generate(server: RunningServer) -> None:
    responses = _stream(server, "Hello", max_new_tokens=100, ignore_eos=True)
    *deltas, final = responses
    assert len(responses) > 1
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED and not r.HasField("usage") for r in deltas)
    assert final.finish_reason == pb.FINISH_REASON_LENGTH
    assert sum(len(r.token_ids) for r in responses) == 100
    assert final.usage == pb.Usage(prompt_tokens=5, completion_tokens=100, total_tokens=105)  # byte tokenizer
    stats = final.stats
    assert stats.stateless_tokens + stats.buffered_tokens + stats.recurrent_tokens == 100
    assert stats.buffered_tokens > 0 and stats.flushes > 0  # 105 tokens overflow the 64-token buffer
    assert len({r.request_id for r in responses}) == 1 and len(final.request_id) == 32  # server-assigned


def test_unary_is_the_stream_merged(server: RunningServer) -> None:
    streamed = _stream(server, "The cat", max_new_tokens=40)
    whole = _unary(server, "The cat", max_new_tokens=40, request_id="my-request-1")
    assert whole.request_id == "my-request-1"
    assert list(whole.token_ids) == [t for r in streamed for t in r.token_ids]
    assert whole.text == "".join(r.text for r in streamed)
    assert (whole.finish_reason, whole.usage, whole.stats) == (streamed[-1].finish_reason, streamed[-1].usage,
                                                               streamed[-1].stats)


def test_token_id_prompt_with_logprobs_and_stop_token(server: RunningServer) -> None:
    free = _unary(server, [72, 105, 33], max_new_tokens=20, ignore_eos=True, logprobs=True)
    assert free.usage.prompt_tokens == 3
    assert len(free.logprobs) == len(free.token_ids) == 20
    assert all(math.isfinite(lp) and lp <= 0 for lp in free.logprobs)
    stop_at = free.token_ids[4]
    stopped = _unary(server, [72, 105, 33], max_new_tokens=20, ignore_eos=True, stop_token_ids=[stop_at])
    assert stopped.finish_reason == pb.FINISH_REASON_STOP
    assert stopped.token_ids[-1] == stop_at and len(stopped.token_ids) <= 5


def test_model_info_and_server_config(server: RunningServer) -> None:
    async def go() -> tuple[pb.ModelInfo, pb.ServerConfig]:
        async with server.client() as client:
            return await client.model_info(), await client.server_config()

    info, config = asyncio.run(go())
    assert (info.name, info.vocab_size, info.num_linear_attention_layers) == ("embedded:tiny-qwen3-next", 257, 3)
    assert (info.device, info.dtype) == ("cpu", "float32")
    settings = server.settings
    assert config.engine == "native"
    assert (config.buffer_size, config.chunk_size, config.decode_mode) == (settings.buffer_size, settings.chunk_size,
                                                                           settings.decode_mode)
    assert (config.max_waiting_requests, config.cuda_graph_max_batch) == (settings.max_waiting_requests,
                                                                          settings.cuda_graph_max_batch)


def test_health_is_serving(server: RunningServer) -> None:
    async def go() -> tuple[str, str]:
        async with server.client() as client:
            return await client.health(""), await client.health()

    assert asyncio.run(go()) == ("SERVING", "SERVING")


def test_reflection_describes_the_api(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        methods = {m.name for m in descriptor_pool.DescriptorPool(database).FindServiceByName(SERVICE_NAME).methods}
    assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    assert methods == {"Generate", "GenerateUnary", "GetModelInfo", "GetServerConfig"}


def _request(prompt: Any = "hi", request_id: str = "", **sampling: Any) -> pb.GenerateRequest:
    request = pb.GenerateRequest(request_id=request_id, sampling=pb.SamplingParams(**sampling))
    if isinstance(prompt, str):
        request.text = prompt
    elif prompt is not None:
        request.token_ids.ids.extend(prompt)
    return request


BAD_REQUESTS = [
    (_request(None), "prompt"),
    (_request(""), "text"),
    (_request([]), "token_ids.ids"),
    (_request([1, 257]), "token_ids.ids[1]"),
    (_request([0] * 4096), "token_ids.ids"),
    (_request(request_id="x" * 129), "request_id"),
    (_request(request_id="naïve"), "request_id"),
    (_request(max_new_tokens=0), "sampling.max_new_tokens"),
    (_request(max_new_tokens=5000), "sampling.max_new_tokens"),
    (_request(temperature=-0.5), "sampling.temperature"),
    (_request(temperature=math.nan), "sampling.temperature"),
    (_request(top_p=0.0), "sampling.top_p"),
    (_request(top_p=1.5), "sampling.top_p"),
    (_request(stop_token_ids=[300]), "sampling.stop_token_ids[0]"),
    (_request(stop_token_ids=list(range(65))), "sampling.stop_token_ids"),
    (_request(stop_strings=["ok", ""]), "sampling.stop_strings[1]"),
    (_request(stop_strings=["s"] * 17), "sampling.stop_strings"),
    (_request(stop_strings=["ok", "s" * 257]), "sampling.stop_strings[1]"),
]


@pytest.mark.parametrize(("request_message", "field"), BAD_REQUESTS, ids=[f for _, f in BAD_REQUESTS])
def test_bad_request_is_invalid_argument_naming_the_field(server: RunningServer, request_message: pb.GenerateRequest,
                                                          field: str) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.KVBufferServiceStub(channel)
        for call in (stub.GenerateUnary, lambda r: list(stub.Generate(r))):
            with pytest.raises(grpc.RpcError) as error:
                call(request_message)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.value.details().startswith(f"{field}: ")
    assert _engine_idle(server)


def test_errors_map_to_statuses_subclasses_included() -> None:
    class QueueFull(OverloadedError):
        pass

    assert status_of(QueueFull("full")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(DrainingError("draining")) == grpc.StatusCode.UNAVAILABLE
    assert status_of(EngineFailedError("failed")) == grpc.StatusCode.UNAVAILABLE


def test_prompt_longer_than_the_context_is_refused_by_the_engine(server: RunningServer) -> None:
    """The service cannot count a text prompt's tokens; the engine's refusal maps to INVALID_ARGUMENT too."""
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as error:
        pb_grpc.KVBufferServiceStub(channel).GenerateUnary(_request("x" * 5000))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("text: 5000 tokens leave no room")  # the proto's name of the prompt


def test_client_cancel_frees_the_engine_request(server: RunningServer) -> None:
    async def go() -> None:
        async with server.client() as client:
            call = client.generate("cancel me", max_new_tokens=3000, ignore_eos=True)
            await read_tokens(call, 80)  # past buffer_size: the request holds a state slot now
            assert server.call(lambda: server.server.engine.stats().state_slots_used) == 1
            call.cancel()

    asyncio.run(go())
    assert server.wait_until(lambda: _engine_idle(server))


def test_deadline_frees_the_engine_request(server: RunningServer) -> None:
    async def go() -> None:
        async with server.client() as client:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await client.generate_unary("slow", max_new_tokens=3000, ignore_eos=True, timeout=0.5)
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    asyncio.run(go())
    assert server.wait_until(lambda: _engine_idle(server))
    assert len(_unary(server, "after", max_new_tokens=3).token_ids) == 3  # and the server is fine


def test_undecodable_request_is_invalid_argument_with_at_most_a_warning(server: RunningServer,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Bytes that are not a GenerateRequest: INVALID_ARGUMENT, no traceback, and a flood of them logs one warning."""
    caplog.set_level(logging.INFO)
    with grpc.insecure_channel(server.target) as channel:
        calls = [channel.unary_unary(f"/{SERVICE_NAME}/GenerateUnary"),
                 lambda payload: list(channel.unary_stream(f"/{SERVICE_NAME}/Generate")(payload))]
        for i in range(40):  # not a message; `text` that is not UTF-8
            with pytest.raises(grpc.RpcError) as error:
                calls[i % 2]((b"\xff\xff\xff", b"\x12\x02\xc3\x28")[i // 2 % 2])
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.value.details().startswith("request: not a valid kvbuffer.v1.GenerateRequest")
    assert len(_unary(server, "still here", max_new_tokens=2).token_ids) == 2
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_a_long_prompts_token_counts_as_buffered(server: RunningServer) -> None:
    """A prompt past buffer_size is prefilled into a checkpoint: its token is not counted stateless."""
    rng = random.Random(fresh_seed())
    final = _unary(server, [rng.randrange(256) for _ in range(1000)], max_new_tokens=1)
    assert (final.stats.stateless_tokens, final.stats.buffered_tokens) == (0, 1)


def test_a_prompt_is_length_checked_before_its_ids(server: RunningServer) -> None:
    """A huge token-id prompt is refused for its length before a single id is converted or range-checked."""
    prompt = [1] * 1_000_000
    prompt[0] = 999_999  # outside the vocabulary: a range check run first would name token_ids.ids[0]
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as error:
        pb_grpc.KVBufferServiceStub(channel).GenerateUnary(_request(prompt))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("token_ids.ids: 1000000 tokens leave no room")


def test_text_prompts_are_tokenized_off_the_event_loop(server: RunningServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokenizing a long prompt takes milliseconds: on the event loop it would hold every other stream."""
    tokenizer = server.server.engine._core.tokenizer  # the native engine's
    threads: list[str] = []

    def encode(text: str) -> list[int]:
        threads.append(threading.current_thread().name)
        return type(tokenizer).encode(tokenizer, text)

    monkeypatch.setattr(tokenizer, "encode", encode)
    assert len(_unary(server, "tokenize me", max_new_tokens=2).token_ids) == 2
    assert threads and "kvbuffer-test-server" not in threads  # the harness's event-loop thread


@pytest.mark.parametrize("seed", [2**63, 2**64 - 1])
def test_seeds_take_the_whole_uint64_range(server: RunningServer, seed: int) -> None:
    runs = [_unary(server, "seeded", max_new_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)
            for _ in range(2)]
    assert runs[0].token_ids == runs[1].token_ids and len(runs[0].token_ids) == 12
