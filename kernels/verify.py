"""Triton parallel verify: T tokens per request from checkpoint + buffer, no state written.

One program per (value-tile, request, value head) handles up to BT tokens: Q S0 and K S0 as two small
matrix products over the checkpoint tile, the buffer's contribution block by block, then the unit
lower-triangular system (I + tril(diag(beta) (K K^T * Gamma), -1)) D = rhs by forward substitution in
registers. Entries are appended at buf_lens + t; committing a prefix is only a length update. Requests
with more than BT tokens (a short prompt going into the buffer) are processed in rounds of BT.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pools import BufferPool
from .tiles import NORM_EPS, block, gate, l2norm_rows, load_entries

MAX_TOKENS_PER_ROUND = 32


@triton.jit
def _verify_kernel(
    q, k, v, a, b, A_log, dt_bias, out,
    states, buf_keys, buf_values, buf_decay,
    cu_seqlens, buf_slots, buf_lens, read_slots,
    offset, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr, BT: tl.constexpr, PRECISION: tl.constexpr,
):
    i_v, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // (HV // H)
    first = tl.load(cu_seqlens + i_b) + offset
    T = tl.minimum(tl.load(cu_seqlens + i_b + 1) - first, BT)
    if T > 0:
        offs_k = tl.arange(0, BK)
        offs_v = i_v * BV + tl.arange(0, BV)
        offs_t = tl.arange(0, BT)
        mask_k, mask_v, mask_t = offs_k < K, offs_v < V, offs_t < T
        tok = (first + offs_t).to(tl.int64)

        read = tl.load(read_slots + i_b).to(tl.int64)
        rows_held = tl.where(read >= 0, V, 0)
        S0 = tl.load(states + tl.maximum(read, 0) * HV * V * K + i_h * V * K + offs_v[:, None] * K + offs_k[None, :],
                     mask=(offs_v < rows_held)[:, None] & mask_k[None, :], other=0.0)

        mask_tk = mask_t[:, None] & mask_k[None, :]
        k_raw = tl.load(k + (tok[:, None] * H + i_hk) * K + offs_k[None, :], mask=mask_tk, other=0.0)
        Kn = l2norm_rows(k_raw.to(tl.float32), NORM_EPS)
        Qn = l2norm_rows(tl.load(q + (tok[:, None] * H + i_hk) * K + offs_k[None, :], mask=mask_tk,
                                 other=0.0).to(tl.float32), NORM_EPS) * scale
        Vt = tl.load(v + (tok[:, None] * HV + i_h) * V + offs_v[None, :], mask=mask_t[:, None] & mask_v[None, :],
                     other=0.0).to(tl.float32)
        g, beta = gate(tl.load(a + tok * HV + i_h, mask=mask_t, other=0.0),
                       tl.load(b + tok * HV + i_h, mask=mask_t, other=0.0),
                       tl.load(A_log + i_h), tl.load(dt_bias + i_h))
        g = tl.where(mask_t, g, 0.0)

        slot = tl.load(buf_slots + i_b).to(tl.int64)
        n = tl.load(buf_lens + i_b) + offset
        decay_base = buf_decay + (slot * HV + i_h) * L
        keys_base = buf_keys + (slot * H + i_hk) * L * K
        values_base = buf_values + (slot * HV + i_h) * L * V
        G = tl.load(decay_base + n - 1, mask=n > 0, other=0.0) + tl.cumsum(g.to(tl.float64), axis=0)  # [BT]

        mix_k = tl.zeros([BT, BV], dtype=tl.float32)
        mix_q = tl.zeros([BT, BV], dtype=tl.float32)
        for start in range(0, n, BL):
            Kb, Db, Gb, mask_l = load_entries(keys_base, values_base, decay_base, start, n, offs_k, offs_v,
                                              mask_k, mask_v, K, V, BL)
            W = tl.where(mask_l[None, :], tl.exp((G[:, None] - Gb[None, :]).to(tl.float32)), 0.0)  # [BT, BL]
            mix_k += tl.dot(tl.dot(Kn, tl.trans(Kb), input_precision=PRECISION) * W, Db, input_precision=PRECISION)
            mix_q += tl.dot(tl.dot(Qn, tl.trans(Kb), input_precision=PRECISION) * W, Db, input_precision=PRECISION)

        eG = tl.exp(G.to(tl.float32))
        causal = offs_t[:, None] >= offs_t[None, :]
        Gamma = tl.where(causal, tl.exp(tl.where(causal, G[:, None] - G[None, :], 0.0).to(tl.float32)), 0.0)
        rhs = beta[:, None] * (Vt - eG[:, None] * tl.dot(Kn, tl.trans(S0), input_precision=PRECISION) - mix_k)
        A = tl.where(offs_t[:, None] > offs_t[None, :],
                     beta[:, None] * tl.dot(Kn, tl.trans(Kn), input_precision=PRECISION) * Gamma, 0.0)
        D = tl.zeros([BT, BV], dtype=tl.float32)
        for i in range(T):  # forward substitution: row i needs only rows < i
            row = offs_t == i
            a_i = tl.sum(tl.where(row[:, None], A, 0.0), axis=0)  # [BT]
            d_i = tl.sum(tl.where(row[:, None], rhs, 0.0), axis=0) - tl.sum(a_i[:, None] * D, axis=0)
            D = tl.where(row[:, None], d_i[None, :], D)

        O = (eG[:, None] * tl.dot(Qn, tl.trans(S0), input_precision=PRECISION) + mix_q
             + tl.dot(tl.dot(Qn, tl.trans(Kn), input_precision=PRECISION) * Gamma, D, input_precision=PRECISION))
        mask_tv = mask_t[:, None] & mask_v[None, :]
        tl.store(out + (tok[:, None] * HV + i_h) * V + offs_v[None, :], O.to(out.dtype.element_ty), mask=mask_tv)
        tl.store(values_base + (n + offs_t[:, None]) * V + offs_v[None, :], D, mask=mask_tv)
        if i_v == 0:
            tl.store(decay_base + n + offs_t, G, mask=mask_t)
            if i_h % (HV // H) == 0:
                tl.store(keys_base + (n + offs_t[:, None]) * K + offs_k[None, :], k_raw, mask=mask_tk)


def verify_triton(q, k, v, a, b, A_log, dt_bias, states, buffer: BufferPool, cu_seqlens, buf_slots, buf_lens,
                  read_slots, scale=None, out=None, max_tokens: int | None = None, block_v: int = 32,
                  block_l: int = 16, num_warps: int = 4,
                precision: str = "tf32x3") -> torch.Tensor:
    N, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    out = torch.empty(N, HV, V, dtype=q.dtype, device=q.device) if out is None else out
    n_req = cu_seqlens.numel() - 1
    if N == 0 or n_req == 0:
        return out
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if max_tokens is None else max_tokens
    BT = block(min(longest, MAX_TOKENS_PER_ROUND))
    BV = min(block(V), block_v)
    scale = K ** -0.5 if scale is None else scale
    args = (q.contiguous(), k.contiguous(), v.contiguous(), a.contiguous(), b.contiguous(), A_log, dt_bias, out,
            states, buffer.keys, buffer.values, buffer.decay, cu_seqlens, buf_slots, buf_lens, read_slots)
    for offset in range(0, longest, BT):
        _verify_kernel[(triton.cdiv(V, BV), n_req, HV)](
            *args, offset, scale, H=H, HV=HV, K=K, V=V, L=buffer.capacity, BK=block(K), BV=BV, BL=block_l, BT=BT,
            PRECISION=precision, num_warps=num_warps,
        )
    return out
