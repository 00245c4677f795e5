"""Plain-PyTorch Gated DeltaNet: the recurrence and every KVBuffer operation, in any dtype.

Run in fp64 it is the oracle the Triton kernels are tested against; run in fp32 it is the CPU backend
of the serving engine. Each function has the signature of the kernel it checks (see `kvbuffer.kernels.ops`
for shapes), and writes the pools in place exactly as the kernel does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .pools import BufferPool

Tensor = torch.Tensor

NORM_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def gate(a: torch.Tensor, b: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log decay g = -exp(A_log) * softplus(a + dt_bias) (<= 0) and write strength beta = sigmoid(b)."""
    return -A_log.exp() * F.softplus(a + dt_bias), torch.sigmoid(b)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _prepare(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor, scale: float | None,
             dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gating and normalization in `dtype`; q and k expanded from H key heads to HV value heads."""
    groups = v.shape[-2] // q.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qn = (l2norm(q.to(dtype)) * scale).repeat_interleave(groups, dim=-2)
    kn = l2norm(k.to(dtype)).repeat_interleave(groups, dim=-2)
    g, beta = gate(a.to(dtype), b.to(dtype), A_log.to(dtype), dt_bias.to(dtype))
    return qn, kn, v.to(dtype), g, beta


def recurrence(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
               state: Tensor | None = None, scale: float | None = None) -> tuple[Tensor, Tensor]:
    """The Gated DeltaNet recurrence over one sequence, token by token.

    q, k `[T, H, K]`, v `[T, HV, V]`, a, b `[T, HV]`, state `[HV, V, K]` or None (zeros).
    Returns outputs `[T, HV, V]` and the final state `[HV, V, K]`, both in the compute dtype.
    """
    dtype = _compute_dtype(v, *(() if state is None else (state,)))
    qn, kn, v, g, beta = _prepare(q, k, v, a, b, A_log, dt_bias, scale, dtype)
    HV, V, K = v.shape[1], v.shape[2], qn.shape[2]
    return scan(qn, kn, v, g, beta, torch.zeros(HV, V, K, dtype=dtype, device=v.device) if state is None else state)


def scan(qn: Tensor, kn: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """The recurrence's token loop on gated, normalized inputs (what a prefill kernel receives): qn (scaled), kn
    `[T, HV, K]`, v `[T, HV, V]`, log decays g and write strengths beta `[T, HV]`, state `[HV, V, K]` (not written).
    Returns outputs `[T, HV, V]` and the final state in v's dtype."""
    S = state.to(v.dtype).clone()
    out = torch.empty_like(v)
    for t in range(v.shape[0]):
        S = S * g[t].exp()[:, None, None]
        delta = beta[t, :, None] * (v[t] - torch.einsum("hvk,hk->hv", S, kn[t]))
        S = S + delta[:, :, None] * kn[t][:, None, :]
        out[t] = torch.einsum("hvk,hk->hv", S, qn[t])
    return out, S


def _checkpoints(states: torch.Tensor, read_slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """S0 per request: the checkpoint at read_slots, zeros where read_slots < 0."""
    S0 = states[read_slots.clamp(min=0).long()].to(dtype)
    return S0 * (read_slots >= 0).to(dtype)[:, None, None, None]


def _buffer_view(buffer: BufferPool, slots: torch.Tensor, groups: int,
                 dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Normalized keys `[B, HV, L, K]`, values `[B, HV, L, V]`, decays `[B, HV, L]` of each request's buffer.

    Decays stay in at least their stored precision (fp64): weights are differences of long cumulative sums.
    """
    slots = slots.long()
    keys = l2norm(buffer.keys[slots].to(dtype)).repeat_interleave(groups, dim=1)
    decays = buffer.decay[slots].to(torch.promote_types(dtype, buffer.decay.dtype))
    return keys, buffer.values[slots].to(dtype), decays


def buffered_decode(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
                    states: Tensor, buffer: BufferPool, buf_slots: Tensor, buf_lens: Tensor, read_slots: Tensor,
                    write_slots: Tensor, scale: float | None = None) -> Tensor:
    """One token per request from checkpoint + buffer; appends (k, d, G) at buf_lens; flushes to write_slots."""
    dtype = _compute_dtype(v, states, buffer.values)
    qn, kn, v, g, beta = _prepare(q, k, v, a, b, A_log, dt_bias, scale, dtype)
    groups = v.shape[1] // q.shape[1]
    Kb, Db, Gb = _buffer_view(buffer, buf_slots, groups, dtype)
    lens = buf_lens.long()
    valid = torch.arange(buffer.capacity, device=v.device)[None, :] < lens[:, None]  # [B, L]
    G_prev = Gb.gather(2, (lens - 1).clamp(min=0)[:, None, None].expand(-1, Gb.shape[1], 1))[..., 0]
    G = torch.where(lens[:, None] > 0, G_prev, 0.0) + g.to(Gb.dtype)  # [B, HV]
    w = torch.where(valid[:, None, :], torch.exp(G[..., None] - Gb).to(dtype), 0.0)  # [B, HV, L]
    S0 = _checkpoints(states, read_slots, dtype)
    decay = G.exp().to(dtype)
    kk = torch.einsum("bhlk,bhk->bhl", Kb, kn)
    d = beta[..., None] * (v - decay[..., None] * torch.einsum("bhvk,bhk->bhv", S0, kn)
                           - torch.einsum("bhl,bhlv->bhv", w * kk, Db))
    qk = torch.einsum("bhlk,bhk->bhl", Kb, qn)
    o = (decay[..., None] * torch.einsum("bhvk,bhk->bhv", S0, qn) + torch.einsum("bhl,bhlv->bhv", w * qk, Db)
         + (qn * kn).sum(-1, keepdim=True) * d)
    slots = buf_slots.long()
    buffer.keys[slots, :, lens] = k.to(buffer.keys.dtype)
    buffer.values[slots, :, lens] = d.to(buffer.values.dtype)
    buffer.decay[slots, :, lens] = G.to(buffer.decay.dtype)
    flush = write_slots >= 0
    if bool(flush.any()):
        S = (decay[..., None, None] * S0 + torch.einsum("bhl,bhlv,bhlk->bhvk", w, Db, Kb)
             + d[..., :, None] * kn[..., None, :])
        states[write_slots[flush].long()] = S[flush].to(states.dtype)
    return o.to(q.dtype)


def recurrent_decode(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
                     states: Tensor, slots: Tensor, scale: float | None = None) -> Tensor:
    """The baseline: one token per request, reading and writing its state at `slots`."""
    dtype = _compute_dtype(v, states)
    qn, kn, v, g, beta = _prepare(q, k, v, a, b, A_log, dt_bias, scale, dtype)
    S = states[slots.long()].to(dtype) * g.exp()[..., None, None]
    delta = beta[..., None] * (v - torch.einsum("bhvk,bhk->bhv", S, kn))
    S = S + delta[..., :, None] * kn[..., None, :]
    states[slots.long()] = S.to(states.dtype)
    return torch.einsum("bhvk,bhk->bhv", S, qn).to(q.dtype)


def verify(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor, states: Tensor,
           buffer: BufferPool, cu_seqlens: Tensor, buf_slots: Tensor, buf_lens: Tensor, read_slots: Tensor,
           scale: float | None = None) -> Tensor:
    """T_i tokens per request in parallel (draft verification, short prefill), from checkpoint + buffer.

    Entries are appended at buf_lens[i] + t; nothing else is written, so keeping the first `accepted`
    of them (advancing buf_lens by `accepted`) is the whole commit.
    """
    dtype = _compute_dtype(v, states, buffer.values)
    qn, kn, vv, g, beta = _prepare(q, k, v, a, b, A_log, dt_bias, scale, dtype)
    groups = v.shape[1] // q.shape[1]
    out = torch.empty_like(vv)
    starts, lens = cu_seqlens.tolist(), buf_lens.tolist()
    for i in range(len(starts) - 1):
        s, e, n0, slot = starts[i], starts[i + 1], lens[i], int(buf_slots[i])
        if e == s:
            continue
        Kb, Db, Gb = (x[0, :, :n0] for x in _buffer_view(buffer, buf_slots[i:i + 1], groups, dtype))
        G0 = Gb[:, -1] if n0 > 0 else torch.zeros(vv.shape[1], dtype=Gb.dtype, device=v.device)
        G = G0[:, None] + torch.cumsum(g[s:e].T.to(Gb.dtype), dim=1)  # [HV, T]
        S0 = _checkpoints(states, read_slots[i:i + 1], dtype)[0]
        Qt, Kt, Vt, bt = qn[s:e].transpose(0, 1), kn[s:e].transpose(0, 1), vv[s:e].transpose(0, 1), beta[s:e].T
        Wb = torch.exp(G[:, :, None] - Gb[:, None, :]).to(dtype)  # [HV, T, n0]
        causal = torch.ones(e - s, e - s, dtype=torch.bool, device=v.device).tril()
        Gamma = torch.exp(torch.where(causal, G[:, :, None] - G[:, None, :], float("-inf"))).to(dtype)
        eG = G.exp().to(dtype)
        rhs = bt[..., None] * (Vt - eG[..., None] * torch.einsum("hvk,htk->htv", S0, Kt)
                               - (Kt @ Kb.transpose(1, 2) * Wb) @ Db)
        A = bt[..., None] * (Kt @ Kt.transpose(1, 2) * Gamma).tril(-1)
        eye = torch.eye(e - s, dtype=dtype, device=v.device)
        D = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
        O = (eG[..., None] * torch.einsum("hvk,htk->htv", S0, Qt) + (Qt @ Kb.transpose(1, 2) * Wb) @ Db
             + (Qt @ Kt.transpose(1, 2) * Gamma) @ D)
        out[s:e] = O.transpose(0, 1)
        buffer.keys[slot, :, n0:n0 + e - s] = k[s:e].transpose(0, 1).to(buffer.keys.dtype)
        buffer.values[slot, :, n0:n0 + e - s] = D.to(buffer.values.dtype)
        buffer.decay[slot, :, n0:n0 + e - s] = G.to(buffer.decay.dtype)
    return out.to(q.dtype)


def fold(states: Tensor, buffer: BufferPool, buf_slots: Tensor, buf_lens: Tensor, read_slots: Tensor,
         write_slots: Tensor) -> None:
    """Folds each buffer into its checkpoint: S = e^{G_last} S0 + sum_j e^{G_last - G_j} k_j d_j^T."""
    dtype = _compute_dtype(states, buffer.values)
    groups = buffer.values.shape[1] // buffer.keys.shape[1]
    Kb, Db, Gb = _buffer_view(buffer, buf_slots, groups, dtype)
    lens = buf_lens.long()
    valid = torch.arange(buffer.capacity, device=states.device)[None, :] < lens[:, None]
    G_last = Gb.gather(2, (lens - 1).clamp(min=0)[:, None, None].expand(-1, Gb.shape[1], 1))[..., 0]
    G_last = torch.where(lens[:, None] > 0, G_last, 0.0)
    w = torch.where(valid[:, None, :], torch.exp(G_last[..., None] - Gb).to(dtype), 0.0)
    S = G_last.exp().to(dtype)[..., None, None] * _checkpoints(states, read_slots, dtype)
    S = S + torch.einsum("bhl,bhlv,bhlk->bhvk", w, Db, Kb)
    due = write_slots >= 0
    states[write_slots[due].long()] = S[due].to(states.dtype)


def prefill(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor, states: Tensor,
            cu_seqlens: Tensor, read_slots: Tensor, write_slots: Tensor, scale: float | None = None) -> Tensor:
    """Whole prompts into checkpoints: starts from read_slots (zeros where < 0), final states to write_slots."""
    out = torch.empty(v.shape, dtype=q.dtype, device=v.device)
    starts = cu_seqlens.tolist()
    for i in range(len(starts) - 1):
        s, e = starts[i], starts[i + 1]
        S0 = states[int(read_slots[i])] if int(read_slots[i]) >= 0 else None
        o, S = recurrence(q[s:e], k[s:e], v[s:e], a[s:e], b[s:e], A_log, dt_bias, S0, scale)
        out[s:e] = o.to(q.dtype)
        states[int(write_slots[i])] = S.to(states.dtype)
    return out
