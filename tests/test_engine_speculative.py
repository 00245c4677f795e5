"""Speculative decoding: drafts verified in one forward with ops.verify, the accepted prefix committed (buffer
length, conv state rolled back, KV entries past it discarded). Greedy output must equal the output without
speculation token for token, whatever the drafts; acceptance must not change the sampling distribution."""

from __future__ import annotations

import random

import pytest
import torch
from kvbuffer.service.engine import core as core_module
from kvbuffer.service.engine.api import SamplingParams
from kvbuffer.service.engine.drafter import propose_ngram
from kvbuffer.service.engine.sampler import choose, probabilities
from qwen3_next_cases import fresh_seed, make_core, request, run_to_end

NEW = 40


def outputs(prompts: list[list[int]], **settings) -> tuple[dict, object]:
    core = make_core(buffer_size=16, chunk_size=8, **settings)
    reqs = [request(f"r{i}", p, max_new_tokens=NEW, ignore_eos=True) for i, p in enumerate(prompts)]
    out = run_to_end(core, {0: reqs[:2], 3: reqs[2:]})
    assert core.memory.state_slots_used == 0 and len(core.memory.free_blocks) == core.plan.kv_blocks
    return {rid: c.token_ids for rid, c in out.items()}, core.stats()


@pytest.fixture
def prompts():
    seed = fresh_seed()
    rng = random.Random(seed)
    base = [rng.randrange(256) for _ in range(6)]
    return seed, [base * 3, [rng.randrange(256) for _ in range(20)], base[:3] * 2, [rng.randrange(256)]]


def test_oracle_drafts_right_for_a_random_prefix_change_no_token(prompts, monkeypatch):
    """Drafts are the true continuation with a random token corrupted, so every acceptance count (none,
    some, all) and the stateless, fold-then-verify and buffered paths all occur."""
    seed, ps = prompts
    reference, _ = outputs(ps)
    full = {tuple(ps[int(rid[1:])]): ps[int(rid[1:])] + toks for rid, toks in reference.items()}
    rng = random.Random(seed)

    def oracle(tokens: list[int], k: int) -> list[int]:
        truth = next(f for p, f in full.items() if tokens[:len(p)] == list(p))[len(tokens):len(tokens) + k]
        if truth and rng.random() < 0.6:
            j = rng.randrange(len(truth))
            truth[j] = (truth[j] + 1) % 256
        return truth

    monkeypatch.setattr(core_module, "propose_ngram", oracle)
    spec, stats = outputs(ps, speculative_algorithm="ngram", speculative_num_draft_tokens=4)
    assert spec == reference, f"seed {seed}"
    assert 0 < stats.accepted_tokens < stats.drafted_tokens
    assert stats.tokens_by_path["stateless"] > 0 and stats.tokens_by_path["buffered"] > 0


def test_ngram_drafting_changes_no_greedy_token(prompts):
    seed, ps = prompts
    reference, _ = outputs(ps)
    spec, stats = outputs(ps, speculative_algorithm="ngram", speculative_num_draft_tokens=3)
    assert spec == reference, f"seed {seed}"
    assert stats.drafted_tokens > 0


def test_ngram_proposes_what_followed_the_latest_match():
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 2) == [7, 5]
    assert propose_ngram([4, 5, 6], 3) == []
    assert propose_ngram([8, 8, 8], 4) == [8]


def test_acceptance_keeps_the_target_distribution():
    """Marginal of the first emitted token, with a draft in front, equals the filtered target distribution."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 6, generator=gen) * 2
    params = SamplingParams(temperature=0.8, top_k=4, top_p=0.9)
    p = probabilities(logits[0], params)
    draft = int(torch.argsort(p, descending=True)[1])
    n = 4000
    counts = torch.zeros(6)
    rng = random.Random(seed)
    for _ in range(n):
        counts[choose(logits, [draft], params, rng.randrange(2**64))[0]] += 1
    assert (counts / n - p).abs().max() < 0.04, f"seed {seed}: {counts / n} vs {p}"
    assert counts[p == 0].sum() == 0  # filtered tokens are never emitted


def test_greedy_acceptance_takes_the_matching_prefix_then_the_target():
    logits = torch.full((4, 5), -1.0)
    for row, best in enumerate([2, 3, 1, 4]):
        logits[row, best] = 1.0
    greedy = SamplingParams()
    assert choose(logits, [2, 3, 0], greedy, None) == [2, 3, 1]
    assert choose(logits, [2, 3, 1], greedy, None) == [2, 3, 1, 4]
    assert choose(logits, [0, 3, 1], greedy, None) == [2]



def test_a_stop_string_inside_accepted_drafts_drops_the_tokens_after_it(prompts, monkeypatch):
    """Drafts are the true continuation, so steps accept several tokens; each request stops on a string that ends
    at a random output token, usually inside such a step: the tokens, text, usage and decoded-token counts must
    end where they end without speculation."""
    seed, ps = prompts
    rng = random.Random(seed)
    free, _ = outputs(ps)
    full = {tuple(ps[int(rid[1:])]): ps[int(rid[1:])] + toks for rid, toks in free.items()}
    stops = {}
    for rid, tokens in free.items():  # two ASCII bytes (two characters) seen nowhere before
        ends = [i for i in range(1, len(tokens)) if tokens[i - 1] < 128 and tokens[i] < 128
                and bytes(tokens[i - 1:i + 1]) not in bytes(t for t in tokens[:i] if t < 256)]
        stops[rid] = (bytes(tokens[(end := rng.choice(ends)) - 1:end + 1]).decode(),) if ends else ()

    def run(**settings) -> tuple[dict, object]:
        core = make_core(buffer_size=16, chunk_size=8, **settings)
        reqs = [request(f"r{i}", p, max_new_tokens=NEW, ignore_eos=True, stop_strings=stops[f"r{i}"])
                for i, p in enumerate(ps)]
        return run_to_end(core, {0: reqs[:2], 3: reqs[2:]}), core.stats()

    want, plain = run()
    monkeypatch.setattr(core_module, "propose_ngram", lambda tokens, k: next(
        f for p, f in full.items() if tokens[:len(p)] == list(p))[len(tokens):len(tokens) + k])
    got, spec = run(speculative_algorithm="ngram", speculative_num_draft_tokens=4)
    assert spec.accepted_tokens > len(ps), f"seed {seed}"
    assert sum(bool(s) for s in stops.values()) >= 2, f"seed {seed}"
    for rid, chunk in want.items():
        mine = got[rid]
        assert (mine.token_ids, mine.text, mine.finish_reason) == (chunk.token_ids, chunk.text, chunk.finish_reason), (
            f"{rid} (seed {seed})")
        assert mine.completion_tokens == chunk.completion_tokens == len(chunk.token_ids), f"{rid} (seed {seed})"
    assert spec.tokens_by_path == plain.tokens_by_path, f"seed {seed}"
