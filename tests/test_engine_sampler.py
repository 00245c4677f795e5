"""The batched sampler against per-request oracles: filtering row by row, each output position's draw exactly
that of `torch.multinomial` on a generator seeded from the request's seed and that position, tokens independent of
the rest of the batch and of the drafts, and speculative acceptance that keeps the target distribution at every
draft position."""

from __future__ import annotations

import math
import random

import pytest
import torch
from kvbuffer.service.engine.api import SamplingParams
from kvbuffer.service.engine.sampler import accept_greedy, choose, choose_batch, probabilities, row_seed
from qwen3_next_cases import fresh_seed

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def reference_probabilities(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The filtering of one row `[V]` as the engine did it request by request."""
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        drop = torch.cumsum(sorted_probs, 0) - sorted_probs > p.top_p
        probs = probs.clone()
        probs[order[drop]] = 0.0
        probs = probs / probs.sum()
    return probs


def random_params(rng: random.Random, V: int, greedy: float = 0.3) -> SamplingParams:
    if rng.random() < greedy:
        return SamplingParams()
    return SamplingParams(temperature=rng.uniform(0.3, 2.0),
                          top_k=rng.choice([0, rng.randrange(1, V + 1), V, V + 7]),
                          top_p=rng.choice([1.0, rng.uniform(0.05, 1.0)]))


def random_requests(rng: random.Random, V: int, n: int) -> tuple[list[SamplingParams], list[int], list[int]]:
    """n requests' sampling parameters, seeds (the whole uint64 range) and output positions."""
    return ([random_params(rng, V) for _ in range(n)], [rng.randrange(2**64) for _ in range(n)],
            [rng.randrange(4096) for _ in range(n)])


def multinomial(row: torch.Tensor, p: SamplingParams, seed: int, position: int) -> int:
    """The oracle: torch.multinomial on the request's filtered distribution, with a generator seeded for that
    output position."""
    generator = torch.Generator(row.device).manual_seed(row_seed(seed, position))
    return int(torch.multinomial(reference_probabilities(row, p), 1, generator=generator))


@pytest.mark.parametrize("device", DEVICES)
def test_batched_filtering_is_the_per_request_filtering(device):
    seed = fresh_seed()
    rng = random.Random(seed)
    V = rng.randrange(2, 400)
    params = [random_params(rng, V, greedy=0.0) for _ in range(rng.randrange(1, 24))]
    logits = torch.randn(len(params), V, generator=torch.Generator().manual_seed(seed)).to(device) * 4
    got = probabilities(logits, params)
    want = torch.stack([reference_probabilities(row, p) for row, p in zip(logits, params, strict=True)])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=f"seed {seed}")
    assert torch.equal(got == 0, want == 0), f"seed {seed}: a filter kept or dropped another token"


@pytest.mark.parametrize("device", DEVICES)
def test_each_positions_draw_is_multinomial_on_its_own_seed(device):
    """Requests without drafts over several steps, greedy ones and chunks that do not sample mixed in: each
    sampled token is what `torch.multinomial` draws with a generator seeded row_seed(seed, position)."""
    seed = fresh_seed()
    rng = random.Random(seed)
    V, n = rng.randrange(2, 300), rng.randrange(1, 12)
    params, seeds, positions = random_requests(rng, V, n)
    for step in range(4):
        takes = [rng.choice([0, 1, 1]) for _ in range(n)]
        spans = [(sum(takes[:i]), k) for i, k in enumerate(takes)]
        logits = torch.randn(max(sum(takes), 1), V, generator=torch.Generator().manual_seed(seed + step)).to(device)
        got = choose_batch(logits if sum(takes) else None, spans, [[] for _ in range(n)], params, seeds, positions)
        for i, ((a, k), p) in enumerate(zip(spans, params, strict=True)):
            if k == 0:
                want = []
            elif p.temperature == 0:
                want = [int(logits[a].argmax())]
            else:
                want = [multinomial(logits[a], p, seeds[i], positions[i])]
            assert got[i] == want, f"seed {seed}, step {step}, request {i}: {p}"
        positions = [q + k for q, k in zip(positions, takes, strict=True)]


@pytest.mark.parametrize("device", DEVICES)
def test_a_requests_tokens_depend_on_neither_the_batch_nor_its_drafts(device):
    """With drafts (target-heavy, so every acceptance count occurs): the batch gives each request what it gets alone,
    which is the matching prefix of the tokens its positions draw without any draft."""
    seed = fresh_seed()
    rng = random.Random(seed)
    V, n = rng.randrange(3, 60), rng.randrange(2, 16)
    params, seeds, positions = random_requests(rng, V, n)
    for step in range(3):
        logits, drafts, spans, start = [], [], [], 0
        for _ in range(n):
            k = rng.choice([0, 1, 2, 4])
            rows = torch.randn(k, V, generator=torch.Generator().manual_seed(rng.randrange(2**31))) * 3
            drafts.append([int(r.argmax()) if rng.random() < 0.7 else rng.randrange(V) for r in rows[:-1]])
            logits.append(rows)
            spans.append((start, k))
            start += k
        batch = torch.cat(logits).to(device)
        got = choose_batch(batch, spans, drafts, params, seeds, positions)
        for i, ((a, k), d, p) in enumerate(zip(spans, drafts, params, strict=True)):
            rows = batch[a:a + k]
            want = [] if k == 0 else choose(rows, d, p, seeds[i], positions[i])
            assert got[i] == want, f"seed {seed}, step {step}, request {i}"
            undrafted = [choose(rows[j:j + 1], [], p, seeds[i], positions[i] + j)[0] for j in range(k)]
            assert want == accept_greedy(undrafted, d), f"seed {seed}, step {step}, request {i}"
            if k and p.temperature == 0:
                assert undrafted == rows.argmax(-1).tolist(), f"seed {seed}"


def test_speculative_acceptance_keeps_the_target_distribution_at_every_position():
    """Copies of one request with two drafts, each with its own seed, in one batch with a greedy request and a
    non-sampling chunk: the emitted token at position j, given drafts 0..j-1 were accepted, follows p_j."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    V, n = 6, 6000
    logits = torch.randn(3, V, generator=gen) * 1.5
    params = SamplingParams(temperature=0.9, top_k=5, top_p=0.95)
    p = [reference_probabilities(row, params) for row in logits]
    drafts = [int(p[0].argmax()), int(p[1].argmax())]
    greedy = torch.randn(2, V, generator=gen)
    batch = torch.cat([greedy, logits.repeat(n, 1)])
    spans = [(0, 2), (2, 0)] + [(2 + 3 * i, 3) for i in range(n)]
    rng = random.Random(seed)
    out = choose_batch(batch, spans, [[int(greedy[0].argmax())], [], *[drafts] * n],
                       [SamplingParams(), SamplingParams(), *[params] * n],
                       [None, None, *[rng.randrange(2**64) for _ in range(n)]], [0, 0, *[0] * n])
    assert out[0] == greedy.argmax(-1).tolist() and out[1] == []
    emitted = out[2:]
    for j in range(3):
        reached = [e for e in emitted if e[:j] == drafts[:j]]
        counts = torch.bincount(torch.tensor([e[j] for e in reached]), minlength=V).float()
        tolerance = 5 * math.sqrt(0.25 / len(reached))
        assert (counts / len(reached) - p[j]).abs().max() < tolerance, f"seed {seed}, position {j}"
        assert counts[p[j] == 0].sum() == 0, f"seed {seed}: a filtered token was emitted"
