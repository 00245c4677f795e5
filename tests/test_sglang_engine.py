"""Engine sglang: the adapter between the gRPC service and SGLang, driven through the real server over loopback with
a stand-in for `sglang.Engine` (tests/sglang_standin.py says why and what it reproduces of SGLang 0.5.17).

Oracle: the stand-in records every id and the whole text it produced and the arguments it was called with; the
streamed responses must add up to exactly that, finish for the reason it finished, and the arguments must be the
request's, mapped one to one."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import signal
import threading
from typing import Any

import grpc
import pytest
from kvbuffer.service.engine.api import GenerateChunk, GenerateRequest, InvalidRequestError, SamplingParams
from kvbuffer.service.server import app
from kvbuffer.service.server.app import Server
from kvbuffer.service.server.client import KVBufferClient
from kvbuffer.service.server.settings import ServiceSettings, load_settings
from kvbuffer.service.sglang.engine import SAMPLING_FIELDS, SGLangEngine, sglang_sampling
from kvbuffer.v1 import kvbuffer_pb2 as pb
from service_harness import RunningServer, read_tokens
from sglang_standin import EOS, SPECIAL, StandInSGLang, continuation, logprob_of, make_tokenizer, prompts

FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def serve(tokenizer: Any, stand_in: dict[str, Any] | None = None, **settings: Any) -> tuple[RunningServer,
                                                                                               StandInSGLang]:
    engine = StandInSGLang(tokenizer, **(stand_in or {}))

    def make(s: ServiceSettings) -> SGLangEngine:
        return SGLangEngine(s, lambda: engine)

    server = RunningServer(make_engine=make, **{"engine": "sglang", "model": "/models/qwen3-next", "device": "auto",
                                                **settings})
    return server, engine


async def collect(call: grpc.aio.UnaryStreamCall) -> list[pb.GenerateResponse]:
    return [response async for response in call]


def test_stream_deltas_add_up_to_what_sglang_produced(tokenizer: Any) -> None:
    """Several concurrent requests, SGLang's outputs sometimes coalescing steps: ids, text, logprobs and usage."""
    rng = random.Random()
    server, engine = serve(tokenizer, {"coalesce": rng.choice([1, 2, 3])}, decode_mode="recurrent")
    try:
        async def go() -> None:
            async with server.client() as client:
                batch = prompts(rng, 6, len(tokenizer))
                lengths = [rng.randrange(1, 40) for _ in batch]
                streams = await asyncio.gather(*(collect(client.generate(p, max_new_tokens=n, logprobs=True))
                                                 for p, n in zip(batch, lengths, strict=True)))
                for prompt, n, responses in zip(batch, lengths, streams, strict=True):
                    rid = next(r for r, call in engine.received.items() if call["input_ids"] == prompt)
                    ids = [t for r in responses for t in r.token_ids]
                    assert ids == engine.outputs[rid]
                    assert "".join(r.text for r in responses) == engine.texts[rid]
                    assert [round(x, 4) for r in responses for x in r.logprobs] == \
                        [logprob_of(prompt + ids[:i], t) for i, t in enumerate(ids)]
                    last = responses[-1]
                    early = prompt[0] % 5 == 0 and n > 4  # the stand-in ends those on end-of-sequence
                    assert last.finish_reason == (pb.FINISH_REASON_STOP if early else pb.FINISH_REASON_LENGTH)
                    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt), len(ids))
                    assert last.stats.recurrent_tokens == len(ids) and last.stats.buffered_tokens == 0
                    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])

        asyncio.run(go())
        stats = server.call(server.server.engine.stats)
        assert stats.tokens_by_path["recurrent"] == sum(len(ids) for ids in engine.outputs.values())
        assert (stats.running_requests, stats.waiting_requests) == (0, 0)
    finally:
        server.stop()


def test_finish_reasons_stop_token_stop_string_and_length(tokenizer: Any) -> None:
    rng = random.Random()
    vocab = len(tokenizer) + 24
    server, _ = serve(tokenizer, decode_mode="kvbuffer")
    try:
        async def go() -> None:
            async with server.client() as client:
                prompt = next(p for p in prompts(rng, 50, len(tokenizer)) if p[0] % 5)
                future = continuation(prompt, 12, vocab)
                stop_at = rng.randrange(2, 10)
                by_token = await client.generate_unary(prompt, max_new_tokens=30,
                                                       stop_token_ids=[future[stop_at]])
                assert list(by_token.token_ids) == future[:future.index(future[stop_at]) + 1]
                assert by_token.finish_reason == pb.FINISH_REASON_STOP

                text = tokenizer.decode(future, skip_special_tokens=True)
                cut = rng.randrange(4, len(text) - 2)
                stop = text[cut:cut + 2]
                by_string = await client.generate_unary(prompt, max_new_tokens=30, stop_strings=[stop])
                assert by_string.finish_reason == pb.FINISH_REASON_STOP
                assert by_string.text == text[:text.index(stop)]

                eos = next(p for p in prompts(rng, 50, len(tokenizer)) if p[0] % 5 == 0)
                ended = await client.generate_unary(eos, max_new_tokens=30)
                assert ended.finish_reason == pb.FINISH_REASON_STOP and ended.token_ids[-1] == EOS
                ignored = await client.generate_unary(eos, max_new_tokens=30, ignore_eos=True)
                assert ignored.finish_reason == pb.FINISH_REASON_LENGTH and len(ignored.token_ids) == 30
                assert ignored.stats.buffered_tokens == 30  # decode_mode kvbuffer: the plugin's path

        asyncio.run(go())
    finally:
        server.stop()


def test_sampling_parameters_reach_sglang_one_to_one(tokenizer: Any) -> None:
    rng = random.Random()
    server, engine = serve(tokenizer, sglang={"enable_deterministic_inference": True})
    prompt = prompts(rng, 1, len(tokenizer))[0]
    sampling: dict[str, Any] = {}
    try:
        async def go() -> None:
            async with server.client() as client:
                sampling.update({"max_new_tokens": rng.randrange(1, 20), "temperature": rng.uniform(0.1, 2.0),
                            "top_p": rng.uniform(0.1, 1.0), "top_k": rng.randrange(1, 50),
                            "seed": rng.randrange(2**63), "stop_token_ids": [rng.randrange(3, 300)],
                            "stop_strings": ["zz", "qq"]})
                await client.generate_unary(prompt, **sampling)
                await client.generate_unary(prompt, max_new_tokens=3)
                await client.generate_unary("text is tokenized with the model's tokenizer", max_new_tokens=3)

        asyncio.run(go())
        calls = list(engine.received.values())
        assert calls[0]["sampling_params"] == {
            "max_new_tokens": sampling["max_new_tokens"], "temperature": pytest.approx(sampling["temperature"]),
            "top_p": pytest.approx(sampling["top_p"]), "top_k": sampling["top_k"], "sampling_seed": sampling["seed"],
            "stop_token_ids": sampling["stop_token_ids"], "stop": ["zz", "qq"], "ignore_eos": False}
        assert calls[1]["sampling_params"] == {"max_new_tokens": 3, "temperature": 0.0, "top_p": 1.0, "top_k": -1,
                                               "ignore_eos": False}
        assert calls[0]["input_ids"] == prompt and not calls[0]["return_logprob"]
        assert calls[2]["input_ids"] == tokenizer.encode("text is tokenized with the model's tokenizer")
    finally:
        server.stop()


def test_sampling_mapping_is_exact_and_never_drops_a_field() -> None:
    rng = random.Random()
    params = SamplingParams(max_new_tokens=rng.randrange(5, 50), temperature=rng.uniform(0.1, 2),
                            top_p=rng.uniform(0.1, 1), top_k=rng.randrange(1, 100), seed=rng.randrange(2**62),
                            stop_token_ids=(rng.randrange(100),), stop_strings=("end",), logprobs=True)
    assert sglang_sampling(params, room=1000, deterministic=True) == {
        "max_new_tokens": params.max_new_tokens, "temperature": params.temperature, "top_p": params.top_p,
        "top_k": params.top_k, "sampling_seed": params.seed, "stop_token_ids": list(params.stop_token_ids),
        "stop": ["end"], "ignore_eos": False}
    assert sglang_sampling(params, room=3, deterministic=True)["max_new_tokens"] == 3  # capped at the context
    assert set(SAMPLING_FIELDS) == {f.name for f in dataclasses.fields(SamplingParams)}

    with pytest.raises(InvalidRequestError) as error:  # SGLang ignores seeds outside deterministic mode
        sglang_sampling(params, room=1000, deterministic=False)
    assert error.value.field == "sampling.seed"
    greedy = dataclasses.replace(params, temperature=0.0)
    assert sglang_sampling(greedy, room=1000, deterministic=False)["sampling_seed"] == params.seed

    @dataclasses.dataclass(frozen=True)
    class Wider(SamplingParams):  # a field added to the API that the mapping does not know yet
        min_p: float = 0.0

    assert "min_p" not in sglang_sampling(Wider(), room=10, deterministic=False)
    with pytest.raises(InvalidRequestError) as error:
        sglang_sampling(Wider(min_p=0.5), room=10, deterministic=False)
    assert error.value.field == "sampling.min_p"


def test_bad_requests_are_refused_before_sglang_sees_them(tokenizer: Any) -> None:
    server, engine = serve(tokenizer, {"context_len": 64})
    vocab = len(tokenizer) + 24
    try:
        async def go() -> None:
            async with server.client() as client:
                cases = [({"prompt": [5] * 64}, "token_ids.ids"),
                         ({"prompt": [5] * 58}, "token_ids.ids"),  # SGLang's scheduler takes 64 - 6 tokens at most
                         ({"prompt": [5, vocab]}, "token_ids.ids[1]"),
                         ({"prompt": [5], "stop_token_ids": [vocab + 3]}, "sampling.stop_token_ids[0]"),
                         ({"prompt": [5], "top_p": 1.5}, "sampling.top_p"),
                         ({"prompt": [5], "max_new_tokens": 65}, "sampling.max_new_tokens"),
                         ({"prompt": [5], "temperature": 0.7, "seed": 3}, "sampling.seed"),
                         ({"prompt": [5], "stop_token_ids": [7], "ignore_eos": True}, "sampling.stop_token_ids")]
                for request, field in cases:
                    prompt = request.pop("prompt")
                    request.setdefault("max_new_tokens", 8)
                    with pytest.raises(grpc.aio.AioRpcError) as error:
                        await client.generate_unary(prompt, **request)
                    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert error.value.details().startswith(f"{field}:")
                ok = await client.generate_unary([5] * 54, max_new_tokens=58, ignore_eos=True)
                assert ok.finish_reason == pb.FINISH_REASON_LENGTH and len(ok.token_ids) == 4  # the context's end

        asyncio.run(go())
        assert len(engine.received) == 1
    finally:
        server.stop()


def test_the_context_length_is_what_sglang_serves(tokenizer: Any) -> None:
    """GetModelInfo's max_context_length is what SGLang's scheduler serves: a prompt just short of it runs, and a
    request asking for the most tokens ends by "length" exactly at it (SGLang neither refuses the prompt nor cuts
    max_new_tokens short)."""
    rng = random.Random()
    server, engine = serve(tokenizer, {"context_len": rng.randrange(40, 200)})
    try:
        async def go() -> None:
            async with server.client() as client:
                limit = (await client.model_info()).max_context_length
                for length in (limit - 1, rng.randrange(1, limit - 1)):
                    prompt = [rng.randrange(len(SPECIAL), len(tokenizer)) for _ in range(length)]
                    response = await client.generate_unary(prompt, max_new_tokens=limit, ignore_eos=True)
                    assert response.finish_reason == pb.FINISH_REASON_LENGTH
                    assert list(response.token_ids) == continuation(prompt, limit - length, engine.vocab_size)

        asyncio.run(go())
    finally:
        server.stop()


def test_cancelling_one_request_leaves_those_whose_ids_it_begins(tokenizer: Any) -> None:
    """SGLang's scheduler aborts every request whose rid starts with the aborted rid: request ids that are prefixes of
    one another (the Engine interface allows any) must not cancel each other."""
    rng = random.Random()
    server, engine = serve(tokenizer, {"step_s": 0.01})
    ids = ["r" + "0" * n for n in range(rng.randrange(2, 5))]
    cancelled = rng.choice(ids[:-1])

    async def run(request_id: str, prompt: list[int]) -> list[GenerateChunk]:
        chunks: list[GenerateChunk] = []
        generator = server.server.engine.generate(GenerateRequest(request_id, prompt_token_ids=tuple(prompt),
                                                                  sampling=SamplingParams(max_new_tokens=30,
                                                                                          ignore_eos=True)))
        async for chunk in generator:
            chunks.append(chunk)
            if request_id == cancelled and len(chunks) == 3:
                await generator.aclose()
                break
        return chunks

    batch = prompts(rng, len(ids), len(tokenizer))
    try:
        async def go() -> list[list[GenerateChunk]]:
            return await asyncio.gather(*(run(request_id, prompt) for request_id, prompt in zip(ids, batch,
                                                                                                strict=True)))

        streams = server.run(go())
        for request_id, prompt, chunks in zip(ids, batch, streams, strict=True):
            if request_id != cancelled:
                assert chunks[-1].finish_reason == "length"
                assert [t for c in chunks for t in c.token_ids] == continuation(prompt, 30, engine.vocab_size)
        assert server.wait_until(lambda: not engine.active) and len(engine.aborted) == 1
    finally:
        server.stop()


def test_cancel_and_deadline_abort_the_request_in_sglang(tokenizer: Any) -> None:
    server, engine = serve(tokenizer, {"step_s": 0.02})
    try:
        async def go() -> None:
            async with server.client() as client:
                call = client.generate([7, 8, 9], max_new_tokens=500, ignore_eos=True)
                await read_tokens(call, 3)
                call.cancel()
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await client.generate_unary([7, 8], max_new_tokens=500, ignore_eos=True, timeout=0.3)
                assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        asyncio.run(go())
        assert server.wait_until(lambda: not engine.active and len(engine.aborted) == 2)
        assert set(engine.aborted) == set(engine.received)
        stats = server.call(server.server.engine.stats)
        assert (stats.running_requests, stats.waiting_requests, stats.state_slots_used) == (0, 0, 0)
    finally:
        server.stop()


def test_cancel_before_sglang_registers_the_request_never_runs_it(tokenizer: Any) -> None:
    """A client cancel and a deadline that come after the adapter asked SGLang for the request but before SGLang
    registered it (there, SGLang's abort_request does nothing): SGLang never runs the request, the call ends at
    once, and the only running slot serves the next request straight away."""
    rng = random.Random()
    vocab = len(tokenizer) + 24
    delay = 1.0
    server, engine = serve(tokenizer, {"step_s": 0.02, "register_delay_s": delay, "max_running_requests": 1})
    cancelled, expired, after = prompts(rng, 3, len(tokenizer))
    try:
        async def go() -> None:
            async with server.client() as client:
                call = client.generate(cancelled, max_new_tokens=500, ignore_eos=True)
                assert await server.until(lambda: len(engine.received) == 1)
                call.cancel()
                assert await call.code() == grpc.StatusCode.CANCELLED
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await client.generate_unary(expired, max_new_tokens=500, ignore_eos=True, timeout=delay / 2)
                assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                assert await server.until(lambda: server.server.admission.in_flight == 0, timeout=2 * delay)
                n = rng.randrange(1, 10)
                async with asyncio.timeout(3 * delay):
                    response = await client.generate_unary(after, max_new_tokens=n, ignore_eos=True)
                assert list(response.token_ids) == continuation(after, n, vocab)

        asyncio.run(go())
        assert [call["input_ids"] for call in engine.received.values()] == [cancelled, expired, after]
        assert list(engine.outputs) == [next(r for r, call in engine.received.items() if call["input_ids"] == after)]
        assert not engine.active and not engine.registered
        stats = server.call(server.server.engine.stats)
        assert (stats.running_requests, stats.waiting_requests) == (0, 0)
    finally:
        server.stop()


def test_overload_is_resource_exhausted_at_the_service_and_at_sglang(tokenizer: Any) -> None:
    server, engine = serve(tokenizer, {"step_s": 0.02, "max_running_requests": 1, "max_queued_requests": 0},
                           max_running_requests=1, max_waiting_requests=1)
    try:
        async def go() -> None:
            async with server.client() as client:
                running = client.generate([3, 4], max_new_tokens=500, ignore_eos=True)
                await anext(aiter(running))
                with pytest.raises(grpc.aio.AioRpcError) as sglang_full:  # SGLang's queue (max_queued_requests)
                    await client.generate_unary([5, 6], max_new_tokens=2)
                waiting = client.generate([9, 9], max_new_tokens=500, ignore_eos=True)  # now refused by SGLang
                with pytest.raises(grpc.aio.AioRpcError) as waiting_error:
                    await collect(waiting)
                running.cancel()
                for error in (sglang_full, waiting_error):
                    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert "max_waiting_requests" in error.value.details()
                assert await server.until(lambda: server.server.admission.in_flight == 0)
                assert len((await client.generate_unary([1, 5], max_new_tokens=2, ignore_eos=True)).token_ids) == 2

        asyncio.run(go())
    finally:
        server.stop()

    server, engine = serve(tokenizer, {"step_s": 0.02}, max_running_requests=1, max_waiting_requests=1)
    try:
        async def service_bound() -> None:
            async with server.client() as client:
                calls = [client.generate([3, i], max_new_tokens=500, ignore_eos=True) for i in (4, 5)]
                await anext(aiter(calls[0]))
                assert await server.until(lambda: server.server.admission.in_flight == 2)
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await client.generate_unary([5, 6], max_new_tokens=2)
                assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                for call in calls:
                    call.cancel()

        asyncio.run(service_bound())
        assert server.wait_until(lambda: not engine.active)
    finally:
        server.stop()


def test_sglang_failure_is_unavailable_and_not_serving(tokenizer: Any) -> None:
    server, _ = serve(tokenizer, {"fail_after": 2})
    try:
        async def go() -> None:
            async with server.client() as client:
                assert await client.health() == "SERVING"
                responses: list[pb.GenerateResponse] = []
                with pytest.raises(grpc.aio.AioRpcError) as ended:  # the final ERROR message, then a non-OK status
                    async for response in client.generate([4, 4, 4], max_new_tokens=50, ignore_eos=True):
                        responses.append(response)
                assert responses[-1].finish_reason == pb.FINISH_REASON_ERROR
                assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
                assert [await client.health(""), await client.health()] == ["NOT_SERVING", "NOT_SERVING"]
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await client.generate_unary([4], max_new_tokens=2)
                assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "engine failed" in error.value.details()

        asyncio.run(go())
        assert not server.server.engine.healthy
    finally:
        server.stop()


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_a_dying_sglang_process_fails_the_engine_not_the_server(tokenizer: Any) -> None:
    """SGLang's watchdog sends SIGQUIT when one of its processes dies; the adapter, on the main thread's loop,
    takes it: open streams end with "error", health turns NOT_SERVING, and the server process lives on."""
    engine = StandInSGLang(tokenizer, step_s=0.02)
    settings = load_settings({"engine": "sglang", "model": "/models/qwen3-next", "host": "127.0.0.1", "port": 0,
                              "metrics_port": 0})

    async def go() -> None:
        server = Server(settings, SGLangEngine(settings, lambda: engine))
        await server.start()
        try:
            async with KVBufferClient(f"127.0.0.1:{server.port}") as client:
                call = client.generate([6, 6], max_new_tokens=500, ignore_eos=True)
                await anext(aiter(call))
                os.kill(os.getpid(), signal.SIGQUIT)
                rest: list[pb.GenerateResponse] = []
                with pytest.raises(grpc.aio.AioRpcError) as ended:  # the final ERROR message, then UNAVAILABLE
                    async for response in call:
                        rest.append(response)
                assert rest[-1].finish_reason == pb.FINISH_REASON_ERROR
                assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
                assert await client.health() == "NOT_SERVING"
        finally:
            await server.drain()

    try:
        asyncio.run(go())
    finally:
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    assert engine.shut_down


def test_model_info_and_server_config_come_from_sglang(tokenizer: Any) -> None:
    server, _ = serve(tokenizer, {"context_len": 300}, max_running_requests=4, speculative_algorithm="nextn",
                           speculative_num_draft_tokens=3)
    try:
        async def go() -> None:
            async with server.client() as client:
                info = await client.model_info()
                config = await client.server_config()
                assert (info.architecture, info.vocab_size, info.max_context_length, info.num_layers,
                        info.num_linear_attention_layers, info.dtype) == (
                    "Qwen3NextForCausalLM", len(tokenizer) + 24, 300 - 6, 8, 6, "bfloat16")  # SGLang's input limit
                assert (config.engine, config.max_context_length, config.max_running_requests,
                        config.speculative_algorithm, config.cuda_graph_max_batch, config.max_num_batched_tokens) == (
                    "sglang", 300 - 6, 4, "nextn", 8, 2048)

        asyncio.run(go())
    finally:
        server.stop()


def test_speculative_counts_and_drain(tokenizer: Any) -> None:
    """Drafted and accepted tokens per request and engine-wide come from SGLang's outputs; the drain lets the
    request in flight finish and then stops SGLang."""
    server, engine = serve(tokenizer, {"speculative_draft_tokens": 3, "step_s": 0.01}, speculative_algorithm="nextn",
                           speculative_num_draft_tokens=3, shutdown_grace_period_s=30)

    async def go() -> None:
        async with server.client() as client:
            call = client.generate([8, 9, 10], max_new_tokens=21, ignore_eos=True)
            first = await anext(aiter(call))
            drained = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(server.server.drain(), server._loop))
            rest = [first, *await collect(call)]
            await asyncio.wait_for(drained, 30)
            final = rest[-1]
            assert final.finish_reason == pb.FINISH_REASON_LENGTH and final.usage.completion_tokens == 21
            assert (final.stats.drafted_tokens, final.stats.accepted_tokens) == (11 * 3, 21 - 11)

    asyncio.run(go())
    stats = server.server.engine.stats()
    assert (stats.drafted_tokens, stats.accepted_tokens) == (33, 10)
    assert engine.shut_down
    server.stop()


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_sigterm_drains_the_server_although_sglang_claims_it_while_starting(tokenizer: Any,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """SGLang's output loop installs its own SIGTERM handler on the server's loop while the engine starts; the
    server takes SIGTERM back once up, so a pod stop drains it (serve returns) instead of reaching SGLang alone."""
    engine = StandInSGLang(tokenizer)
    monkeypatch.setattr(app, "make_engine", lambda s: SGLangEngine(s, lambda: engine))
    settings = load_settings({"engine": "sglang", "model": "/models/qwen3-next", "host": "127.0.0.1", "port": 0,
                              "metrics_port": 0, "shutdown_grace_period_s": 2})

    async def go() -> None:
        serving = asyncio.create_task(app.serve(settings))
        while engine.loop is None:  # SGLang's handle loop: the engine has started
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(serving, timeout=20)  # a SIGTERM that only SGLang saw never ends serve

    asyncio.run(go())
    assert engine.shut_down and not engine.sigterm_taken
