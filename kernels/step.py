"""Triton KVBuffer steps: T new tokens per request from checkpoint + buffer (T = 1 decodes, T > 1 verifies
drafts or puts a short prompt into the buffer), the checkpoint only read, the flush fused into decode.

Two launches per round of up to BT tokens, so the pass over the checkpoint runs at memory speed with few
registers live:
1. `_scores_kernel`, one program per (request, value head): gating, cumulative decays, and the weight of
   every earlier entry j for each new token t: e^{G_t - G_j}/|k_j|, e^{G_t - G_j} (k_t . k_j), e^{G_t - G_j}
   (q_t . k_j). Key products come from tensor cores on the raw keys (exact products for bf16 inputs) scaled
   by inverse norms. Appends the new keys and decays to the buffer. Decode (one token) uses
   `_decode_scores_kernel` instead: plain vector products, no tile padded to tensor-core size.
2. `_apply_kernel`, one program per (value tile, request, value head): reads its checkpoint tile once, and
   token by token streams the buffered corrected values against those weights:
       d_t = beta_t (v_t - e^{G_t} S0^T k_t - sum_j w_k[t, j] d_j),   o_t = e^{G_t} S0^T q_t + sum_j w_q[t, j] d_j
   (j over the buffer and the earlier new tokens, including t itself for o_t). A flush writes the folded tile.
Decode batches of at most INLINE_SCORES_MAX_REQUESTS requests skip the scores launch: each apply program weighs
the buffer itself (redundant across value tiles, but one launch instead of two where launch latency dominates).
The recurrent baseline is the second kernel alone with gating inline, flushing every step, no buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pools import BufferPool
from .tiles import NORM_EPS, block, fold_into, gate, l2norm_vec

Tensor = torch.Tensor

MAX_TOKENS_PER_ROUND = 16
DECODE_SCORES_WARPS, SCORES_WARPS = 2, 4  # the fastest measured on an H100 (docs/BENCHMARKS.md)
# decode batches this small weigh the buffer inside the apply launch: one launch instead of two (not yet timed)
INLINE_SCORES_MAX_REQUESTS = 8
WEIGHT_KINDS = tl.constexpr(3)  # e^{G_t-G_j}/|k_j| (folds raw keys), k-score, q-score
COEFS = tl.constexpr(4)  # e^{G_t}, beta_t, q_t . k_t, spare


@triton.jit
def _round(cu_seqlens, offset, i_b, ONE_TOKEN: tl.constexpr, BT: tl.constexpr):
    """First token index and token count of request i_b in this round."""
    if ONE_TOKEN:
        return i_b, 1
    first = tl.load(cu_seqlens + i_b) + offset
    return first, tl.minimum(tl.load(cu_seqlens + i_b + 1) - first, BT)


@triton.jit
def _scores_kernel(
    q, k, a, b, A_log, dt_bias, buf_keys, buf_decay, cu_seqlens, buf_slots, buf_lens, weights, coefs,
    offset, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BL: tl.constexpr,
    BT: tl.constexpr, PRECISION: tl.constexpr,
):
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    i_hk = i_h // (HV // H)
    first, T = _round(cu_seqlens, offset, i_b, False, BT)
    if T > 0:
        offs_k, offs_t = tl.arange(0, BK), tl.arange(0, BT)
        mask_k, mask_t = offs_k < K, offs_t < T
        tok = (first + offs_t).to(tl.int64)
        mask_tk = mask_t[:, None] & mask_k[None, :]
        Kt = tl.load(k + (tok[:, None] * H + i_hk) * K + offs_k[None, :], mask=mask_tk, other=0.0)
        Qt = tl.load(q + (tok[:, None] * H + i_hk) * K + offs_k[None, :], mask=mask_tk, other=0.0)
        inv_k = tl.rsqrt(tl.sum(Kt.to(tl.float32) * Kt.to(tl.float32), axis=1) + NORM_EPS)
        inv_q = tl.rsqrt(tl.sum(Qt.to(tl.float32) * Qt.to(tl.float32), axis=1) + NORM_EPS) * scale
        g, beta = gate(tl.load(a + tok * HV + i_h, mask=mask_t, other=0.0),
                       tl.load(b + tok * HV + i_h, mask=mask_t, other=0.0), tl.load(A_log + i_h),
                       tl.load(dt_bias + i_h))

        slot = tl.load(buf_slots + i_b).to(tl.int64)
        n = tl.load(buf_lens + i_b) + offset
        decay_base = buf_decay + (slot * HV + i_h) * L
        keys_base = buf_keys + (slot * H + i_hk) * L * K
        # cumulative decays in fp64: differences of long sums stay exact
        G = tl.load(decay_base + n - 1, mask=n > 0, other=0.0) + tl.cumsum(tl.where(mask_t, g, 0.0).to(tl.float64), 0)
        w_rows = weights + (tok[:, None] * HV + i_h) * WEIGHT_KINDS * L  # [BT, 1]

        for start in range(0, n, BL):  # the buffered entries
            offs_l = start + tl.arange(0, BL)
            mask_l = offs_l < n
            Kb = tl.load(keys_base + offs_l[:, None] * K + offs_k[None, :], mask=mask_l[:, None] & mask_k[None, :],
                         other=0.0)
            inv_b = tl.rsqrt(tl.sum(Kb.to(tl.float32) * Kb.to(tl.float32), axis=1) + NORM_EPS)
            W = tl.exp((G[:, None] - tl.load(decay_base + offs_l, mask=mask_l, other=0.0)[None, :]).to(tl.float32))
            mask_w = mask_t[:, None] & mask_l[None, :]
            W = W * inv_b[None, :]
            tl.store(w_rows + offs_l[None, :], W, mask=mask_w)
            tl.store(w_rows + L + offs_l[None, :], W * tl.dot(Kt, tl.trans(Kb), input_precision=PRECISION)
                     * inv_k[:, None], mask=mask_w)
            tl.store(w_rows + 2 * L + offs_l[None, :], W * tl.dot(Qt, tl.trans(Kb), input_precision=PRECISION)
                     * inv_q[:, None], mask=mask_w)

        # the new tokens among themselves: entry n + i is visible to token t for i < t (and i = t for o)
        earlier = (offs_t[None, :] < offs_t[:, None]) & mask_t[:, None]
        W = tl.exp(tl.where(earlier, G[:, None] - G[None, :], 0.0).to(tl.float32))
        pos = n + offs_t[None, :]
        W = W * inv_k[None, :]
        tl.store(w_rows + pos, W, mask=earlier)
        tl.store(w_rows + L + pos, W * tl.dot(Kt, tl.trans(Kt), input_precision=PRECISION) * inv_k[:, None],
                 mask=earlier)
        qk = tl.dot(Qt, tl.trans(Kt), input_precision=PRECISION) * inv_q[:, None]
        tl.store(w_rows + 2 * L + pos, W * qk, mask=earlier)

        coef_rows = coefs + (tok * HV + i_h) * COEFS
        tl.store(coef_rows, tl.exp(G).to(tl.float32), mask=mask_t)  # exp in fp64: e^{G} to fp32 precision
        tl.store(coef_rows + 1, beta, mask=mask_t)
        tl.store(coef_rows + 2, tl.sum(tl.where(offs_t[:, None] == offs_t[None, :], qk, 0.0), axis=1) * inv_k,
                 mask=mask_t)
        tl.store(decay_base + n + offs_t, G, mask=mask_t)
        if i_h % (HV // H) == 0:
            tl.store(keys_base + (n + offs_t[:, None]) * K + offs_k[None, :], Kt, mask=mask_tk)


@triton.jit
def _decode_scores_kernel(
    q, k, a, b, A_log, dt_bias, buf_keys, buf_decay, buf_slots, buf_lens, weights, coefs, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BL: tl.constexpr,
):
    """`_scores_kernel` for one token per request: plain vector products, no tile padded to tensor-core size."""
    i_b, i_h = tl.program_id(0), tl.program_id(1)
    i_hk = i_h // (HV // H)
    offs_k = tl.arange(0, BK)
    mask_k = offs_k < K
    k_raw, qn, kn, g, beta = _token(q, k, a, b, A_log, dt_bias, scale, i_b, i_h, i_hk, offs_k, mask_k, H, HV, K)
    slot = tl.load(buf_slots + i_b).to(tl.int64)
    n = tl.load(buf_lens + i_b)
    decay_base = buf_decay + (slot * HV + i_h) * L
    keys_base = buf_keys + (slot * H + i_hk) * L * K
    G = tl.load(decay_base + n - 1, mask=n > 0, other=0.0) + g.to(tl.float64)
    w_base = weights + (i_b * HV + i_h) * WEIGHT_KINDS * L
    for start in range(0, n, BL):
        offs_l = start + tl.arange(0, BL)
        mask_l = offs_l < n
        Kb = tl.load(keys_base + offs_l[:, None] * K + offs_k[None, :], mask=mask_l[:, None] & mask_k[None, :],
                     other=0.0).to(tl.float32)
        W = tl.exp((G - tl.load(decay_base + offs_l, mask=mask_l, other=0.0)).to(tl.float32))
        W = W * tl.rsqrt(tl.sum(Kb * Kb, axis=1) + NORM_EPS)
        tl.store(w_base + offs_l, W, mask=mask_l)
        tl.store(w_base + L + offs_l, W * tl.sum(Kb * kn[None, :], axis=1), mask=mask_l)
        tl.store(w_base + 2 * L + offs_l, W * tl.sum(Kb * qn[None, :], axis=1), mask=mask_l)
    coef_base = coefs + (i_b * HV + i_h) * COEFS
    tl.store(coef_base, tl.exp(G).to(tl.float32))  # exp in fp64: e^{G} to fp32 precision
    tl.store(coef_base + 1, beta)
    tl.store(coef_base + 2, tl.sum(qn * kn))
    tl.store(decay_base + n, G)
    if i_h % (HV // H) == 0:
        tl.store(keys_base + n * K + offs_k, k_raw, mask=mask_k)


@triton.jit
def _apply_kernel(
    q, k, v, a, b, A_log, dt_bias, out,
    states, buf_keys, buf_values, buf_decay, cu_seqlens, buf_slots, buf_lens, read_slots, write_slots, weights,
    coefs, offset, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr, BT: tl.constexpr, KC: tl.constexpr,
    ONE_TOKEN: tl.constexpr, HAS_BUFFER: tl.constexpr, FLUSH: tl.constexpr, INLINE_SCORES: tl.constexpr,
):
    i_v, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // (HV // H)
    first, T = _round(cu_seqlens, offset, i_b, ONE_TOKEN, BT)
    if T > 0:
        offs_k = tl.arange(0, BK)
        offs_v = i_v * BV + tl.arange(0, BV)
        mask_k, mask_v = offs_k < K, offs_v < V
        read = tl.load(read_slots + i_b).to(tl.int64)
        tile = i_h * V * K + offs_v[:, None] * K + offs_k[None, :]
        rows_held = tl.where(read >= 0, V, 0)  # a request with no checkpoint reads nothing
        S0 = tl.load(states + tl.maximum(read, 0) * HV * V * K + tile,
                     mask=(offs_v < rows_held)[:, None] & mask_k[None, :], other=0.0)
        if HAS_BUFFER:
            slot = tl.load(buf_slots + i_b).to(tl.int64)
            n = tl.load(buf_lens + i_b) + offset
            values_base = buf_values + (slot * HV + i_h) * L * V
        d = tl.zeros([BV], dtype=tl.float32)  # the last token's values and decay, kept for the flush
        eG = tl.zeros([1], dtype=tl.float32).sum()
        for t in range(T):
            tk = (first + t).to(tl.int64)
            kn = l2norm_vec(tl.load(k + (tk * H + i_hk) * K + offs_k, mask=mask_k, other=0.0).to(tl.float32),
                            NORM_EPS)
            vv = tl.load(v + (tk * HV + i_h) * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
            if HAS_BUFFER:
                w_base = weights + (tk * HV + i_h) * WEIGHT_KINDS * L
                acc_k = tl.zeros([BL, BV], dtype=tl.float32)
                acc_q = tl.zeros([BL, BV], dtype=tl.float32)
                if INLINE_SCORES:  # one token, few requests: this program weighs the entries itself, one launch
                    k_raw, qn, kn, g, beta = _token(q, k, a, b, A_log, dt_bias, scale, tk, i_h, i_hk, offs_k, mask_k,
                                                    H, HV, K)
                    decay_base = buf_decay + (slot * HV + i_h) * L
                    keys_base = buf_keys + (slot * H + i_hk) * L * K
                    G = tl.load(decay_base + n - 1, mask=n > 0, other=0.0) + g.to(tl.float64)
                    eG, qk = tl.exp(G).to(tl.float32), tl.sum(qn * kn)
                    for start in range(0, n, BL):
                        offs_l = start + tl.arange(0, BL)
                        mask_l = offs_l < n
                        Kb = tl.load(keys_base + offs_l[:, None] * K + offs_k[None, :],
                                     mask=mask_l[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
                        W = tl.exp((G - tl.load(decay_base + offs_l, mask=mask_l, other=0.0)).to(tl.float32))
                        W = tl.where(mask_l, W * tl.rsqrt(tl.sum(Kb * Kb, axis=1) + NORM_EPS), 0.0)
                        if FLUSH:  # every value tile writes the same weights; fold_into reads its own back
                            tl.store(w_base + offs_l, W, mask=mask_l)
                        Db = tl.load(values_base + offs_l[:, None] * V + offs_v[None, :],
                                     mask=mask_l[:, None] & mask_v[None, :], other=0.0)
                        acc_k += (W * tl.sum(Kb * kn[None, :], axis=1))[:, None] * Db
                        acc_q += (W * tl.sum(Kb * qn[None, :], axis=1))[:, None] * Db
                    if i_v == 0:
                        tl.store(decay_base + n, G)
                        if i_h % (HV // H) == 0:
                            tl.store(keys_base + n * K + offs_k, k_raw, mask=mask_k)
                else:
                    coef_base = coefs + (tk * HV + i_h) * COEFS
                    eG, beta, qk = tl.load(coef_base), tl.load(coef_base + 1), tl.load(coef_base + 2)
                    qn = l2norm_vec(tl.load(q + (tk * H + i_hk) * K + offs_k, mask=mask_k, other=0.0).to(tl.float32),
                                    NORM_EPS) * scale
                    for start in range(0, n + t, BL):
                        offs_l = start + tl.arange(0, BL)
                        mask_l = offs_l < n + t
                        Db = tl.load(values_base + offs_l[:, None] * V + offs_v[None, :],
                                     mask=mask_l[:, None] & mask_v[None, :], other=0.0)
                        acc_k += tl.load(w_base + L + offs_l, mask=mask_l, other=0.0)[:, None] * Db
                        acc_q += tl.load(w_base + 2 * L + offs_l, mask=mask_l, other=0.0)[:, None] * Db
                mix_k, mix_q = tl.sum(acc_k, axis=0), tl.sum(acc_q, axis=0)
            else:
                _, qn, kn, g, beta = _token(q, k, a, b, A_log, dt_bias, scale, tk, i_h, i_hk, offs_k, mask_k, H, HV, K)
                eG, qk = tl.exp(g), tl.sum(qn * kn)
                mix_k = tl.zeros([BV], dtype=tl.float32)
                mix_q = tl.zeros([BV], dtype=tl.float32)
            d = beta * (vv - eG * tl.sum(S0 * kn[None, :], axis=1) - mix_k)
            o = eG * tl.sum(S0 * qn[None, :], axis=1) + mix_q + qk * d
            tl.store(out + (tk * HV + i_h) * V + offs_v, o.to(out.dtype.element_ty), mask=mask_v)
            if HAS_BUFFER:
                tl.store(values_base + (n + t) * V + offs_v, d, mask=mask_v)
                tl.debug_barrier()  # the next token reads d_t back
        if FLUSH:  # one token per request: fold checkpoint + buffer + this token
            write = tl.load(write_slots + i_b).to(tl.int64)
            if write >= 0:
                k_row = k + (first.to(tl.int64) * H + i_hk) * K
                k_full = tl.load(k_row + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                inv_kn = tl.rsqrt(tl.sum(k_full * k_full) + NORM_EPS)
                if HAS_BUFFER:
                    fold_into(states, read, write, eG, buf_keys + (slot * H + i_hk) * L * K, values_base,
                              weights + (first.to(tl.int64) * HV + i_h) * WEIGHT_KINDS * L, n, d, k_row, inv_kn,
                              i_h, offs_v, mask_v, rows_held, HV, K, V, BK, KC)
                else:  # the recurrence itself: no buffer
                    fold_into(states, read, write, eG, k_row, states, states, 0, d, k_row, inv_kn,
                              i_h, offs_v, mask_v, rows_held, HV, K, V, BK, KC)


@triton.jit
def _token(q, k, a, b, A_log, dt_bias, scale, tk, i_h, i_hk, offs_k, mask_k,
           H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr):
    """Token tk's raw key, normalized q and k, log decay and beta (the recurrent path computes them inline)."""
    k_raw = tl.load(k + (tk * H + i_hk) * K + offs_k, mask=mask_k, other=0.0)
    qn = l2norm_vec(tl.load(q + (tk * H + i_hk) * K + offs_k, mask=mask_k, other=0.0).to(tl.float32),
                    NORM_EPS) * scale
    g, beta = gate(tl.load(a + tk * HV + i_h), tl.load(b + tk * HV + i_h), tl.load(A_log + i_h),
                   tl.load(dt_bias + i_h))
    return k_raw, qn, l2norm_vec(k_raw.to(tl.float32), NORM_EPS), g, beta


def _launch(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor, states: Tensor,
            buffer: BufferPool | None, cu_seqlens: Tensor, buf_slots: Tensor, buf_lens: Tensor, read_slots: Tensor,
            write_slots: Tensor, scale: float | None, out: Tensor | None, max_tokens: int, n_req: int,
            block_v: int = 32, block_l: int = 16, num_warps: int = 2) -> torch.Tensor:
    N, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    if not states.is_contiguous():
        raise ValueError("states must be contiguous")
    out = torch.empty(N, HV, V, dtype=q.dtype, device=q.device) if out is None else out
    if N == 0 or n_req == 0:
        return out
    q, k, v, a, b = (t.contiguous() for t in (q, k, v, a, b))
    scale = K ** -0.5 if scale is None else scale
    one_token = cu_seqlens is None
    BK, BV = block(K), min(block(V), block_v)
    BT = block(min(max_tokens, MAX_TOKENS_PER_ROUND))
    cu = cu_seqlens if cu_seqlens is not None else buf_slots  # unused when one token per request
    flush = write_slots is not None
    inline = one_token and buffer is not None and n_req <= INLINE_SCORES_MAX_REQUESTS
    writes = write_slots if flush else read_slots
    common = dict(H=H, HV=HV, K=K, L=1, BK=BK, BL=block_l, BT=BT)
    if buffer is None:
        keys = values = decay = weights = coefs = states
    else:
        keys, values, decay, common["L"] = buffer.keys, buffer.values, buffer.decay, buffer.capacity
        if not (keys.is_contiguous() and values.is_contiguous() and buffer.decay.is_contiguous()):
            raise ValueError("buffer tensors must be contiguous")
        weights = torch.empty(N, HV, WEIGHT_KINDS.value, buffer.capacity, dtype=torch.float32, device=q.device)
        coefs = torch.empty(N, HV, COEFS.value, dtype=torch.float32, device=q.device)
    precision = "tf32x3" if k.dtype == torch.float32 else "tf32"  # 16-bit keys: tensor-core products are exact
    for offset in range(0, max_tokens, BT):
        if buffer is not None and one_token and not inline:
            _decode_scores_kernel[(n_req, HV)](q, k, a, b, A_log, dt_bias, keys, decay, buf_slots, buf_lens, weights,
                                               coefs, scale, H=H, HV=HV, K=K, L=buffer.capacity, BK=BK, BL=block_l,
                                               num_warps=DECODE_SCORES_WARPS)
        elif buffer is not None and not one_token:
            _scores_kernel[(n_req, HV)](q, k, a, b, A_log, dt_bias, keys, decay, cu, buf_slots, buf_lens,
                                        weights, coefs, offset, scale, PRECISION=precision, num_warps=SCORES_WARPS,
                                        **common)
        _apply_kernel[(triton.cdiv(V, BV), n_req, HV)](
            q, k, v, a, b, A_log, dt_bias, out, states, keys, values, decay, cu, buf_slots, buf_lens, read_slots,
            writes, weights, coefs, offset, scale, V=V, BV=BV, KC=min(BK, 32), ONE_TOKEN=one_token,
            HAS_BUFFER=buffer is not None, FLUSH=flush, INLINE_SCORES=inline, num_warps=num_warps, **common)
    return out


def buffered_decode_triton(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
                           states: Tensor, buffer: BufferPool, buf_slots: Tensor, buf_lens: Tensor, read_slots: Tensor,
                           write_slots: Tensor, scale: float | None = None, out: Tensor | None = None,
                           **tuning) -> torch.Tensor:
    return _launch(q, k, v, a, b, A_log, dt_bias, states, buffer, None, buf_slots, buf_lens, read_slots, write_slots,
                   scale, out, max_tokens=1, n_req=q.shape[0], **tuning)


def recurrent_decode_triton(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
                            states: Tensor, slots: Tensor, scale: float | None = None, out: Tensor | None = None,
                            **tuning) -> torch.Tensor:
    return _launch(q, k, v, a, b, A_log, dt_bias, states, None, None, slots, slots, slots, slots, scale, out,
                   max_tokens=1, n_req=q.shape[0], **tuning)


def verify_triton(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor, states: Tensor,
                  buffer: BufferPool, cu_seqlens: Tensor, buf_slots: Tensor, buf_lens: Tensor, read_slots: Tensor,
                  scale: float | None = None, out: Tensor | None = None, max_tokens: int | None = None,
                  **tuning) -> torch.Tensor:
    n_req = cu_seqlens.numel() - 1
    if max_tokens is None:
        max_tokens = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if n_req else 0
    return _launch(q, k, v, a, b, A_log, dt_bias, states, buffer, cu_seqlens, buf_slots, buf_lens, read_slots, None,
                   scale, out, max_tokens=max_tokens, n_req=n_req, **tuning)
