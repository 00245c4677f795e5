"""Triton fold: flush each request's buffer into its checkpoint on demand.

states[write] = e^{G_last} states[read] + sum_j e^{G_last - G_j} d_j k_j^T (read -1: from zeros). Used when
a request leaves the stateless regime, after a speculative commit fills the buffer past chunk_size, and
for forced flushes; the regular flush is fused into the decode kernel.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .pools import BufferPool
from .tiles import block, load_entries


@triton.jit
def _fold_kernel(
    states, buf_keys, buf_values, buf_decay, buf_slots, buf_lens, read_slots, write_slots,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BL: tl.constexpr, PRECISION: tl.constexpr,
):
    i_v, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_hk = i_h // (HV // H)
    offs_k = tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    tile = i_h * V * K + offs_v[:, None] * K + offs_k[None, :]

    read = tl.load(read_slots + i_b).to(tl.int64)
    write = tl.load(write_slots + i_b).to(tl.int64)
    rows_held = tl.where(read >= 0, V, 0)
    S = tl.load(states + tl.maximum(read, 0) * HV * V * K + tile,
                mask=(offs_v < rows_held)[:, None] & mask_k[None, :], other=0.0)

    slot = tl.load(buf_slots + i_b).to(tl.int64)
    n = tl.load(buf_lens + i_b)
    decay_base = buf_decay + (slot * HV + i_h) * L
    keys_base = buf_keys + (slot * H + i_hk) * L * K
    values_base = buf_values + (slot * HV + i_h) * L * V
    G_last = tl.load(decay_base + n - 1, mask=n > 0, other=0.0)
    S = S * tl.exp(G_last.to(tl.float32))
    for start in range(0, n, BL):
        Kb, Db, Gb, mask_l = load_entries(keys_base, values_base, decay_base, start, n, offs_k, offs_v,
                                          mask_k, mask_v, K, V, BL)
        w = tl.where(mask_l, tl.exp((G_last - Gb).to(tl.float32)), 0.0)
        S += tl.dot(tl.trans(Db * w[:, None]), Kb, input_precision=PRECISION)
    tl.store(states + write * HV * V * K + tile, S, mask=mask_v[:, None] & mask_k[None, :])


def fold_triton(states, buffer: BufferPool, buf_slots, buf_lens, read_slots, write_slots,
                block_v: int = 32, block_l: int = 16, num_warps: int = 4,
                precision: str = "tf32x3") -> None:
    n_req = buf_slots.numel()
    if n_req == 0:
        return
    _, HV, V, K = states.shape
    H = buffer.keys.shape[1]
    BV = min(block(V), block_v)
    _fold_kernel[(triton.cdiv(V, BV), n_req, HV)](
        states, buffer.keys, buffer.values, buffer.decay, buf_slots, buf_lens, read_slots, write_slots,
        H=H, HV=HV, K=K, V=V, L=buffer.capacity, BK=block(K), BV=BV, BL=block_l, PRECISION=precision,
        num_warps=num_warps,
    )
