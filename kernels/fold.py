"""Triton fold: flush each request's buffer into its checkpoint on demand.

states[write] = e^{G_last} states[read] + sum_j e^{G_last - G_j} d_j k_j^T (read -1: from zeros). Used when a
request leaves the stateless regime, after a speculative commit fills the buffer past chunk_size, and for
forced flushes; the regular flush is fused into the decode step (from the checkpoint tile it already holds). The
per-entry weights, e^{G_last - G_j} / |k_j|, are a few small tensor ops here (this is not the per-token path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pools import BufferPool
from .reference import NORM_EPS
from .tiles import block

Tensor = torch.Tensor

@triton.jit
def _fold_kernel(
    states, buf_keys, buf_values, weights, decays, buf_slots, buf_lens, read_slots, write_slots,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, KC: tl.constexpr, BL: tl.constexpr,
):
    """One [BV, K] tile of states[write] = decay * states[read] + sum_{j<n} weights[j] d_j k_j^T (raw keys: the
    weights carry 1/|k_j|). A K-chunk at a time, so the folded tile never occupies many registers, and BL entries per
    matrix product, so a flush waits on K/KC * n/BL rounds of loads (fp32 products: the state keeps fp32 accuracy)."""
    tl.static_assert(BL >= 16, "tl.dot contracts over at least 16 entries (Triton 3.6 refuses fewer on a GPU)")
    i_v, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_v = i_v * BV + tl.arange(0, BV)
    mask_v = offs_v < V
    read = tl.load(read_slots + i_b).to(tl.int64)
    write = tl.load(write_slots + i_b).to(tl.int64)
    slot = tl.load(buf_slots + i_b).to(tl.int64)
    n = tl.load(buf_lens + i_b)
    decay = tl.load(decays + i_b * HV + i_h)
    keys_base = buf_keys + (slot * H + i_h // (HV // H)) * L * K
    values_base = buf_values + (slot * HV + i_h) * L * V
    weights_base = weights + (i_b * HV + i_h) * L
    rows_held = tl.where(read >= 0, V, 0)  # read < 0 folds into zeros
    for kc in range(0, BK, KC):
        offs_c = kc + tl.arange(0, KC)
        mask_c = offs_c < K
        chunk = i_h * V * K + offs_v[:, None] * K + offs_c[None, :]
        S = decay * tl.load(states + tl.maximum(read, 0) * HV * V * K + chunk,
                            mask=(offs_v < rows_held)[:, None] & mask_c[None, :], other=0.0)
        for start in range(0, n, BL):
            offs_l = start + tl.arange(0, BL)
            mask_l = offs_l < n
            Dt = tl.load(values_base + offs_l[None, :] * V + offs_v[:, None], mask=mask_l[None, :] & mask_v[:, None],
                         other=0.0)  # [BV, BL]
            Kw = tl.load(keys_base + offs_l[:, None] * K + offs_c[None, :], mask=mask_l[:, None] & mask_c[None, :],
                         other=0.0).to(tl.float32) * tl.load(weights_base + offs_l, mask=mask_l, other=0.0)[:, None]
            S += tl.dot(Dt, Kw, input_precision="ieee")
        tl.store(states + write * HV * V * K + chunk, S, mask=mask_v[:, None] & mask_c[None, :])


def fold_triton(states: Tensor, buffer: BufferPool, buf_slots: Tensor, buf_lens: Tensor, read_slots: Tensor,
                write_slots: Tensor, block_v: int = 32, num_warps: int = 4) -> None:
    n_req = buf_slots.numel()
    if n_req == 0:
        return
    _, HV, V, K = states.shape
    H = buffer.keys.shape[1]
    slots, lens = buf_slots.long(), buf_lens.long()
    G = buffer.decay[slots].double()  # [n, HV, L]
    G_last = G.gather(2, (lens - 1).clamp(min=0)[:, None, None].expand(-1, HV, 1)) * (lens > 0)[:, None, None]
    keys = buffer.keys[slots].float()
    inv_norm = torch.rsqrt((keys * keys).sum(-1) + NORM_EPS).repeat_interleave(HV // H, dim=1)  # [n, HV, L]
    weights = ((G_last - G).exp() * inv_norm).float().contiguous()
    decays = G_last[..., 0].exp().float().contiguous()
    BK, BV = block(K), min(block(V), block_v)
    _fold_kernel[(triton.cdiv(V, BV), n_req, HV)](
        states, buffer.keys, buffer.values, weights, decays, buf_slots, buf_lens, read_slots, write_slots,
        H=H, HV=HV, K=K, V=V, L=buffer.capacity, BK=BK, BV=BV, KC=min(BK, 32), BL=16, num_warps=num_warps,
    )
