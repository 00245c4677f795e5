"""Overlapped decode steps (core.py): a CUDA-graph decode step is read back while the next one runs, so requests
that end on a stop token or string decode one token more, thrown away. Checked against the same engine with
graphs off (every step read back at once) on fresh random prompts: the same tokens, text and finish reasons for
every way a request ends, seeded sampling included; nothing leaks once all have ended; a request cancelled with
its token still in flight ends at once, frees its memory and streams nothing more."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from kvbuffer.service.engine.core import EngineCore
from qwen3_next_cases import fresh_seed, make_core, request, run_to_end

SETTINGS = {"buffer_size": 16, "chunk_size": 8, "max_context_length": 256}


def overlapped_steps() -> tuple[list[bool], Callable[[EngineCore], None]]:
    """A list, and the on_step for run_to_end that records in it whether each step left one in flight."""
    seen: list[bool] = []
    return seen, lambda core: seen.append(core._inflight is not None)


def all_free(core: EngineCore) -> bool:
    m, plan = core.memory, core.plan
    return (len(m.free_request_slots), len(m.free_state_slots), len(m.free_blocks)) == (
        plan.request_slots, plan.state_slots, plan.kv_blocks)


def test_overlapped_steps_end_every_request_as_the_synchronous_engine_does():
    seed = fresh_seed()
    rng = random.Random(seed)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(3, 30))] for _ in range(7)]
    sync = make_core(cuda_graph_max_batch=0, **SETTINGS)
    free = run_to_end(sync, {0: [request(f"f{i}", p, max_new_tokens=40, ignore_eos=True)
                                 for i, p in enumerate(prompts)]})
    # stop tokens and strings taken from each prompt's own free-running output, so they end it early
    stops = [free[f"f{i}"].token_ids[rng.randint(5, 30)] for i in range(7)]
    texts = [free[f"f{i}"].text for i in range(7)]
    cut = [rng.randint(5, len(t) - 3) for t in texts]
    length = rng.randint(2, 20)

    def arrivals() -> dict[int, list]:
        return {0: [request("id0", prompts[0], max_new_tokens=40, ignore_eos=True, stop_token_ids=(stops[0],)),
                    request("str1", prompts[1], max_new_tokens=40, ignore_eos=True,
                            stop_strings=(texts[1][cut[1]:cut[1] + 2],)),
                    request("len2", prompts[2], max_new_tokens=length, ignore_eos=True),
                    request("seed3", prompts[3], max_new_tokens=30, ignore_eos=True, temperature=0.9, top_k=40,
                            seed=seed),
                    request("id4", prompts[4], max_new_tokens=40, ignore_eos=True, stop_token_ids=(stops[4],),
                            temperature=0.8, seed=seed + 1)],
                9: [request("late5", prompts[5], max_new_tokens=25, ignore_eos=True, stop_token_ids=(stops[5],)),
                    request("late6", prompts[6], max_new_tokens=12, ignore_eos=True)]}

    want = run_to_end(make_core(cuda_graph_max_batch=0, **SETTINGS), arrivals())
    core = make_core(cuda_graph_max_batch=16, **SETTINGS)
    seen, on_step = overlapped_steps()
    got = run_to_end(core, arrivals(), on_step)
    assert sum(seen) > 20, f"seed {seed}: few overlapped steps"
    for rid, chunk in want.items():
        mine = got[rid]
        assert (mine.token_ids, mine.text, mine.finish_reason) == (chunk.token_ids, chunk.text, chunk.finish_reason), (
            f"{rid} (seed {seed})")
        assert mine.completion_tokens == len(chunk.token_ids), f"{rid} (seed {seed})"
    assert {c.finish_reason for c in got.values()} == {"stop", "length"}, f"seed {seed}"
    assert not core.has_work() and all_free(core), f"seed {seed}"


def test_a_request_cancelled_with_its_token_in_flight_ends_at_once():
    seed = fresh_seed()
    rng = random.Random(seed)
    core = make_core(cuda_graph_max_batch=16, **SETTINGS)
    for i in range(3):
        req = request(f"r{i}", [rng.randrange(256) for _ in range(20)], max_new_tokens=30, ignore_eos=True)
        core.add(req, core.validate(req))
    streamed: dict[str, list[int]] = {}
    for _ in range(6):
        for rid, chunk in core.step():
            streamed.setdefault(rid, []).extend(chunk.token_ids)
    assert core._inflight is not None and core.requests["r1"].pending == 1, f"seed {seed}"
    held = core.memory.request_slots_used
    last = core.abort("r1")
    assert last.finish_reason == "cancelled" and core.memory.request_slots_used == held - 1, f"seed {seed}"
    assert last.completion_tokens == len(streamed["r1"]), f"seed {seed}"
    while core.has_work():
        for rid, chunk in core.step():
            assert rid != "r1", f"seed {seed}: a chunk after the cancel"
            streamed[rid].extend(chunk.token_ids)
    assert [len(streamed[r]) for r in ("r0", "r2")] == [30, 30] and all_free(core), f"seed {seed}"


def test_a_one_token_prefill_piece_among_decodes_is_not_overlapped():
    """A token budget that leaves one token for a chunked prefill makes that piece a one-token decode that samples
    nothing: the step must run synchronously, and every output stay the synchronous engine's."""
    seed = fresh_seed()
    rng = random.Random(seed)
    prompts = [[rng.randrange(256) for _ in range(n)] for n in (5, 5, 5, 12)]
    settings = {**SETTINGS, "max_num_batched_tokens": 4}

    def arrivals() -> dict[int, list]:
        return {0: [request(f"r{i}", prompts[i], max_new_tokens=m, ignore_eos=True) for i, m in enumerate((8, 8, 5))],
                3: [request("r3", prompts[3], max_new_tokens=4, ignore_eos=True)]}

    want = run_to_end(make_core(cuda_graph_max_batch=0, **settings), arrivals())
    seen, on_step = overlapped_steps()
    got = run_to_end(make_core(cuda_graph_max_batch=16, **settings), arrivals(), on_step)
    assert any(seen), f"seed {seed}: no overlapped step"
    for rid, chunk in want.items():
        assert (got[rid].token_ids, got[rid].finish_reason) == (chunk.token_ids, chunk.finish_reason), (
            f"{rid} (seed {seed})")


def test_a_step_failing_after_its_read_back_still_ends_the_requests_it_finished():
    """A request whose last token is read back at the start of a synchronous step (one with a new prefill) has left
    the engine by the time the forward runs; if that forward fails, abort_all must still hand over its last chunk,
    or its stream would never end."""
    seed = fresh_seed()
    rng = random.Random(seed)
    core = make_core(cuda_graph_max_batch=16, **SETTINGS)
    x = request("x", [rng.randrange(256) for _ in range(10)], max_new_tokens=3, ignore_eos=True)
    core.add(x, core.validate(x))
    streamed: list[int] = []
    while not (core._inflight and core.requests["x"].num_output_tokens + core.requests["x"].pending == 3):
        streamed += [t for _, c in core.step() for t in c.token_ids]
    y = request("y", [rng.randrange(256) for _ in range(20)], max_new_tokens=3, ignore_eos=True)
    core.add(y, core.validate(y))  # a prefill: the next step reads back first, then runs synchronously

    def failing_forward(batch):
        raise RuntimeError("the forward failed")

    core.runner.run = failing_forward
    with pytest.raises(RuntimeError, match="forward failed"):
        core.step()
    ended = dict(core.abort_all("error"))
    assert ended["x"].finish_reason == "length" and ended["y"].finish_reason == "error", f"seed {seed}"
    assert len(streamed) + len(ended["x"].token_ids) == 3 and all_free(core), f"seed {seed}"


def test_a_request_whose_last_token_is_on_the_device_still_counts_as_running():
    """A request whose last token is in flight has left the schedule, but it still holds its memory and its stream
    is open: the running_requests gauge counts it until the token is read back."""
    seed = fresh_seed()
    rng = random.Random(seed)
    core = make_core(cuda_graph_max_batch=16, **SETTINGS)
    req = request("x", [rng.randrange(256) for _ in range(10)], max_new_tokens=rng.randint(3, 12), ignore_eos=True)
    core.add(req, core.validate(req))
    seq = core.requests["x"]
    while not (core._inflight and seq.num_tokens - seq.prompt_len == req.sampling.max_new_tokens):
        core.step()
    assert seq not in core.scheduler.running, f"seed {seed}"
    stats = core.stats()
    assert (stats.running_requests, stats.buffer_slots_used) == (1, 1), f"seed {seed}"
    [(_, last)] = core.step()
    assert last.finish_reason == "length" and core.stats().running_requests == 0, f"seed {seed}"


def test_flushes_of_an_overlapped_step_count_for_a_request_ended_before_its_read_back():
    """A request cancelled while the overlapped step that flushed its buffer is on the device: the flush happened,
    so the engine's counter and the request's own statistics count it, as the synchronous engine does when
    the request is cancelled after the same step."""
    seed = fresh_seed()
    rng = random.Random(seed)
    prompt = [rng.randrange(256) for _ in range(20)]  # past buffer_size: a checkpoint from the start

    def flushing_step(core: EngineCore) -> bool:
        inflight = core._inflight
        return bool(inflight and any(s.seq.request_id == "x" and s.step.flush for s in inflight.batch))

    core = make_core(cuda_graph_max_batch=16, **SETTINGS)
    req = request("x", prompt, max_new_tokens=60, ignore_eos=True)
    core.add(req, core.validate(req))
    while not flushing_step(core):
        core.step()
    computed = core.requests["x"].num_computed
    last = core.abort("x")
    sync = make_core(cuda_graph_max_batch=0, **SETTINGS)
    sync.add(req, sync.validate(req))
    while sync.requests["x"].num_computed < computed:
        sync.step()
    want = sync.abort("x")
    assert want.stats.flushes > 0, f"seed {seed}"
    assert last.stats.flushes == want.stats.flushes == core.stats().flushes == sync.stats().flushes, f"seed {seed}"
