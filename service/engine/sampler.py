"""Token choice per request: greedy or temperature / top-k / top-p, and the acceptance of speculative drafts.

Drafts are deterministic proposals, so exact speculative sampling accepts draft d with probability p(d) and,
on rejection, samples from p with d removed. With greedy sampling a draft is accepted iff it is the argmax,
which makes the output token-for-token the output without speculation.

A step costs one device-to-host copy for all its requests: every row's argmax, and for sampling requests every
row's acceptance test and a token drawn from that row's residual distribution, are computed on the device first;
the host then keeps drafts up to the first rejected one and that row's token. Drawing a token for every row,
used or not, is what spares a sync per draft; the token that is used is drawn independently of the acceptance
test, so it has the distribution it had when drawn after it. Each request draws from its own generator (its
seed), so its tokens do not depend on the other requests of the step. Without drafts a request draws exactly
what `torch.multinomial(p, 1, generator)` drew (argmax(p / Exp(1)), one exponential per vocabulary entry), so a
seed gives the tokens it gave when requests were sampled one by one. With drafts it draws one uniform per draft
and one exponential row per logits row, however many drafts are accepted: a fixed amount per step, so a seed
still fixes the output (though not the one of the old draft-by-draft draws, which stopped at a rejection).
"""

from __future__ import annotations

import math

import torch

from .api import SamplingParams
from .staging import pack


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


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
    """The drafts that match the argmax at their position, then the argmax after the last of them."""
    accepted = next((i for i, (d, t) in enumerate(zip(drafts, targets, strict=False)) if d != t), len(drafts))
    return targets[:accepted + 1]


def _draw(logits: torch.Tensor, spans: list[tuple[int, int]], drafts: list[list[int]], params: list[SamplingParams],
          generators: list[torch.Generator | None]) -> torch.Tensor:
    """For sampling requests with rows `spans` of `logits` (1 + len(drafts) each), per row on the device: a token
    drawn from the row's distribution with its draft removed (the last row: nothing removed), then (1 or 0)
    whether the row's draft is accepted. `[2 * rows]` int64."""
    V, device = logits.shape[-1], logits.device
    rows, draft = pack([[a + j for a, k in spans for j in range(k)], [t for d in drafts for t in [*d, -1]]], device)
    probs = probabilities(logits[rows], [p for p, (_, k) in zip(params, spans, strict=True) for _ in range(k)])
    p_draft = probs.gather(1, draft.clamp(min=0)[:, None])[:, 0]
    residual = probs.masked_fill(torch.arange(V, device=device) == draft[:, None], 0.0)
    uniform, noise = torch.ones(draft.shape[0], device=device), torch.empty_like(residual)
    at = 0
    for d, g in zip(drafts, generators, strict=True):  # one request's draws come from its own generator only
        if d:
            uniform[at:at + len(d)].uniform_(generator=g)
        noise[at:at + len(d) + 1].exponential_(generator=g)
        at += len(d) + 1
    return torch.cat(((residual / noise).argmax(-1), (uniform < p_draft).long()))


def choose_batch(logits: torch.Tensor | None, spans: list[tuple[int, int]], drafts: list[list[int]],
                 params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[list[int]]:
    """`choose` for every request of a step, with one device-to-host copy for all of them."""
    if logits is None:
        return [[] for _ in spans]
    sampled = [i for i, ((_, k), p) in enumerate(zip(spans, params, strict=True)) if k and p.temperature != 0.0]
    picks = logits.argmax(-1)
    if sampled:
        picks = torch.cat((picks, _draw(logits, [spans[i] for i in sampled], [drafts[i] for i in sampled],
                                        [params[i] for i in sampled], [generators[i] for i in sampled])))
    R, S = logits.shape[0], sum(spans[i][1] for i in sampled)
    host = picks.tolist()  # the step's one device-to-host copy
    targets, tokens, accepted = host[:R], host[R:R + S], host[R + S:]
    out, at = [], 0
    for (a, k), d, p in zip(spans, drafts, params, strict=True):
        if k == 0 or p.temperature == 0.0:
            out.append(accept_greedy(targets[a:a + k], d) if k else [])
            continue
        n = next((j for j in range(len(d)) if not accepted[at + j]), len(d))
        out.append([*d[:n], tokens[at + n]])
        at += k
    return out


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
                ) -> torch.Tensor:
    """One token per row of `logits` `[R, V]` (requests without drafts), left on the device: the argmax for greedy
    rows, and for sampling rows the token `choose_batch` would draw (the same generator calls), so a seed gives
    the same tokens whether a step is read back at once or overlapped with the next one."""
    picks = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if p.temperature != 0.0]
    if sampled:
        drawn = _draw(logits, [(i, 1) for i in sampled], [[] for _ in sampled], [params[i] for i in sampled],
                      [generators[i] for i in sampled])
        (rows,) = pack([sampled], logits.device)
        picks = picks.index_copy(0, rows, drawn[:len(sampled)])
    return picks


def choose(logits: torch.Tensor, drafts: list[int], p: SamplingParams,
           generator: torch.Generator | None) -> list[int]:
    """Emitted tokens from logits `[1 + len(drafts), V]`: the accepted drafts, then one token of the target."""
    return choose_batch(logits, [(0, logits.shape[0])], [drafts], [p], [generator])[0]


def logprobs(logits: torch.Tensor, tokens: list[int]) -> list[float]:
    """Log-probabilities of `tokens` under the model's raw distribution at each of their rows."""
    lp = torch.log_softmax(logits[:len(tokens)], dim=-1)
    return lp[torch.arange(len(tokens), device=lp.device), torch.tensor(tokens, device=lp.device)].tolist()
