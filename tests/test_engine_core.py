"""The engine core on the tiny model: continuous batching, chunked prefill, admission limits, preemption,
decode paths and state memory, stopping, seeded sampling. Outputs are checked against the same requests run
alone (greedy), so batching, chunking and preemption must not change a single token."""

from __future__ import annotations

import random

import pytest
from kvbuffer.service.engine import core as core_module
from qwen3_next_cases import fresh_seed, make_core, request, run_to_end


def random_prompts(seed: int, count: int, lo: int = 3, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def alone(prompt: list[int], **settings) -> list[int]:
    core = make_core(**settings)
    return run_to_end(core, {0: [request("x", prompt, max_new_tokens=24, ignore_eos=True)]})["x"].token_ids


def test_continuous_batching_matches_each_request_alone():
    seed = fresh_seed()
    prompts = random_prompts(seed, 6)
    core = make_core(max_running_requests=4)
    arrivals: dict[int, list] = {}
    for i, (step, p) in enumerate(zip([0, 0, 3, 5, 5, 9], prompts, strict=True)):
        arrivals.setdefault(step, []).append(request(f"r{i}", p, max_new_tokens=24, ignore_eos=True))
    running = []
    out = run_to_end(core, arrivals, on_step=lambda c: running.append(c.stats().running_requests))
    assert max(running) == 4  # joined running batches, up to max_running_requests
    for i, p in enumerate(prompts):
        assert out[f"r{i}"].token_ids == alone(p), f"request {i} differs from its solo run (seed {seed})"
    s = core.stats()
    assert (s.running_requests, s.waiting_requests, s.state_slots_used, s.buffer_slots_used) == (0, 0, 0, 0)


def test_chunked_prefill_keeps_the_step_token_budget():
    seed = fresh_seed()
    (prompt,) = random_prompts(seed, 1, 50, 60)
    core = make_core(max_num_batched_tokens=7)
    sizes = []
    run = core.runner.run
    core.runner.run = lambda batch: sizes.append(sum(s.n for s in batch)) or run(batch)
    out = run_to_end(core, {0: [request("long", prompt, max_new_tokens=24, ignore_eos=True)],
                            2: [request("short", prompt[:5], max_new_tokens=24, ignore_eos=True)]})
    assert max(sizes) == 7 and len(sizes) > 24
    assert out["long"].token_ids == alone(prompt), f"seed {seed}"
    assert out["short"].token_ids == alone(prompt[:5]), f"seed {seed}"


def test_preemption_under_a_small_kv_cache_changes_no_output():
    seed = fresh_seed()
    prompts = random_prompts(seed, 4, 26, 40)  # together past the 12 KV blocks, so someone is preempted
    # room for about one max-length request's KV blocks: the others are preempted and recomputed
    core = make_core(max_context_length=96, memory_budget_bytes=96 * 2 * 2 * 16 * 4 + 4 * 160_000)
    assert core.plan.kv_blocks * core.plan.block_size < 4 * 64
    out = run_to_end(core, {0: [request(f"r{i}", p, max_new_tokens=24, ignore_eos=True)
                                for i, p in enumerate(prompts)]})
    for i, p in enumerate(prompts):
        assert out[f"r{i}"].token_ids == alone(p), f"request {i} (seed {seed})"
    assert core.scheduler.preemptions > 0
    assert len(core.memory.free_blocks) == core.plan.kv_blocks


def test_short_contexts_hold_no_state_and_long_ones_flush_every_chunk():
    seed = fresh_seed()
    (prompt,) = random_prompts(seed, 1, 4, 4)
    core = make_core(buffer_size=16, chunk_size=8)
    held = []
    short = run_to_end(core, {0: [request("s", prompt, max_new_tokens=10, ignore_eos=True)]},
                       on_step=lambda c: held.append(c.stats().state_slots_used))
    assert set(held) == {0}
    assert short["s"].stats.tokens_by_path == {"stateless": 10, "buffered": 0, "recurrent": 0}
    long = run_to_end(core, {0: [request("l", prompt, max_new_tokens=40, ignore_eos=True)]},
                      on_step=lambda c: held.append(c.stats().state_slots_used))
    assert max(held) == 1
    st = long["l"].stats
    # the first token and 12 decodes read no checkpoint; the 12th fills the buffer (context 16), takes a slot
    # and flushes in the same pass; from then on a flush every 8 tokens
    assert st.tokens_by_path == {"stateless": 13, "buffered": 27, "recurrent": 0}
    assert st.flushes == 1 + (4 + 40 - 1 - 16) // 8


def test_recurrent_mode_gives_the_same_greedy_output():
    seed = fresh_seed()
    (prompt,) = random_prompts(seed, 1, 10, 30)
    core = make_core(decode_mode="recurrent")
    out = run_to_end(core, {0: [request("r", prompt, max_new_tokens=24, ignore_eos=True)]})["r"]
    assert out.token_ids == alone(prompt), f"seed {seed}"
    assert out.stats.tokens_by_path == {"stateless": 0, "buffered": 0, "recurrent": 24}


def test_max_running_requests_and_waiting():
    seed = fresh_seed()
    core = make_core(max_running_requests=2)
    seen = []
    run_to_end(core, {0: [request(f"r{i}", p, max_new_tokens=5) for i, p in enumerate(random_prompts(seed, 5))]},
               on_step=lambda c: seen.append((c.stats().running_requests, c.stats().waiting_requests)))
    assert max(r for r, _ in seen) == 2 and seen[0] == (2, 3)


def test_stop_token_ids_strings_and_length():
    seed = fresh_seed()
    (prompt,) = random_prompts(seed, 1)
    free = alone(prompt)
    core = make_core()
    stop_id = free[7]
    first = free.index(stop_id)
    out = run_to_end(core, {0: [request("id", prompt, max_new_tokens=24, ignore_eos=True, stop_token_ids=(stop_id,)),
                                request("len", prompt, max_new_tokens=5, ignore_eos=True)]})
    assert out["id"].token_ids == free[:first + 1] and out["id"].finish_reason == "stop"
    assert out["len"].token_ids == free[:5] and out["len"].finish_reason == "length"
    text = core.tokenizer.decode(free)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    out = run_to_end(core, {0: [request("str", prompt, max_new_tokens=24, ignore_eos=True, stop_strings=(stop,))]})
    assert out["str"].finish_reason == "stop"
    assert out["str"].text == text[:text.index(stop)], f"seed {seed}"


@pytest.mark.parametrize("spec", ["none", "ngram"])
def test_same_seed_same_sample(spec):
    seed = fresh_seed()
    prompts = random_prompts(seed, 2)
    params = {"max_new_tokens": 20, "temperature": 0.9, "top_p": 0.95, "top_k": 50, "ignore_eos": True}

    def sample(sampling_seed: int) -> list[int]:
        core = make_core(speculative_algorithm=spec)
        reqs = [request(f"r{i}", p, seed=sampling_seed, **params) for i, p in enumerate(prompts)]
        return run_to_end(core, {0: reqs})["r0"].token_ids

    assert sample(seed) == sample(seed)
    assert sample(seed) != sample(seed + 1)  # 20 draws from ~50 tokens: equal only by a freak chance


def test_logprobs_are_those_of_the_chosen_tokens():
    seed = fresh_seed()
    (prompt,) = random_prompts(seed, 1)
    core = make_core()
    out = []
    req = request("lp", prompt, max_new_tokens=6, ignore_eos=True, logprobs=True)
    core.add(req, core.validate(req))
    while core.has_work():
        out += [lp for _, chunk in core.step() for lp in chunk.logprobs or []]
    assert len(out) == 6 and all(lp <= 0 for lp in out)
    assert max(out) > -5.6  # greedy picks the argmax: far more likely than uniform over 257 tokens


def test_pools_are_sized_from_the_budget_and_refuse_an_impossible_one():
    core = make_core(memory_budget_bytes=2**22, max_running_requests=1000)
    plan = core.plan
    assert plan.total_bytes <= 2**22 and plan.request_slots < 1000
    assert plan.kv_blocks * plan.block_size >= 256  # one request of max_context_length always fits
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        make_core(memory_budget_bytes=10_000)


def test_the_plan_counts_the_bytes_the_pools_allocate():
    """What a request slot, a checkpoint slot and a KV block cost in the plan is what the bound pools hold."""
    for mode in ("kvbuffer", "recurrent"):
        core = make_core(decode_mode=mode)
        model, plan = core.loaded.model, core.plan
        request = sum(layer.conv_state[0].numel() * layer.conv_state.element_size()
                      + (layer.buffer.bytes_per_slot() if layer.buffer is not None else 0)
                      for layer in model.gdn_layers())
        state = sum(layer.states[0].numel() * layer.states.element_size() for layer in model.gdn_layers())
        block = sum(2 * plan.block_size * layer.k_cache[0].numel() * layer.k_cache.element_size()
                    for layer in model.attention_layers())
        assert (plan.request_slot_bytes, plan.state_slot_bytes, plan.kv_block_bytes) == (request, state, block), mode


def test_a_seed_fixes_the_sample_whatever_else_runs(monkeypatch):
    """A seeded request at temperature 1 with drafts gives the same tokens alone, beside requests that take the
    step's token budget first (its drafts cut short), beside requests that preempt it, and without speculation:
    its randomness comes from its seed and each token's output position only. The drafter proposes the context's
    last tokens: a random model's samples seldom repeat, so n-gram lookup would seldom propose anything."""
    monkeypatch.setattr(core_module, "propose_ngram", lambda tokens, k: tokens[-k:] if k > 0 else [])
    seed = fresh_seed()
    rng = random.Random(seed)
    (prompt,) = random_prompts(seed, 1, 10, 20)
    others = random_prompts(seed + 1, 3, 26, 40)
    params = {"max_new_tokens": 20, "temperature": 1.0, "seed": rng.randrange(2**64), "ignore_eos": True}
    spec = {"speculative_algorithm": "ngram", "speculative_num_draft_tokens": 4}

    def sample(arrivals: dict[int, list], **settings) -> tuple[list[int], object]:
        core = make_core(**settings)
        return run_to_end(core, arrivals)["s"].token_ids, core

    alone, core = sample({0: [request("s", prompt, **params)]}, **spec)
    assert core.stats().drafted_tokens > 0, f"seed {seed}"
    crowd = [request(f"o{i}", p, max_new_tokens=20, ignore_eos=True, temperature=0.8) for i, p in enumerate(others)]
    budget, _ = sample({0: crowd, 1: [request("s", prompt, **params)]}, max_num_batched_tokens=6, **spec)
    assert budget == alone, f"seed {seed}: the token budget changed a seeded sample"
    crowd = [request(f"o{i}", p, max_new_tokens=20, ignore_eos=True) for i, p in enumerate(others)]
    preempted, core = sample({0: [request("s", prompt, **params), *crowd]}, max_context_length=96,
                             memory_budget_bytes=96 * 2 * 2 * 16 * 4 + 4 * 160_000, **spec)
    assert core.scheduler.preemptions > 0, f"seed {seed}"
    assert preempted == alone, f"seed {seed}: preemption changed a seeded sample"
    plain, _ = sample({0: [request("s", prompt, **params)]})
    assert plain == alone, f"seed {seed}: speculation changed a seeded sample"


def test_requests_without_a_seed_are_random_across_restarts():
    """Two engines started alike (the same `seed` setting) give the same unseeded request different samples."""
    seed = fresh_seed()
    (prompt,) = random_prompts(seed, 1)
    params = {"max_new_tokens": 24, "temperature": 1.5, "ignore_eos": True}
    samples = [run_to_end(make_core(), {0: [request("u", prompt, **params)]})["u"].token_ids for _ in range(2)]
    assert samples[0] != samples[1]  # 24 draws at temperature 1.5 over 257 tokens: equal only by a freak chance


def test_the_prefill_of_a_prompt_past_the_buffer_counts_its_token_as_buffered():
    """A prompt longer than buffer_size is prefilled into a checkpoint: the token it yields is not stateless."""
    seed = fresh_seed()
    (prompt,) = random_prompts(seed, 1, 100, 200)
    out = run_to_end(make_core(), {0: [request("p", prompt, max_new_tokens=1)]})["p"]
    assert out.stats.tokens_by_path == {"stateless": 0, "buffered": 1, "recurrent": 0}, f"seed {seed}"
