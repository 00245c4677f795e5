"""Triton KVBuffer steps: T new tokens per request from checkpoint + buffer (T = 1 decodes, T > 1 verifies
drafts or puts a short prompt into the buffer), the checkpoint only read, the flush fused into decode.

Two launches per step (per round of up to 16 tokens for blocks), so the pass over the checkpoint runs at memory
speed with few registers live:
1. Scores: gating, cumulative decays (fp64), and the weight of every earlier entry j for each new token t:
   e^{G_t - G_j}/|k_j|, e^{G_t - G_j} (k_t . k_j), e^{G_t - G_j} (q_t . k_j).
   Decode (`_decode_scores_kernel`, one program per request and value head, or per key head: the value heads
   sharing it share its loads and products) uses plain vector products; blocks
   (`_scores_kernel`) run one program per (request, key head), so the HV / H value heads sharing a key head
   load its keys, queries and buffered keys and take their tensor-core products (exact for bf16 inputs) once,
   then apply each value head's decays and gates; they also invert each head's unit lower-triangular system
   (I + diag(beta) A) with A[t, i] = e^{G_t - G_i} (k_t . k_i), i < t, by forward substitution: T <= 16, in
   registers. Both append the new keys and decays to the buffer.
2. Apply, one program per (value tile, request, value head), reads its checkpoint tile once:
       d_t = beta_t (v_t - e^{G_t} S0^T k_t - sum_j w_k[t, j] d_j),   o_t = e^{G_t} S0^T q_t + sum_j w_q[t, j] d_j
   `_decode_apply_kernel` (one token) streams the buffered corrected values once and fuses the flush: every
   program updates its checkpoint tile in registers by this token (S = e^{G} S0 + d k^T; the output reads S, as
   the recurrence does, so the two tile products run one after the other and need half the registers), and a
   flushing program adds the buffer to it, one rank-1 update per entry (no second read).
   `_block_apply_kernel` computes a whole block with matrix products: S0 against all T keys and queries (S0
   streamed in pipelined key chunks, so its loads overlap the products and few registers hold it), the
   buffer's values against all T weight rows in one pass, then D = (I + diag(beta) A)^{-1} diag(beta) X and
   O = e^{G} Q S0 + W_q D, so no token waits for the one before it (its tail loads that need no scores may be
   issued before the stream).
On Hopper an apply launch may overlap its scores launch (programmatic dependent launch): it streams its
checkpoint tile before waiting for the scores. Small decode batches may skip the scores launch: each apply
program weighs the buffer itself (redundant across value tiles, but one launch instead of two where launch
latency dominates). Tiles, warps, pipelining and these choices come from `launches.launch_for`, per GPU model
and batch size. The recurrent baseline is the decode apply alone with gating inline, flushing every step, no
buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .launches import launch_for
from .pools import BufferPool
from .tiles import NORM_EPS, add_buffer, block, gate, l2norm_vec

Tensor = torch.Tensor

MAX_TOKENS_PER_ROUND = 16
SCORES_K_CHUNK = 128  # the verify scores multiply keys in chunks of this many columns (128: whole key tiles)
DOT_FP32 = tl.constexpr("tf32x3")  # fp32 operands on tensor cores at fp32 accuracy
# weights [N, HV, 3, L]: e^{G_t-G_j}/|k_j| (decode: folds raw keys), k-score, q-score (blocks: also of the block's
# own tokens i <= t, from column n)
WEIGHT_KINDS = tl.constexpr(3)
COEFS = tl.constexpr(2)  # e^{G_t}, beta_t (blocks: e^{G_t} only)


def _programmatic(wanted: bool, device: torch.device) -> bool:
    """Whether an apply launch may overlap its scores launch: needs sm_90+ (the interpreter has no grid control)."""
    return wanted and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def _round(cu_seqlens, offset, i_b, BT: tl.constexpr):
    """First token index and token count of request i_b in this round."""
    first = tl.load(cu_seqlens + i_b) + offset
    return first, tl.minimum(tl.load(cu_seqlens + i_b + 1) - first, BT)


@triton.jit
def _solve_rows(A, offs_t, T):
    """(I + A)^{-1} for A strictly lower triangular [BT, BT], by forward substitution: row t = e_t - sum_{i<t}
    A[t, i] row_i (rows from T on stay e_t). T <= 16: in registers."""
    inverse = (offs_t[:, None] == offs_t[None, :]).to(tl.float32)
    for t in range(1, T):
        row_t = offs_t[:, None] == t
        a_t = tl.sum(tl.where(row_t, A, 0.0), axis=0)
        inverse = tl.where(row_t, inverse - tl.sum(a_t[:, None] * inverse, axis=0)[None, :], inverse)
    return inverse


@triton.jit
def _own_block(QK, KK, G, beta, offs_t, T):
    """The block's tokens among themselves, from their normalized products QK[t, i] = q_t . k_i, KK[t, i] = k_t . k_i:
    the q-weights e^{G_t - G_i} q_t . k_i of tokens i <= t, and the solve rows P = (I + diag(beta) A)^{-1} diag(beta)
    with A[t, i] = e^{G_t - G_i} k_t . k_i for i < t; both zero outside i <= t < T."""
    seen = (offs_t[None, :] <= offs_t[:, None]) & (offs_t < T)[:, None]
    earlier = seen & (offs_t[None, :] != offs_t[:, None])
    W = tl.exp(tl.where(seen, G[:, None] - G[None, :], 0.0).to(tl.float32))
    inverse = _solve_rows(beta[:, None] * tl.where(earlier, W * KK, 0.0), offs_t, T)
    return tl.where(seen, W * QK, 0.0), tl.where(seen, inverse * beta[None, :], 0.0)


@triton.jit
def _row(x, offs_g, j):
    """Row j of a [BG, BT] tile."""
    return tl.sum(tl.where(offs_g[:, None] == j, x, 0.0), axis=0)


@triton.jit
def _scores_kernel(
    q, k, a, b, A_log, dt_bias, buf_keys, buf_decay, cu_seqlens, buf_slots, buf_lens, weights, solve, coefs,
    offset, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BL: tl.constexpr,
    BT: tl.constexpr, BG: tl.constexpr, KC: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    """Scores of a block of up to BT tokens per request, and its solve rows P = (I + diag(beta) A)^{-1} diag(beta).

    One program per (request, key head): the HV / H value heads sharing the key head share its key, query and
    buffered-key loads and their raw products; each value head then applies its own decays and gates (the group's
    gates and decays at once as [BG, BT] tiles, BG = HV / H rounded up to a power of 2). Products run in key chunks
    of KC columns, so no whole [16, K] tile stays live (KC = BK: whole tiles)."""
    if PDL:  # the apply launch may start its checkpoint reads now
        gdc_launch_dependents()
    i_b, i_hk = tl.program_id(0), tl.program_id(1)
    GROUP: tl.constexpr = HV // H
    first, T = _round(cu_seqlens, offset, i_b, BT)
    if T > 0:
        offs_t, offs_g = tl.arange(0, BT), tl.arange(0, BG)
        mask_t, mask_g = offs_t < T, offs_g < GROUP
        tok = (first + offs_t).to(tl.int64)
        qk_rows = (tok[:, None] * H + i_hk) * K  # [BT, 1] offsets of the block's keys and queries
        slot = tl.load(buf_slots + i_b).to(tl.int64)
        n = tl.load(buf_lens + i_b) + offset
        keys_base = buf_keys + (slot * H + i_hk) * L * K

        # the block's own raw products and norms; its keys appended (entries >= n: no read below sees them)
        QK = tl.zeros([BT, BT], dtype=tl.float32)
        KK = tl.zeros([BT, BT], dtype=tl.float32)
        kk = tl.zeros([BT], dtype=tl.float32)
        qq = tl.zeros([BT], dtype=tl.float32)
        for kc in range(0, BK, KC):
            offs_c = kc + tl.arange(0, KC)
            mask_tc = mask_t[:, None] & (offs_c < K)[None, :]
            Kc = tl.load(k + qk_rows + offs_c[None, :], mask=mask_tc, other=0.0)
            Qc = tl.load(q + qk_rows + offs_c[None, :], mask=mask_tc, other=0.0)
            kk += tl.sum(Kc.to(tl.float32) * Kc.to(tl.float32), axis=1)
            qq += tl.sum(Qc.to(tl.float32) * Qc.to(tl.float32), axis=1)
            QK += tl.dot(Qc, tl.trans(Kc), input_precision=PRECISION)
            KK += tl.dot(Kc, tl.trans(Kc), input_precision=PRECISION)
            tl.store(keys_base + (n + offs_t[:, None]) * K + offs_c[None, :], Kc, mask=mask_tc)
        inv_k = tl.rsqrt(kk + NORM_EPS)
        inv_q = tl.rsqrt(qq + NORM_EPS) * scale

        # the group's gates and cumulative decays (fp64: differences of long sums stay exact), [BG, BT]
        heads = i_hk * GROUP + offs_g
        mask_gt = mask_g[:, None] & mask_t[None, :]
        gt = tok[None, :] * HV + heads[:, None]
        g, beta = gate(tl.load(a + gt, mask=mask_gt, other=0.0), tl.load(b + gt, mask=mask_gt, other=0.0),
                       tl.load(A_log + heads, mask=mask_g, other=0.0)[:, None],
                       tl.load(dt_bias + heads, mask=mask_g, other=0.0)[:, None])
        decay_rows = buf_decay + (slot * HV + heads) * L  # [BG]
        Gs = (tl.load(decay_rows + n - 1, mask=offs_g < tl.where(n > 0, GROUP, 0), other=0.0)[:, None]
              + tl.cumsum(tl.where(mask_gt, g, 0.0).to(tl.float64), 1))

        for start in range(0, n, BL):  # the buffered entries: raw products once, weighed per value head
            offs_l = start + tl.arange(0, BL)
            mask_l = offs_l < n
            SK = tl.zeros([BT, BL], dtype=tl.float32)
            SQ = tl.zeros([BT, BL], dtype=tl.float32)
            bb = tl.zeros([BL], dtype=tl.float32)
            for kc in range(0, BK, KC):
                offs_c = kc + tl.arange(0, KC)
                mask_c = offs_c < K
                Kb = tl.load(keys_base + offs_l[:, None] * K + offs_c[None, :], mask=mask_l[:, None] & mask_c[None, :],
                             other=0.0)
                mask_tc = mask_t[:, None] & mask_c[None, :]
                bb += tl.sum(Kb.to(tl.float32) * Kb.to(tl.float32), axis=1)
                SK += tl.dot(tl.load(k + qk_rows + offs_c[None, :], mask=mask_tc, other=0.0), tl.trans(Kb),
                             input_precision=PRECISION)
                SQ += tl.dot(tl.load(q + qk_rows + offs_c[None, :], mask=mask_tc, other=0.0), tl.trans(Kb),
                             input_precision=PRECISION)
            inv_b = tl.rsqrt(bb + NORM_EPS)
            SK = SK * inv_k[:, None] * inv_b[None, :]
            SQ = SQ * inv_q[:, None] * inv_b[None, :]
            mask_w = mask_t[:, None] & mask_l[None, :]
            for j in tl.static_range(GROUP):
                i_h = i_hk * GROUP + j
                W = tl.exp((_row(Gs, offs_g, j)[:, None]
                            - tl.load(buf_decay + (slot * HV + i_h) * L + offs_l, mask=mask_l, other=0.0)[None, :]
                            ).to(tl.float32))
                w_rows = weights + (tok[:, None] * HV + i_h) * WEIGHT_KINDS * L  # [BT, 1]
                tl.store(w_rows + L + offs_l[None, :], W * SK, mask=mask_w)
                tl.store(w_rows + 2 * L + offs_l[None, :], W * SQ, mask=mask_w)

        # the block's tokens among themselves, per value head
        QK = QK * inv_q[:, None] * inv_k[None, :]
        KK = KK * inv_k[:, None] * inv_k[None, :]
        seen = (offs_t[None, :] <= offs_t[:, None]) & mask_t[:, None]
        for j in tl.static_range(GROUP):
            i_h = i_hk * GROUP + j
            W_own, P = _own_block(QK, KK, _row(Gs, offs_g, j), _row(beta, offs_g, j), offs_t, T)
            tl.store(weights + ((tok[:, None] * HV + i_h) * WEIGHT_KINDS + 2) * L + n + offs_t[None, :], W_own,
                     mask=seen)
            tl.store(solve + (tok[:, None] * HV + i_h) * BT + offs_t[None, :], P, mask=seen)

        tl.store(coefs + gt * COEFS, tl.exp(Gs).to(tl.float32), mask=mask_gt)  # e^{G} from fp64
        tl.store(decay_rows[:, None] + n + offs_t[None, :], Gs, mask=mask_gt)


@triton.jit
def _decode_scores_kernel(
    q, k, a, b, A_log, dt_bias, buf_keys, buf_decay, buf_slots, buf_lens, weights, coefs, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BL: tl.constexpr,
    HEADS: tl.constexpr, PDL: tl.constexpr,
):
    """`_scores_kernel` for one token per request: plain vector products, no tile padded to tensor-core size.

    One program per (request, HEADS value heads of one key head): they share the key, query and buffered-key loads
    and products, then weigh them with their own decays as [HEADS, BL] tiles."""
    if PDL:  # the apply launch may start its checkpoint reads now
        gdc_launch_dependents()
    i_b, i_p = tl.program_id(0), tl.program_id(1)
    tk = i_b.to(tl.int64)
    i_hk = i_p * HEADS // (HV // H)
    offs_k, heads = tl.arange(0, BK), i_p * HEADS + tl.arange(0, HEADS)
    mask_k = offs_k < K
    k_raw = tl.load(k + (tk * H + i_hk) * K + offs_k, mask=mask_k, other=0.0)
    kn = l2norm_vec(k_raw.to(tl.float32), NORM_EPS)
    qn = l2norm_vec(tl.load(q + (tk * H + i_hk) * K + offs_k, mask=mask_k, other=0.0).to(tl.float32),
                    NORM_EPS) * scale
    g, beta = gate(tl.load(a + tk * HV + heads), tl.load(b + tk * HV + heads), tl.load(A_log + heads),
                   tl.load(dt_bias + heads))
    slot = tl.load(buf_slots + i_b).to(tl.int64)
    n = tl.load(buf_lens + i_b)
    decay_rows = buf_decay + (slot * HV + heads) * L  # [HEADS]
    keys_base = buf_keys + (slot * H + i_hk) * L * K
    G = tl.load(decay_rows + n - 1, mask=heads < tl.where(n > 0, HV, 0), other=0.0) + g.to(tl.float64)  # [HEADS]
    w_rows = weights + (tk * HV + heads)[:, None] * WEIGHT_KINDS * L  # [HEADS, 1]
    for start in range(0, n, BL):
        offs_l = start + tl.arange(0, BL)
        mask_l = offs_l < n
        Kb = tl.load(keys_base + offs_l[:, None] * K + offs_k[None, :], mask=mask_l[:, None] & mask_k[None, :],
                     other=0.0).to(tl.float32)
        inv_b = tl.rsqrt(tl.sum(Kb * Kb, axis=1) + NORM_EPS)
        mask_w = (heads < HV)[:, None] & mask_l[None, :]  # [HEADS, BL]
        W = tl.exp((G[:, None] - tl.load(decay_rows[:, None] + offs_l[None, :], mask=mask_w, other=0.0)
                    ).to(tl.float32)) * inv_b[None, :]  # [HEADS, BL]
        tl.store(w_rows + offs_l[None, :], W, mask=mask_w)
        tl.store(w_rows + L + offs_l[None, :], W * tl.sum(Kb * kn[None, :], axis=1)[None, :], mask=mask_w)
        tl.store(w_rows + 2 * L + offs_l[None, :], W * tl.sum(Kb * qn[None, :], axis=1)[None, :], mask=mask_w)
    coef_rows = coefs + (tk * HV + heads) * COEFS
    tl.store(coef_rows, tl.exp(G).to(tl.float32))  # exp in fp64: e^{G} to fp32 precision
    tl.store(coef_rows + 1, beta)
    tl.store(decay_rows + n, G)
    if i_p * HEADS % (HV // H) == 0:
        tl.store(keys_base + n * K + offs_k, k_raw, mask=mask_k)


@triton.jit
def _decode_apply_kernel(
    q, k, v, a, b, A_log, dt_bias, out,
    states, buf_keys, buf_values, buf_decay, buf_slots, buf_lens, read_slots, write_slots, weights, coefs, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr,
    HAS_BUFFER: tl.constexpr, INLINE_SCORES: tl.constexpr, PDL: tl.constexpr, FLUSH_STAGES: tl.constexpr,
):
    """One token per request: output, corrected value, and the fused flush where write_slots >= 0."""
    i_v, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // (HV // H)
    tk = i_b.to(tl.int64)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    read = tl.load(read_slots + i_b).to(tl.int64)
    tile = i_h * V * K + offs_v[:, None] * K + offs_k[None, :]
    rows_held = tl.where(read >= 0, V, 0)  # a request with no checkpoint reads nothing
    S0 = tl.load(states + tl.maximum(read, 0) * HV * V * K + tile,
                 mask=(offs_v < rows_held)[:, None] & mask_k[None, :], other=0.0)
    vv = tl.load(v + (tk * HV + i_h) * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    w_base = weights + (tk * HV + i_h) * WEIGHT_KINDS * L
    if HAS_BUFFER:
        slot = tl.load(buf_slots + i_b).to(tl.int64)
        n = tl.load(buf_lens + i_b)
        values_base = buf_values + (slot * HV + i_h) * L * V
        acc_k = tl.zeros([BV], dtype=tl.float32)
        acc_q = tl.zeros([BV], dtype=tl.float32)
        if INLINE_SCORES:  # few requests: this program weighs the entries itself, one launch
            k_raw, qn, kn, g, beta = _token(q, k, a, b, A_log, dt_bias, scale, tk, i_h, i_hk, offs_k, mask_k,
                                            H, HV, K)
            decay_base = buf_decay + (slot * HV + i_h) * L
            keys_base = buf_keys + (slot * H + i_hk) * L * K
            G = tl.load(decay_base + n - 1, mask=n > 0, other=0.0) + g.to(tl.float64)
            eG = tl.exp(G).to(tl.float32)
            for start in range(0, n, BL):
                offs_l = start + tl.arange(0, BL)
                mask_l = offs_l < n
                Kb = tl.load(keys_base + offs_l[:, None] * K + offs_k[None, :],
                             mask=mask_l[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
                W = tl.exp((G - tl.load(decay_base + offs_l, mask=mask_l, other=0.0)).to(tl.float32))
                W = tl.where(mask_l, W * tl.rsqrt(tl.sum(Kb * Kb, axis=1) + NORM_EPS), 0.0)
                tl.store(w_base + offs_l, W, mask=mask_l)  # every value tile writes the same; the flush reads its own
                Db = tl.load(values_base + offs_l[:, None] * V + offs_v[None, :],
                             mask=mask_l[:, None] & mask_v[None, :], other=0.0)
                acc_k += tl.sum((W * tl.sum(Kb * kn[None, :], axis=1))[:, None] * Db, axis=0)
                acc_q += tl.sum((W * tl.sum(Kb * qn[None, :], axis=1))[:, None] * Db, axis=0)
            if i_v == 0:
                tl.store(decay_base + n, G)
                if i_h % (HV // H) == 0:
                    tl.store(keys_base + n * K + offs_k, k_raw, mask=mask_k)
        else:
            kn = l2norm_vec(tl.load(k + (tk * H + i_hk) * K + offs_k, mask=mask_k, other=0.0).to(tl.float32),
                            NORM_EPS)
            qn = l2norm_vec(tl.load(q + (tk * H + i_hk) * K + offs_k, mask=mask_k, other=0.0).to(tl.float32),
                            NORM_EPS) * scale
            if PDL:  # what follows reads the scores launch's writes
                gdc_wait()
            coef_base = coefs + (tk * HV + i_h) * COEFS
            eG, beta = tl.load(coef_base), tl.load(coef_base + 1)
            for start in range(0, n, BL):
                offs_l = start + tl.arange(0, BL)
                mask_l = offs_l < n
                Db = tl.load(values_base + offs_l[:, None] * V + offs_v[None, :],
                             mask=mask_l[:, None] & mask_v[None, :], other=0.0)
                acc_k += tl.sum(tl.load(w_base + L + offs_l, mask=mask_l, other=0.0)[:, None] * Db, axis=0)
                acc_q += tl.sum(tl.load(w_base + 2 * L + offs_l, mask=mask_l, other=0.0)[:, None] * Db, axis=0)
        mix_k, mix_q = acc_k, acc_q
    else:
        _, qn, kn, g, beta = _token(q, k, a, b, A_log, dt_bias, scale, tk, i_h, i_hk, offs_k, mask_k, H, HV, K)
        eG = tl.exp(g)
        mix_k = tl.zeros([BV], dtype=tl.float32)
        mix_q = tl.zeros([BV], dtype=tl.float32)
    d = beta * (vv - eG * tl.sum(S0 * kn[None, :], axis=1) - mix_k)
    S = eG * S0 + d[:, None] * kn[None, :]  # the checkpoint decayed and updated by this token (the buffer apart)
    o = tl.sum(S * qn[None, :], axis=1) + mix_q
    tl.store(out + (tk * HV + i_h) * V + offs_v, o.to(out.dtype.element_ty), mask=mask_v)
    if HAS_BUFFER:
        tl.store(values_base + n * V + offs_v, d, mask=mask_v)
    write = tl.load(write_slots + i_b).to(tl.int64)
    if write >= 0:  # the flush, from the checkpoint tile in registers: one rank-1 update per entry
        if HAS_BUFFER:
            if INLINE_SCORES:  # the weights read below were stored by other threads of this program
                tl.debug_barrier()
            S = add_buffer(S, buf_keys + (slot * H + i_hk) * L * K, values_base, w_base, n, offs_k, mask_k, offs_v,
                           mask_v, K, V, FLUSH_STAGES)
        tl.store(states + write * HV * V * K + tile, S, mask=mask_v[:, None] & mask_k[None, :])


@triton.jit
def _split_tf32(x):
    """x = hi + lo with hi exact in tf32 (low 13 mantissa bits cleared) and lo exact in fp32."""
    hi = (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def _dot_fp32(x, y_hi, y_lo, X_EXACT: tl.constexpr):
    """x @ (y_hi + y_lo) at fp32 accuracy on tensor cores. An x exact in tf32 (16-bit inputs) needs two passes
    instead of tf32x3's three, and Triton's tf32x3 also splits x: measured 255 registers against 168."""
    if X_EXACT:
        return tl.dot(x, y_hi, input_precision="tf32") + tl.dot(x, y_lo, input_precision="tf32")
    x_hi, x_lo = _split_tf32(x)
    return (tl.dot(x_hi, y_hi, input_precision="tf32") + tl.dot(x_hi, y_lo, input_precision="tf32")
            + tl.dot(x_lo, y_hi, input_precision="tf32"))


@triton.jit
def _weigh_values(KS, QS, Db, w_k, w_q, offs_l, mask_t, n):
    """KS, QS + the block's k- and q-score rows (`w_k`, `w_q`: [BT, 1] row pointers) times buffered values Db."""
    mask_w = mask_t[:, None] & (offs_l < n)[None, :]
    KS += tl.dot(tl.load(w_k + offs_l[None, :], mask=mask_w, other=0.0), Db, input_precision=DOT_FP32)
    QS += tl.dot(tl.load(w_q + offs_l[None, :], mask=mask_w, other=0.0), Db, input_precision=DOT_FP32)
    return KS, QS


@triton.jit
def _block_apply_kernel(
    q, k, v, out, states, buf_values, cu_seqlens, buf_slots, buf_lens, read_slots, weights, solve, coefs,
    offset, scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr, BT: tl.constexpr, EXACT_INPUTS: tl.constexpr,
    KC: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr,
):
    """A block of up to BT tokens per request as matrix products; the checkpoint and the buffer read once.

    S0^T k_t and S0^T q_t come from the raw inputs, normalized after the product."""
    i_v, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // (HV // H)
    first, T = _round(cu_seqlens, offset, i_b, BT)
    if T > 0:
        offs_t, offs_v = tl.arange(0, BT), i_v * BV + tl.arange(0, BV)
        mask_v, mask_t = offs_v < V, offs_t < T
        mask_tv = mask_t[:, None] & mask_v[None, :]
        tok = (first + offs_t).to(tl.int64)
        read = tl.load(read_slots + i_b).to(tl.int64)
        rows_held = tl.where(read >= 0, V, 0)
        S0_rows = states + tl.maximum(read, 0) * HV * V * K + i_h * V * K + offs_v[:, None] * K
        slot = tl.load(buf_slots + i_b).to(tl.int64)
        n = tl.load(buf_lens + i_b) + offset
        values_base = buf_values + (slot * HV + i_h) * L * V
        v_rows = v + (tok[:, None] * HV + i_h) * V + offs_v[None, :]
        offs_l = tl.arange(0, BL)
        KS = tl.zeros([BT, BV], dtype=tl.float32)
        QS = tl.zeros([BT, BV], dtype=tl.float32)
        kk = tl.zeros([BT], dtype=tl.float32)
        qq = tl.zeros([BT], dtype=tl.float32)
        for kc in tl.range(0, BK, KC, num_stages=STAGES):  # the checkpoint streamed in key chunks
            offs_c = kc + tl.arange(0, KC)
            mask_c = offs_c < K
            S0 = tl.load(S0_rows + offs_c[None, :], mask=(offs_v < rows_held)[:, None] & mask_c[None, :], other=0.0)
            S0_hi, S0_lo = _split_tf32(tl.trans(S0))
            mask_tc = mask_t[:, None] & mask_c[None, :]
            Kc = tl.load(k + (tok[:, None] * H + i_hk) * K + offs_c[None, :], mask=mask_tc, other=0.0).to(tl.float32)
            Qc = tl.load(q + (tok[:, None] * H + i_hk) * K + offs_c[None, :], mask=mask_tc, other=0.0).to(tl.float32)
            kk += tl.sum(Kc * Kc, axis=1)
            qq += tl.sum(Qc * Qc, axis=1)
            KS += _dot_fp32(Kc, S0_hi, S0_lo, EXACT_INPUTS)
            QS += _dot_fp32(Qc, S0_hi, S0_lo, EXACT_INPUTS)
        if PDL:  # the checkpoint pass is done; what follows reads the scores launch's writes
            gdc_wait()
        eG = tl.load(coefs + (tok * HV + i_h) * COEFS, mask=mask_t, other=0.0)
        KS *= (eG * tl.rsqrt(kk + NORM_EPS))[:, None]
        QS *= (eG * tl.rsqrt(qq + NORM_EPS) * scale)[:, None]

        w_k = weights + ((tok[:, None] * HV + i_h) * WEIGHT_KINDS + 1) * L  # [BT, 1] rows of k-scores
        w_q = w_k + L
        for start in range(0, n, BL):  # every buffered value once, against all the block's weight rows
            Db = tl.load(values_base + (start + offs_l)[:, None] * V + offs_v[None, :],
                         mask=(start + offs_l < n)[:, None] & mask_v[None, :], other=0.0)
            KS, QS = _weigh_values(KS, QS, Db, w_k, w_q, start + offs_l, mask_t, n)

        Vb = tl.load(v_rows, mask=mask_tv, other=0.0)
        seen = mask_t[:, None] & (offs_t[None, :] <= offs_t[:, None])
        P = tl.load(solve + (tok[:, None] * HV + i_h) * BT + offs_t[None, :], mask=seen, other=0.0)
        D = tl.dot(P, Vb.to(tl.float32) - KS, input_precision=DOT_FP32)
        O = QS + tl.dot(tl.load(w_q + n + offs_t[None, :], mask=seen, other=0.0), D, input_precision=DOT_FP32)
        tl.store(out + (tok[:, None] * HV + i_h) * V + offs_v[None, :], O.to(out.dtype.element_ty), mask=mask_tv)
        tl.store(values_base + (n + offs_t[:, None]) * V + offs_v[None, :], D, mask=mask_tv)


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


def _prepare(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, states: Tensor, buffer: BufferPool | None,
             out: Tensor | None) -> tuple[Tensor, ...]:
    """Contiguous inputs and the output tensor; pools must already be contiguous (kernels index them flat)."""
    if not states.is_contiguous():
        raise ValueError("states must be contiguous")
    if buffer is not None and not (buffer.keys.is_contiguous() and buffer.values.is_contiguous()
                                   and buffer.decay.is_contiguous()):
        raise ValueError("buffer tensors must be contiguous")
    N, HV, V = v.shape
    out = torch.empty(N, HV, V, dtype=q.dtype, device=q.device) if out is None else out
    return (*(t.contiguous() for t in (q, k, v, a, b)), out)


def _decode(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor, states: Tensor,
            buffer: BufferPool | None, buf_slots: Tensor, buf_lens: Tensor, read_slots: Tensor, write_slots: Tensor,
            scale: float | None, out: Tensor | None, block_v: int | None = None, block_l: int = 16,
            num_warps: int | None = None) -> Tensor:
    """One token per request; buffer None is the recurrent baseline. Tiles default to the GPU's launch table."""
    q, k, v, a, b, out = _prepare(q, k, v, a, b, states, buffer, out)
    (N, H, K), (HV, V) = q.shape, v.shape[1:]
    if N == 0:
        return out
    scale = K ** -0.5 if scale is None else scale
    launch = launch_for(q.device)
    if buffer is None:
        (rows, warps), inline, pdl = launch.recurrent, False, False
    else:
        tile = launch.decode_for(N)
        rows, warps, inline = tile.rows, tile.warps, tile.inline
        pdl = _programmatic(tile.programmatic and not inline, q.device)
    L = 1 if buffer is None else buffer.capacity
    BK, BV = block(K), min(block(V), block_v or rows)
    if buffer is None:
        keys = values = decay = weights = coefs = states
    else:
        keys, values, decay = buffer.keys, buffer.values, buffer.decay
        weights = torch.empty(N, HV, WEIGHT_KINDS.value, L, dtype=torch.float32, device=q.device)
        coefs = torch.empty(N, HV, COEFS.value, dtype=torch.float32, device=q.device)
        if not inline:
            heads = launch.decode_scores_heads if (HV // H) % launch.decode_scores_heads == 0 else 1
            _decode_scores_kernel[(N, HV // heads)](q, k, a, b, A_log, dt_bias, keys, decay, buf_slots, buf_lens,
                                                    weights, coefs, scale, H=H, HV=HV, K=K, L=L, BK=BK, BL=block_l,
                                                    HEADS=heads, PDL=pdl, num_warps=launch.decode_scores_warps)
    _decode_apply_kernel[(triton.cdiv(V, BV), N, HV)](
        q, k, v, a, b, A_log, dt_bias, out, states, keys, values, decay, buf_slots, buf_lens, read_slots, write_slots,
        weights, coefs, scale, H=H, HV=HV, K=K, V=V, L=L, BK=BK, BV=BV, BL=block_l,
        HAS_BUFFER=buffer is not None, INLINE_SCORES=inline, PDL=pdl, FLUSH_STAGES=launch.flush_stages,
        num_warps=num_warps or warps, launch_pdl=pdl)
    return out


def _blocks(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor, states: Tensor,
            buffer: BufferPool, cu_seqlens: Tensor, buf_slots: Tensor, buf_lens: Tensor, read_slots: Tensor,
            scale: float | None, out: Tensor | None, max_tokens: int, block_v: int | None = None,
            block_l: int = 16, num_warps: int | None = None) -> Tensor:
    """Variable-length blocks of tokens per request, in rounds of up to MAX_TOKENS_PER_ROUND."""
    q, k, v, a, b, out = _prepare(q, k, v, a, b, states, buffer, out)
    (N, H, K), (HV, V) = q.shape, v.shape[1:]
    n_req = cu_seqlens.numel() - 1
    if N == 0 or n_req == 0:
        return out
    scale = K ** -0.5 if scale is None else scale
    launch = launch_for(q.device)
    rows, warps = launch.verify
    BK, BV, BT = block(K), min(block(V), block_v or rows), block(min(max_tokens, MAX_TOKENS_PER_ROUND))
    L = buffer.capacity
    weights = torch.empty(N, HV, WEIGHT_KINDS.value, L, dtype=torch.float32, device=q.device)
    solve = torch.empty(N, HV, BT, dtype=torch.float32, device=q.device)
    coefs = torch.empty(N, HV, COEFS.value, dtype=torch.float32, device=q.device)
    exact = q.dtype != torch.float32 and k.dtype != torch.float32  # 16-bit inputs: exact in tf32
    precision = "tf32" if exact else "tf32x3"
    pdl = _programmatic(launch.verify_programmatic, q.device)
    for offset in range(0, max_tokens, BT):
        _scores_kernel[(n_req, H)](q, k, a, b, A_log, dt_bias, buffer.keys, buffer.decay, cu_seqlens, buf_slots,
                                   buf_lens, weights, solve, coefs, offset, scale, H=H, HV=HV, K=K, L=L, BK=BK,
                                   BL=block_l, BT=BT, BG=triton.next_power_of_2(HV // H), KC=min(BK, SCORES_K_CHUNK),
                                   PRECISION=precision, PDL=pdl, num_warps=launch.verify_scores_warps)
        _block_apply_kernel[(triton.cdiv(V, BV), n_req, HV)](
            q, k, v, out, states, buffer.values, cu_seqlens, buf_slots, buf_lens, read_slots, weights, solve, coefs,
            offset, scale, H=H, HV=HV, K=K, V=V, L=L, BK=BK, BV=BV, BL=block_l, BT=BT, EXACT_INPUTS=exact,
            KC=min(BK, launch.verify_k_chunk), STAGES=launch.verify_stages, PDL=pdl,
            num_warps=num_warps or warps, launch_pdl=pdl)
    return out


def buffered_decode_triton(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
                           states: Tensor, buffer: BufferPool, buf_slots: Tensor, buf_lens: Tensor, read_slots: Tensor,
                           write_slots: Tensor, scale: float | None = None, out: Tensor | None = None,
                           **tuning) -> torch.Tensor:
    return _decode(q, k, v, a, b, A_log, dt_bias, states, buffer, buf_slots, buf_lens, read_slots, write_slots, scale,
                   out, **tuning)


def recurrent_decode_triton(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
                            states: Tensor, slots: Tensor, scale: float | None = None, out: Tensor | None = None,
                            **tuning) -> torch.Tensor:
    return _decode(q, k, v, a, b, A_log, dt_bias, states, None, slots, slots, slots, slots, scale, out, **tuning)


def verify_triton(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor, states: Tensor,
                  buffer: BufferPool, cu_seqlens: Tensor, buf_slots: Tensor, buf_lens: Tensor, read_slots: Tensor,
                  scale: float | None = None, out: Tensor | None = None, max_tokens: int | None = None,
                  **tuning) -> torch.Tensor:
    n_req = cu_seqlens.numel() - 1
    if max_tokens is None:
        max_tokens = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if n_req else 0
    return _blocks(q, k, v, a, b, A_log, dt_bias, states, buffer, cu_seqlens, buf_slots, buf_lens, read_slots, scale,
                   out, max_tokens, **tuning)
