"""Engine sglang through SGLang 0.5.17's real front end: the gRPC server, the adapter, and SGLang's own `Engine`
launch, TokenizerManager (in this process) and DetokenizerManager (its process), with one process of ours in place of
SGLang's GPU scheduler (tests/sglang_scheduler_standin.py says what it is and why). Streaming deltas, incremental
detokenization, stop strings, finish reasons, aborts and SGLang's queue-full refusal are SGLang's code here, not a
model of it (tests/test_sglang_engine.py covers the rest of the adapter with tests/sglang_standin.py).

Oracle: the stand-in scheduler's model is `sglang_standin.next_token` and `logprob_of`, so every token, its text
(the tokenizer's decode) and logprob is known before the request is sent. SGLang's processes start once for the
module: it runs 2 requests and queues 3 (SGLang's max_queued_requests: those received and not running yet, a burst
included), while the service admits 2 + 4, as when SGLang's queue is shorter than the service's, so that SGLang's own
refusal is reached."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from kvbuffer.service.engine.api import GenerateChunk, GenerateRequest, SamplingParams
from kvbuffer.service.model import tiny
from kvbuffer.service.server.settings import load_settings
from kvbuffer.service.sglang.engine import SGLangEngine, _launch_failed, _service_logging_kept
from kvbuffer.service.sglang.settings import build_server_args
from kvbuffer.v1 import kvbuffer_pb2 as pb
from service_harness import RunningServer
from sglang_cpu import gpu_free_server_args, require_sglang
from sglang_standin import EOS, continuation, logprob_of, make_tokenizer, prompts

require_sglang()

SGLANG_RUNNING, SGLANG_QUEUED = 2, 3
SERVICE_WAITING = SGLANG_QUEUED + 1
LONG = 400  # tokens: a request that runs until it is cancelled (4 s at the stand-in's step)


class Front:
    """The module's server over SGLang's real front end, with the tokenizer and vocabulary of its model."""

    def __init__(self, server: RunningServer, tokenizer: Any, vocab: int) -> None:
        self.server, self.tokenizer, self.vocab = server, tokenizer, vocab

    def open_requests(self) -> int:
        """Requests SGLang's TokenizerManager still holds (read on the server's loop: `server.until`)."""
        return len(self.server.server.engine._runtime.tokenizer_manager.rid_to_state)

    def idle(self) -> bool:
        """Nothing open in SGLang's front end nor in the adapter (read on the server's loop)."""
        stats = self.server.server.engine.stats()
        return self.open_requests() == 0 and (stats.running_requests, stats.waiting_requests) == (0, 0)


@pytest.fixture(scope="module")
def front(sglang_plugin: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    """sglang_plugin: SGLang's Engine loads the plugins of its process once, at its start; loaded first, the KVBuffer
    plugin has the settings every test module of this process expects of it."""
    try:
        from sglang_scheduler_standin import StandInSchedulerEngine
    except ImportError as e:  # SGLang's front end needs a few more packages than its GDN modules
        pytest.skip(f"SGLang's front end is not importable here ({e}); .ci/run installs it")

    model = tmp_path_factory.mktemp("model")
    tokenizer = make_tokenizer(model, every_byte=False)  # SGLang streams an incomplete UTF-8 character lossily
    vocab = len(tokenizer) + 24  # the model's embedding has more rows than the tokenizer, as Qwen's
    (model / "config.json").write_text(json.dumps({**tiny.CONFIG, "full_attention_interval": 4, "vocab_size": vocab,
                                                   "eos_token_id": EOS, "max_position_embeddings": 1024,
                                                   "torch_dtype": "bfloat16"}))
    settings = {"engine": "sglang", "model": str(model), "decode_mode": "recurrent",
                "max_running_requests": SGLANG_RUNNING, "max_waiting_requests": SGLANG_QUEUED}
    with gpu_free_server_args():
        server_args = build_server_args(load_settings(settings), custom_sigquit_handler=_launch_failed)
    sigquit = signal.getsignal(signal.SIGQUIT)
    with _service_logging_kept():  # SGLang starts from the main thread, where it installs its signal handlers
        runtime = StandInSchedulerEngine(server_args=server_args)
    server = RunningServer(make_engine=lambda s: SGLangEngine(s, lambda: runtime),
                           **{**settings, "device": "auto", "max_waiting_requests": SERVICE_WAITING})
    try:
        yield Front(server, tokenizer, vocab)
    finally:
        server.stop()  # the adapter's shutdown stops SGLang's processes
        signal.signal(signal.SIGQUIT, sigquit)
        asyncio.set_event_loop_policy(None)  # SGLang's import made uvloop the process's event loop policy


async def collect(call: grpc.aio.UnaryStreamCall) -> list[pb.GenerateResponse]:
    return [response async for response in call]


def test_stream_deltas_add_up_to_the_models_tokens_text_and_logprobs(front: Front) -> None:
    rng = random.Random()
    batch = prompts(rng, SGLANG_QUEUED, len(front.tokenizer))  # a burst SGLang's queue takes at once
    lengths = [rng.randrange(1, 30) for _ in batch]

    async def go() -> list[list[pb.GenerateResponse]]:
        async with front.server.client() as client:
            return await asyncio.gather(*(collect(client.generate(p, max_new_tokens=n, logprobs=True))
                                          for p, n in zip(batch, lengths, strict=True)))

    for prompt, n, responses in zip(batch, lengths, asyncio.run(go()), strict=True):
        ids = continuation(prompt, n, front.vocab)
        assert [t for r in responses for t in r.token_ids] == ids
        assert "".join(r.text for r in responses) == front.tokenizer.decode(ids, skip_special_tokens=True)
        assert [round(x, 4) for r in responses for x in r.logprobs] == \
            [logprob_of(prompt + ids[:i], t) for i, t in enumerate(ids)]
        assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
        assert (responses[-1].usage.prompt_tokens, responses[-1].usage.completion_tokens) == (len(prompt), n)
    assert front.server.wait_until(front.idle)


def test_stop_string_and_stop_token_end_the_request(front: Front) -> None:
    rng = random.Random()
    prompt = prompts(rng, 1, len(front.tokenizer))[0]
    future = continuation(prompt, 24, front.vocab)
    text = front.tokenizer.decode(future, skip_special_tokens=True)
    cut = rng.randrange(4, len(text) - 2)
    stop = text[cut:cut + 2]
    stop_at = rng.randrange(2, 20)

    async def go() -> tuple[pb.GenerateResponse, pb.GenerateResponse]:
        async with front.server.client() as client:
            return (await client.generate_unary(prompt, max_new_tokens=30, stop_strings=[stop]),
                    await client.generate_unary(prompt, max_new_tokens=30, stop_token_ids=[future[stop_at]]))

    by_string, by_token = asyncio.run(go())
    assert by_string.finish_reason == pb.FINISH_REASON_STOP
    assert by_string.text == text[:text.index(stop)]
    assert by_token.finish_reason == pb.FINISH_REASON_STOP
    assert list(by_token.token_ids) == future[:future.index(future[stop_at]) + 1]


def test_cancel_mid_stream_frees_sglangs_slot_and_spares_requests_it_prefixes(front: Front) -> None:
    """SGLang's scheduler aborts every request whose rid starts with the aborted one's: engine request ids "r" and
    "r0" (the Engine interface allows any) must not cancel each other; the cancelled request's slot serves a new
    request at once, beside the one still running."""
    rng = random.Random()
    cancelled, kept, after = prompts(rng, 3, len(front.tokenizer))
    n = rng.randrange(1, 10)
    engine = front.server.server.engine
    finished: list[str] = []

    async def run(request_id: str, prompt: list[int], max_new_tokens: int, cancel_after: int = 0
                  ) -> list[GenerateChunk]:
        chunks: list[GenerateChunk] = []
        generator = engine.generate(GenerateRequest(request_id, prompt_token_ids=tuple(prompt), sampling=SamplingParams(
            max_new_tokens=max_new_tokens, ignore_eos=True)))
        async for chunk in generator:
            chunks.append(chunk)
            if len(chunks) == cancel_after:
                await generator.aclose()
                break
        finished.append(request_id)
        return chunks

    async def go() -> tuple[list[GenerateChunk], list[GenerateChunk]]:
        other = asyncio.create_task(run("r0", kept, LONG // 4))
        await run("r", cancelled, LONG, cancel_after=3)
        short = await run("r00", after, n)
        return await other, short

    kept_chunks, short = front.server.run(go())
    assert finished == ["r", "r00", "r0"]  # SGLang's two slots: "r00" ran beside "r0", in the slot "r" left
    for prompt, chunks, length in ((after, short, n), (kept, kept_chunks, LONG // 4)):
        assert [t for c in chunks for t in c.token_ids] == continuation(prompt, length, front.vocab)
        assert chunks[-1].finish_reason == "length"
    assert front.server.wait_until(front.idle)


def test_sglangs_full_queue_is_resource_exhausted(front: Front) -> None:
    rng = random.Random()
    batch = prompts(rng, SGLANG_RUNNING + SGLANG_QUEUED + 1, len(front.tokenizer))

    async def go() -> None:
        async with front.server.client() as client:
            held = [client.generate(p, max_new_tokens=LONG, ignore_eos=True) for p in batch[:SGLANG_RUNNING]]
            for call in held:
                await anext(aiter(call))
            held += [client.generate(p, max_new_tokens=LONG, ignore_eos=True) for p in batch[SGLANG_RUNNING:-1]]
            assert await front.server.until(lambda: front.open_requests() == len(held))  # the last one queued
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await client.generate_unary(batch[-1], max_new_tokens=2)
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_waiting_requests" in error.value.details()
            for call in held:
                call.cancel()
            assert await front.server.until(front.idle)
            n = rng.randrange(1, 5)
            response = await client.generate_unary(batch[-1], max_new_tokens=n, ignore_eos=True)
            assert list(response.token_ids) == continuation(batch[-1], n, front.vocab)

    asyncio.run(go())
