"""Token choice per request: greedy or temperature / top-k / top-p, and the acceptance of speculative drafts.

Every output position of a sampling request has its own draw, seeded from the request's seed and that position
(`row_seed`): the token at output position i is argmax(p_i / E_i), E_i one Exp(1) per vocabulary entry from a
generator seeded with row_seed(seed, i), which is what `torch.multinomial(p_i, 1, generator)` draws. So a seed fixes
the output whatever else happens: the other requests of a step, the token budget, preemption and recomputation,
overlapped steps, and speculation.

A draft is accepted iff it equals the token its position draws (for greedy requests: the argmax). For a
deterministic draft d that is exact speculative sampling: d is accepted with probability p(d), and on rejection
the token drawn is distributed as p with d removed. And since the token at a position does not depend on
whether a draft stood there, the output with speculation is token for token the output without it, sampled or
greedy.

A step costs one device-to-host copy for all its requests: every row's token (argmax, or drawn) is chosen on the
device first; the host then keeps drafts up to the first that differs from its row's token, and that token.
"""

from __future__ import annotations

import math

import torch

from .api import SamplingParams
from .staging import pack

_MASK = 2**64 - 1


def row_seed(seed: int, position: int) -> int:
    """The seed of the draw for output position `position` of a request seeded `seed`: that position's output of
    the splitmix64 generator seeded with `seed`, so every position (and every request) draws its own stream."""
    x = (seed + 0x9E3779B97F4A7C15 * (position + 1)) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def probabilities(logits: torch.Tensor, params: SamplingParams | list[SamplingParams]) -> torch.Tensor:
    """Sampling distributions `[R, V]` from fp32 logits `[R, V]`, row r under params[r] (temperature > 0), after
    top-k and top-p filtering; or `[V]` from `[V]` under one SamplingParams.

    The parameters travel as per-row tensors, so any mix of requests costs the same few launches and no sync.
    """
    if isinstance(params, SamplingParams):
        return probabilities(logits[None], [params])[0]
    V, device = logits.shape[-1], logits.device
    ks = [p.top_k if 0 < p.top_k < V else 0 for p in params]  # 0: no top-k
    ps = [p.top_p if p.top_p < 1.0 else math.inf for p in params]  # inf: no top-p, not even by rounding
    temperature, top_p = pack([[p.temperature for p in params], ps], device, torch.float32)
    logits = logits / temperature[:, None]
    if max(ks) > 0:
        (top_k,) = pack([ks], device)
        kth = torch.topk(logits, max(ks)).values.gather(1, (top_k - 1).clamp(min=0)[:, None])
        logits = logits.masked_fill((logits < kth) & (top_k > 0)[:, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if min(ps) < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        drop = torch.cumsum(sorted_probs, -1) - sorted_probs > top_p[:, None]  # keeps the top token always
        probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
        probs = probs / torch.where(top_p[:, None] < 1.0, probs.sum(-1, keepdim=True), 1.0)  # filtered rows only
    return probs


def accept_greedy(targets: list[int], drafts: list[int]) -> list[int]:
    """The drafts that match the target token at their position, then the target after the last of them."""
    accepted = next((i for i, (d, t) in enumerate(zip(drafts, targets, strict=False)) if d != t), len(drafts))
    return targets[:accepted + 1]


def _sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int]) -> torch.Tensor:
    """One token per row of `logits` `[R, V]` (temperature > 0), drawn as torch.multinomial draws it from the row's
    filtered distribution with a generator seeded seeds[r], on the device: argmax(p / E), E ~ Exp(1)."""
    probs = probabilities(logits, params)
    noise = torch.empty_like(probs)
    generator = torch.Generator(device=logits.device)
    for row, seed in enumerate(seeds):  # one launch per row: its draw depends on nothing but its seed
        noise[row].exponential_(generator=generator.manual_seed(seed))
    return (probs / noise).argmax(-1)


def target_tokens(logits: torch.Tensor, spans: list[tuple[int, int]], params: list[SamplingParams],
                  seeds: list[int | None], positions: list[int]) -> torch.Tensor:
    """The token of every row of `logits` `[R, V]`, on the device: request i owns rows spans[i] = (first, count),
    the first at output position positions[i]; greedy requests take the argmax, sampling ones their draw."""
    picks = logits.argmax(-1)
    rows, row_params, row_seeds = [], [], []
    for (a, k), p, seed, position in zip(spans, params, seeds, positions, strict=True):
        if p.temperature != 0.0 and k:
            if seed is None:
                raise ValueError("a sampling request needs a seed")
            rows += range(a, a + k)
            row_params += [p] * k
            row_seeds += [row_seed(seed, position + j) for j in range(k)]
    if rows:
        (index,) = pack([rows], logits.device)
        picks = picks.index_copy(0, index, _sample(logits[index], row_params, row_seeds))
    return picks


def choose_batch(logits: torch.Tensor | None, spans: list[tuple[int, int]], drafts: list[list[int]],
                 params: list[SamplingParams], seeds: list[int | None], positions: list[int]) -> list[list[int]]:
    """The tokens each request of a step emits (its accepted drafts, then one token), with one device-to-host copy
    for all of them. Request i has 1 + len(drafts[i]) rows (or none: a prefill chunk that samples nothing)."""
    if logits is None:
        return [[] for _ in spans]
    targets = target_tokens(logits, spans, params, seeds, positions).tolist()  # the step's one copy to the host
    return [accept_greedy(targets[a:a + k], d) if k else [] for (a, k), d in zip(spans, drafts, strict=True)]


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int | None],
                positions: list[int]) -> torch.Tensor:
    """One token per row of `logits` `[R, V]` (requests without drafts), left on the device: the token
    `choose_batch` would choose, so overlapped steps emit exactly what synchronous ones do."""
    return target_tokens(logits, [(i, 1) for i in range(len(params))], params, seeds, positions)


def choose(logits: torch.Tensor, drafts: list[int], p: SamplingParams, seed: int | None = None,
           position: int = 0) -> list[int]:
    """Emitted tokens from logits `[1 + len(drafts), V]`: the accepted drafts, then one token of the target."""
    return choose_batch(logits, [(0, logits.shape[0])], [drafts], [p], [seed], [position])[0]


def logprobs(logits: torch.Tensor, tokens: list[int]) -> list[float]:
    """Log-probabilities of `tokens` under the model's raw distribution at each of their rows."""
    lp = torch.log_softmax(logits[:len(tokens)], dim=-1)
    return lp[torch.arange(len(tokens), device=lp.device), torch.tensor(tokens, device=lp.device)].tolist()
