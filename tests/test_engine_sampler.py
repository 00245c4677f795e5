"""The batched sampler against per-request oracles: filtering row by row, seeded draws exactly those of
`torch.multinomial` on the request's own generator, tokens independent of the rest of the batch, and speculative
acceptance that keeps the target distribution at every draft position."""

from __future__ import annotations

import math
import random

import pytest
import torch
from kvbuffer.service.engine.api import SamplingParams
from kvbuffer.service.engine.sampler import accept_greedy, choose, choose_batch, probabilities
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


def generators(seeds: list[int], device: str) -> list[torch.Generator]:
    return [torch.Generator(device).manual_seed(s) for s in seeds]


def random_requests(rng: random.Random, V: int, n: int, device: str
                    ) -> tuple[list[SamplingParams], list[torch.Generator], list[torch.Generator]]:
    """n requests' sampling parameters and two identically seeded generators each (one for the oracle)."""
    params = [random_params(rng, V) for _ in range(n)]
    seeds = [rng.randrange(2**62) for _ in range(n)]
    return params, generators(seeds, device), generators(seeds, device)


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
def test_seeded_draws_are_those_of_multinomial_on_the_requests_generator(device):
    """Requests without drafts over several steps, greedy ones and chunks that do not sample mixed in: each
    sampled token is what `torch.multinomial` drew from the request's generator, which ends in the same state."""
    seed = fresh_seed()
    rng = random.Random(seed)
    V, n = rng.randrange(2, 300), rng.randrange(1, 12)
    params, gens, oracle_gens = random_requests(rng, V, n, device)
    for step in range(4):
        takes = [rng.choice([0, 1, 1]) for _ in range(n)]
        spans = [(sum(takes[:i]), k) for i, k in enumerate(takes)]
        logits = torch.randn(max(sum(takes), 1), V, generator=torch.Generator().manual_seed(seed + step)).to(device)
        got = choose_batch(logits if sum(takes) else None, spans, [[] for _ in range(n)], params, gens)
        for i, ((a, k), p) in enumerate(zip(spans, params, strict=True)):
            if k == 0:
                want = []
            elif p.temperature == 0:
                want = [int(logits[a].argmax())]
            else:
                want = [int(torch.multinomial(reference_probabilities(logits[a], p), 1, generator=oracle_gens[i]))]
            assert got[i] == want, f"seed {seed}, step {step}, request {i}: {p}"
    for g, o in zip(gens, oracle_gens, strict=True):
        assert torch.equal(g.get_state(), o.get_state()), f"seed {seed}"


@pytest.mark.parametrize("device", DEVICES)
def test_a_requests_tokens_do_not_depend_on_the_rest_of_the_batch(device):
    """With drafts (argmax-heavy, so every acceptance count occurs): the batch gives each request what it gets
    alone from a generator with its seed; greedy requests get the matching prefix of the argmax."""
    seed = fresh_seed()
    rng = random.Random(seed)
    V, n = rng.randrange(3, 60), rng.randrange(2, 16)
    params, gens, alone_gens = random_requests(rng, V, n, device)
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
        got = choose_batch(batch, spans, drafts, params, gens)
        for i, ((a, k), d, p) in enumerate(zip(spans, drafts, params, strict=True)):
            rows = batch[a:a + k]
            want = [] if k == 0 else choose(rows, d, p, alone_gens[i])
            assert got[i] == want, f"seed {seed}, step {step}, request {i}"
            if k and p.temperature == 0:
                assert want == accept_greedy(rows.argmax(-1).tolist(), d), f"seed {seed}"


def test_speculative_acceptance_keeps_the_target_distribution_at_every_position():
    """Copies of one request with two drafts, each on its own generator, in one batch with a greedy request and
    a non-sampling chunk: the emitted token at position j, given drafts 0..j-1 were accepted, follows p_j."""
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
    gens = generators([int(torch.randint(2**62, (), generator=gen)) for _ in range(n)], "cpu")
    out = choose_batch(batch, spans, [[int(greedy[0].argmax())], [], *[drafts] * n],
                       [SamplingParams(), SamplingParams(), *[params] * n], [None, None, *gens])
    assert out[0] == greedy.argmax(-1).tolist() and out[1] == []
    emitted = out[2:]
    for j in range(3):
        reached = [e for e in emitted if e[:j] == drafts[:j]]
        counts = torch.bincount(torch.tensor([e[j] for e in reached]), minlength=V).float()
        tolerance = 5 * math.sqrt(0.25 / len(reached))
        assert (counts / len(reached) - p[j]).abs().max() < tolerance, f"seed {seed}, position {j}"
        assert counts[p[j] == 0].sum() == 0, f"seed {seed}: a filtered token was emitted"
