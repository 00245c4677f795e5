"""Token choice per request: greedy or temperature / top-k / top-p, and the acceptance of speculative drafts.

Drafts are deterministic proposals, so exact speculative sampling accepts draft d with probability p(d) and,
on rejection, samples from p with d removed. With greedy sampling a draft is accepted iff it is the argmax,
which makes the output token-for-token the output without speculation.
"""

from __future__ import annotations

import torch

from .api import SamplingParams


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def probabilities(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Sampling distribution `[V]` from fp32 logits `[V]` (temperature > 0) after top-k and top-p filtering."""
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        drop = torch.cumsum(sorted_probs, 0) - sorted_probs > p.top_p  # keeps the top token always
        probs = probs.clone()
        probs[order[drop]] = 0.0
        probs = probs / probs.sum()
    return probs


def accept_greedy(targets: list[int], drafts: list[int]) -> list[int]:
    """The drafts that match the argmax at their position, then the argmax after the last of them."""
    accepted = next((i for i, (d, t) in enumerate(zip(drafts, targets, strict=False)) if d != t), len(drafts))
    return targets[:accepted + 1]


def choose(logits: torch.Tensor, drafts: list[int], p: SamplingParams,
           generator: torch.Generator | None) -> list[int]:
    """Emitted tokens from logits `[1 + len(drafts), V]`: the accepted drafts, then one token of the target."""
    if p.temperature == 0.0:
        return accept_greedy(logits.argmax(-1).tolist(), drafts)
    out = []
    for i, d in enumerate(drafts):
        probs = probabilities(logits[i], p)
        if torch.rand((), generator=generator, device=probs.device) < probs[d]:
            out.append(d)
            continue
        probs[d] = 0.0
        return [*out, int(torch.multinomial(probs / probs.sum(), 1, generator=generator))]
    probs = probabilities(logits[len(drafts)], p)
    return [*out, int(torch.multinomial(probs, 1, generator=generator))]


def choose_batch(logits: torch.Tensor | None, spans: list[tuple[int, int]], drafts: list[list[int]],
                 params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[list[int]]:
    """`choose` for every request of a step; greedy ones share one argmax and one device-to-host copy."""
    targets = logits.argmax(-1).tolist() if logits is not None else []
    return [[] if k == 0 else accept_greedy(targets[a:a + k], d) if p.temperature == 0.0
            else choose(logits[a:a + k], d, p, g)
            for (a, k), d, p, g in zip(spans, drafts, params, generators, strict=True)]


def logprobs(logits: torch.Tensor, tokens: list[int]) -> list[float]:
    """Log-probabilities of `tokens` under the model's raw distribution at each of their rows."""
    lp = torch.log_softmax(logits[:len(tokens)], dim=-1)
    return lp[torch.arange(len(tokens), device=lp.device), torch.tensor(tokens, device=lp.device)].tolist()
