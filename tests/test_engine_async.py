"""The `Engine` interface of the native engine: streaming, concurrency, cancellation that frees memory at once,
validation before allocation, refusal when the waiting queue is full or the engine is shut down, surviving a
failing step, and ending every request (never hanging) if the engine thread itself fails."""

from __future__ import annotations

import asyncio
import random

import pytest
from kvbuffer.service.engine import EngineConfig, build_engine
from kvbuffer.service.engine.api import (
    EngineFailedError,
    GenerateRequest,
    InvalidRequestError,
    OverloadedError,
    SamplingParams,
)
from qwen3_next_cases import fresh_seed, make_core, request, run_to_end

SETTINGS = {"device": "cpu", "buffer_size": 16, "chunk_size": 8, "memory_budget_bytes": 2**22,
            "max_context_length": 256}


def run(coro_fn, **settings):
    """Runs `coro_fn(engine)` on a fresh engine, shut down afterwards."""
    async def main():
        engine = build_engine(EngineConfig(**{**SETTINGS, **settings}))
        await engine.start()
        try:
            return await coro_fn(engine)
        finally:
            await engine.shutdown()
    return asyncio.run(main())


async def collect(engine, req: GenerateRequest) -> tuple[list[int], str, object]:
    tokens, text, last = [], "", None
    async for chunk in engine.generate(req):
        tokens += chunk.token_ids
        text += chunk.text
        last = chunk
    return tokens, text, last


def test_concurrent_streams_match_the_core_run_alone():
    seed = fresh_seed()
    rng = random.Random(seed)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(2, 30))] for _ in range(8)]

    async def body(engine):
        return await asyncio.gather(*(collect(engine, request(f"r{i}", p, max_new_tokens=20, ignore_eos=True))
                                      for i, p in enumerate(prompts)))

    results = run(body, max_running_requests=3)
    for i, (tokens, text, last) in enumerate(results):
        solo = run_to_end(make_core(), {0: [request("x", prompts[i], max_new_tokens=20, ignore_eos=True)]})["x"]
        assert tokens == solo.token_ids and text == solo.text, f"request {i} (seed {seed})"
        assert last.finish_reason == "length" and last.completion_tokens == 20 and last.prompt_tokens == len(
            prompts[i])
        assert sum(last.stats.tokens_by_path.values()) == 20


def test_text_prompt_streams_text():
    async def body(engine):
        return await collect(engine, GenerateRequest("t", prompt="héllo", sampling=SamplingParams(
            max_new_tokens=8, ignore_eos=True)))

    tokens, text, last = run(body)
    assert last.prompt_tokens == len("héllo".encode()) and len(tokens) == 8
    assert text == bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")


@pytest.mark.parametrize("how", ["close", "cancel"])
def test_cancel_frees_every_slot_at_once(how):
    async def body(engine):
        long = request("long", list(range(40)), max_new_tokens=200, ignore_eos=True)
        stream = engine.generate(long)
        for _ in range(31):  # run until the request holds a checkpoint, its buffer and KV blocks
            await anext(stream)
        held = engine.stats()
        if how == "close":
            await stream.aclose()
            last = None
        else:
            await engine.cancel("long")
            last = [c async for c in stream][-1]
        return held, engine.stats(), last

    held, after, last = run(body)
    assert held.state_slots_used == 1 and held.buffer_slots_used == 1 and held.running_requests == 1
    assert (after.state_slots_used, after.buffer_slots_used, after.running_requests) == (0, 0, 0)
    if last is not None:
        assert last.finish_reason == "cancelled" and last.stats is not None


BAD = [
    ("prompt", GenerateRequest("a", prompt="")),
    ("prompt", GenerateRequest("a")),
    ("prompt_token_ids", GenerateRequest("a", prompt_token_ids=())),
    ("prompt_token_ids[1]", GenerateRequest("a", prompt_token_ids=(1, 999))),
    ("prompt_token_ids", GenerateRequest("a", prompt_token_ids=(1,) * 256)),
    ("request_id", GenerateRequest("", prompt="x")),
    ("sampling.max_new_tokens", GenerateRequest("a", prompt="x", sampling=SamplingParams(max_new_tokens=0))),
    ("sampling.max_new_tokens", GenerateRequest("a", prompt="x", sampling=SamplingParams(max_new_tokens=257))),
    ("sampling.temperature", GenerateRequest("a", prompt="x", sampling=SamplingParams(temperature=-1.0))),
    ("sampling.temperature", GenerateRequest("a", prompt="x", sampling=SamplingParams(temperature=float("nan")))),
    ("sampling.top_p", GenerateRequest("a", prompt="x", sampling=SamplingParams(top_p=0.0))),
    ("sampling.top_p", GenerateRequest("a", prompt="x", sampling=SamplingParams(top_p=1.5))),
    ("sampling.top_k", GenerateRequest("a", prompt="x", sampling=SamplingParams(top_k=-2))),
    ("sampling.seed", GenerateRequest("a", prompt="x", sampling=SamplingParams(seed=-1))),
    ("sampling.stop_token_ids[1]", GenerateRequest("a", prompt="x", sampling=SamplingParams(stop_token_ids=(1, 300)))),
    ("sampling.stop_strings[0]", GenerateRequest("a", prompt="x", sampling=SamplingParams(stop_strings=("",)))),
]


@pytest.mark.parametrize(("field", "req"), BAD, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD)])
def test_bad_requests_are_refused_naming_the_field_before_allocation(field, req):
    async def body(engine):
        with pytest.raises(InvalidRequestError) as err:
            engine.generate(req)
        return err.value, engine.stats()

    error, stats = run(body)
    assert error.field == field
    assert (stats.running_requests, stats.waiting_requests, stats.buffer_slots_used) == (0, 0, 0)


def test_duplicate_request_id_is_refused():
    async def body(engine):
        first = engine.generate(request("same", [1, 2, 3], max_new_tokens=50, ignore_eos=True))
        await anext(first)
        with pytest.raises(InvalidRequestError) as err:
            await anext(engine.generate(request("same", [4, 5], max_new_tokens=5)))
        await first.aclose()
        return err.value.field

    assert run(body) == "request_id"


def test_a_failing_step_ends_its_requests_with_error_and_the_engine_goes_on(monkeypatch):
    async def body(engine):
        runner = engine._core.runner
        real = runner.run

        def broken(batch):
            raise RuntimeError("injected failure")

        monkeypatch.setattr(runner, "run", broken)
        _, _, failed = await collect(engine, request("a", [1, 2, 3], max_new_tokens=4))
        monkeypatch.setattr(runner, "run", real)
        _, _, ok = await collect(engine, request("b", [1, 2, 3], max_new_tokens=4, ignore_eos=True))
        return failed, ok, engine.stats()

    failed, ok, stats = run(body)
    assert failed.finish_reason == "error" and ok.finish_reason == "length"
    assert stats.buffer_slots_used == 0


def test_generate_after_shutdown_is_refused():
    async def body(engine):
        await engine.shutdown()
        with pytest.raises(OverloadedError, match="shut down"):
            await anext(engine.generate(request("late", [1, 2, 3], max_new_tokens=4)))
        return engine.stats()

    stats = run(body)
    assert (stats.running_requests, stats.waiting_requests) == (0, 0)


def test_a_failing_engine_thread_ends_every_request_with_error(monkeypatch):
    """The step fails and so does the recovery from it: the thread is gone, so its requests end with "error" at
    once (not hang), new ones are refused with EngineFailedError, the engine is unhealthy and says so to its
    failure callbacks (those registered before, and after, the failure)."""
    async def body(engine):
        core = engine._core
        told = []
        engine.on_failure(lambda: told.append("before"))
        assert engine.healthy

        def broken(*_args):
            raise RuntimeError("injected failure")

        monkeypatch.setattr(core.runner, "run", broken)
        real_abort_all = core.abort_all
        monkeypatch.setattr(core, "abort_all", broken)
        results = await asyncio.gather(*(collect(engine, request(f"r{i}", [1, 2, 3], max_new_tokens=4))
                                         for i in range(3)))
        with pytest.raises(EngineFailedError, match="engine failed"):
            await anext(engine.generate(request("late", [1, 2, 3], max_new_tokens=4)))
        engine.on_failure(lambda: told.append("after"))
        monkeypatch.setattr(core, "abort_all", real_abort_all)  # shutdown frees what the core still holds
        return [last.finish_reason for _, _, last in results], engine.healthy, told

    assert run(body) == (["error"] * 3, False, ["before", "after"])


def test_requests_are_refused_only_when_running_and_waiting_are_both_full():
    """With the step loop held, nothing is scheduled yet: the engine still takes max_running_requests +
    max_waiting_requests requests (their running slots are free), and refuses the one after."""
    async def body(engine):
        streams, pending = [], []
        with engine._lock:
            for i in range(3 + 2):
                streams.append(engine.generate(request(f"r{i}", [1, 2, i], max_new_tokens=4)))
                pending.append(asyncio.ensure_future(anext(streams[-1])))
                await asyncio.sleep(0)
            assert not any(p.done() for p in pending)
            with pytest.raises(OverloadedError):
                await anext(engine.generate(request("over", [1, 2], max_new_tokens=4)))
        await asyncio.gather(*pending)
        for stream in streams:
            await stream.aclose()

    run(body, max_running_requests=3, max_waiting_requests=2)


def test_consecutive_failed_steps_make_the_engine_unhealthy(monkeypatch):
    """Every step fails: a few failures end their requests with "error" and the engine goes on (it may be one bad
    request); MAX_CONSECUTIVE_FAILED_STEPS in a row make it unhealthy for good, as the engine thread dying does."""
    from kvbuffer.service.engine.engine import MAX_CONSECUTIVE_FAILED_STEPS

    async def body(engine):
        told = []
        engine.on_failure(lambda: told.append("failed"))

        def broken(batch):
            raise RuntimeError("injected failure")

        monkeypatch.setattr(engine._core.runner, "run", broken)
        reasons, health = [], []
        for i in range(MAX_CONSECUTIVE_FAILED_STEPS):
            _, _, last = await collect(engine, request(f"r{i}", [1, 2, 3], max_new_tokens=4))
            reasons.append(last.finish_reason)
            health.append(engine.healthy)
        with pytest.raises(EngineFailedError):
            await anext(engine.generate(request("late", [1, 2, 3], max_new_tokens=4)))
        return reasons, health, told, engine.stats()

    reasons, health, told, stats = run(body)
    assert reasons == ["error"] * MAX_CONSECUTIVE_FAILED_STEPS
    assert health == [True] * (MAX_CONSECUTIVE_FAILED_STEPS - 1) + [False] and told == ["failed"]
    assert (stats.running_requests, stats.buffer_slots_used) == (0, 0)


def test_an_accelerator_error_makes_the_engine_unhealthy_at_once(monkeypatch):
    """A CUDA error (torch.AcceleratorError: the device context is lost, nothing will run on it again) is
    persistent at the first failure. Injected: there is no GPU here to fail for real."""
    import torch

    async def body(engine):
        def broken(batch):
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

        monkeypatch.setattr(engine._core.runner, "run", broken)
        _, _, last = await collect(engine, request("r", [1, 2, 3], max_new_tokens=4))
        return last.finish_reason, engine.healthy

    assert run(body) == ("error", False)
