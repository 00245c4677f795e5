"""Triton decode: one token per request from checkpoint + buffer, with the flush fused in.

One program per (value-tile of BV rows, request, value head). It reads its [BV, K] tile of the checkpoint
once (S0^T q and S0^T k in the same pass), walks the request's buffer in blocks of BL entries (only the
filled ones), writes the output and the new buffer entry, and on a flush step also writes the folded tile.
With HAS_BUFFER=False the same kernel is the recurrent baseline: every step is a flush of an empty buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pools import BufferPool
from .tiles import NORM_EPS, block, gate, l2norm_vec, load_entries


@triton.jit
def _decode_kernel(
    q, k, v, a, b, A_log, dt_bias, out,
    states, buf_keys, buf_values, buf_decay,
    buf_slots, buf_lens, read_slots, write_slots,
    scale,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr, HAS_BUFFER: tl.constexpr,
    FOLD_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    i_v, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // (HV // H)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    mask_s = mask_v[:, None] & mask_k[None, :]

    read = tl.load(read_slots + i_b).to(tl.int64)
    write = tl.load(write_slots + i_b).to(tl.int64)
    tile = i_h * V * K + offs_v[:, None] * K + offs_k[None, :]
    rows_held = tl.where(read >= 0, V, 0)  # a request with no checkpoint reads nothing
    S0 = tl.load(states + tl.maximum(read, 0) * HV * V * K + tile,
                 mask=(offs_v < rows_held)[:, None] & mask_k[None, :], other=0.0)

    k_raw = tl.load(k + (i_b * H + i_hk) * K + offs_k, mask=mask_k, other=0.0)
    qn = l2norm_vec(tl.load(q + (i_b * H + i_hk) * K + offs_k, mask=mask_k, other=0.0).to(tl.float32),
                    NORM_EPS) * scale
    kn = l2norm_vec(k_raw.to(tl.float32), NORM_EPS)
    vv = tl.load(v + (i_b * HV + i_h) * V + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    g, beta = gate(tl.load(a + i_b * HV + i_h), tl.load(b + i_b * HV + i_h), tl.load(A_log + i_h),
                   tl.load(dt_bias + i_h))

    mix_k = tl.zeros([BV], dtype=tl.float32)  # sum_j e^{G-G_j} (k.k_j) d_j
    mix_q = tl.zeros([BV], dtype=tl.float32)  # sum_j e^{G-G_j} (q.k_j) d_j
    G = g.to(tl.float64)  # cumulative decays are kept in fp64: their differences lose nothing
    if HAS_BUFFER:
        slot = tl.load(buf_slots + i_b).to(tl.int64)
        n = tl.load(buf_lens + i_b)
        decay_base = buf_decay + (slot * HV + i_h) * L
        G += tl.load(decay_base + n - 1, mask=n > 0, other=0.0)
        keys_base = buf_keys + (slot * H + i_hk) * L * K
        values_base = buf_values + (slot * HV + i_h) * L * V
        for start in range(0, n, BL):
            Kb, Db, Gb, mask_l = load_entries(keys_base, values_base, decay_base, start, n, offs_k, offs_v,
                                              mask_k, mask_v, K, V, BL)
            w = tl.where(mask_l, tl.exp((G - Gb).to(tl.float32)), 0.0)
            mix_k += tl.sum((w * tl.sum(Kb * kn[None, :], axis=1))[:, None] * Db, axis=0)
            mix_q += tl.sum((w * tl.sum(Kb * qn[None, :], axis=1))[:, None] * Db, axis=0)
        # the new entry; its key is stored once per key head, its decay once per value head
        if i_v == 0:
            tl.store(decay_base + n, G)
            if i_h % (HV // H) == 0:
                tl.store(keys_base + n * K + offs_k, k_raw, mask=mask_k)

    eG = tl.exp(G.to(tl.float32))
    d = beta * (vv - eG * tl.sum(S0 * kn[None, :], axis=1) - mix_k)
    o = eG * tl.sum(S0 * qn[None, :], axis=1) + mix_q + tl.sum(qn * kn) * d
    tl.store(out + (i_b * HV + i_h) * V + offs_v, o.to(out.dtype.element_ty), mask=mask_v)
    if HAS_BUFFER:
        tl.store(values_base + n * V + offs_v, d, mask=mask_v)
    if write >= 0:  # the flush: fold checkpoint + buffer + this token (buffer re-read from cache)
        S = eG * S0 + d[:, None] * kn[None, :]
        if HAS_BUFFER:
            if FOLD_DOT:
                for start in range(0, n, BL):
                    Kb, Db, Gb, mask_l = load_entries(keys_base, values_base, decay_base, start, n, offs_k, offs_v,
                                                      mask_k, mask_v, K, V, BL)
                    w = tl.where(mask_l, tl.exp((G - Gb).to(tl.float32)), 0.0)
                    S += tl.dot(tl.trans(Db * w[:, None]), Kb, input_precision=PRECISION)
            else:
                for j in range(0, n):
                    kj = l2norm_vec(tl.load(keys_base + j * K + offs_k, mask=mask_k, other=0.0).to(tl.float32),
                                    NORM_EPS)
                    wj = tl.exp((G - tl.load(decay_base + j)).to(tl.float32))
                    dj = tl.load(values_base + j * V + offs_v, mask=mask_v, other=0.0)
                    S += (wj * dj)[:, None] * kj[None, :]
        tl.store(states + write * HV * V * K + tile, S, mask=mask_s)


def _launch(q, k, v, a, b, A_log, dt_bias, states, buffer, buf_slots, buf_lens, read_slots, write_slots, scale,
            has_buffer: bool, out=None, block_v: int = 32, block_l: int = 16, num_warps: int = 4,
            fold_dot: bool = False, precision: str = "tf32x3") -> torch.Tensor:
    B, H, K = q.shape
    HV, V = v.shape[1], v.shape[2]
    if not states.is_contiguous():
        raise ValueError("states must be contiguous")
    out = torch.empty(B, HV, V, dtype=q.dtype, device=q.device) if out is None else out
    if B == 0:
        return out
    BV = min(block(V), block_v)
    if has_buffer:
        keys, values, decay, L = buffer.keys, buffer.values, buffer.decay, buffer.capacity
        if not (keys.is_contiguous() and values.is_contiguous() and decay.is_contiguous()):
            raise ValueError("buffer tensors must be contiguous")
    else:
        keys = values = decay = states
        L = 1
    scale = K ** -0.5 if scale is None else scale
    grid = (triton.cdiv(V, BV), B, HV)
    _decode_kernel[grid](
        q.contiguous(), k.contiguous(), v.contiguous(), a.contiguous(), b.contiguous(), A_log, dt_bias, out,
        states, keys, values, decay, buf_slots, buf_lens, read_slots, write_slots, scale,
        H=H, HV=HV, K=K, V=V, L=L, BK=block(K), BV=BV, BL=block_l, HAS_BUFFER=has_buffer,
        FOLD_DOT=fold_dot, PRECISION=precision, num_warps=num_warps,
    )
    return out


def buffered_decode_triton(q, k, v, a, b, A_log, dt_bias, states, buffer: BufferPool, buf_slots, buf_lens,
                           read_slots, write_slots, scale=None, out=None, **tuning) -> torch.Tensor:
    return _launch(q, k, v, a, b, A_log, dt_bias, states, buffer, buf_slots, buf_lens, read_slots, write_slots,
                   scale, has_buffer=True, out=out, **tuning)


def recurrent_decode_triton(q, k, v, a, b, A_log, dt_bias, states, slots, scale=None, out=None,
                            **tuning) -> torch.Tensor:
    return _launch(q, k, v, a, b, A_log, dt_bias, states, None, slots, slots, slots, slots, scale,
                   has_buffer=False, out=out, **tuning)
