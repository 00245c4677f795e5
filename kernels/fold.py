"""Triton fold: flush each request's buffer into its checkpoint on demand.

states[write] = e^{G_last} states[read] + sum_j e^{G_last - G_j} d_j k_j^T (read -1: from zeros). Used when a
request leaves the stateless regime, after a speculative commit fills the buffer past chunk_size, and for
forced flushes; the regular flush is fused into the decode step. Both add the buffer to a state tile held in
registers (`tiles.add_buffer`). The per-entry weights, e^{G_last - G_j} / |k_j|, are a few small tensor ops here
(this is not the per-token path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launches import launch_for
from .pools import BufferPool
from .reference import NORM_EPS
from .tiles import add_buffer, block

Tensor = torch.Tensor

@triton.jit
def _fold_kernel(
    states, buf_keys, buf_values, weights, decays, buf_slots, buf_lens, read_slots, write_slots,
    H: tl.constexpr, HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, STAGES: tl.constexpr,
):
    """One [BV, K] tile of states[write] = decay * states[read] + sum_{j<n} weights[j] d_j k_j^T (read < 0: from
    zeros; write < 0: nothing to fold), by the same rank-1 updates as the decode's fused flush."""
    i_v, i_b, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    write = tl.load(write_slots + i_b).to(tl.int64)
    if write < 0:
        return
    offs_k, offs_v = tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    mask_k, mask_v = offs_k < K, offs_v < V
    read = tl.load(read_slots + i_b).to(tl.int64)
    slot = tl.load(buf_slots + i_b).to(tl.int64)
    tile = i_h * V * K + offs_v[:, None] * K + offs_k[None, :]
    S = tl.load(decays + i_b * HV + i_h) * tl.load(
        states + tl.maximum(read, 0) * HV * V * K + tile,
        mask=(offs_v < tl.where(read >= 0, V, 0))[:, None] & mask_k[None, :], other=0.0)
    S = add_buffer(S, buf_keys + (slot * H + i_h // (HV // H)) * L * K, buf_values + (slot * HV + i_h) * L * V,
                   weights + (i_b * HV + i_h) * L, tl.load(buf_lens + i_b), offs_k, mask_k, offs_v, mask_v, K, V,
                   STAGES)
    tl.store(states + write * HV * V * K + tile, S,
             mask=mask_v[:, None] & mask_k[None, :])


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
        H=H, HV=HV, K=K, V=V, L=buffer.capacity, BK=BK, BV=BV, STAGES=launch_for(states.device).flush_stages,
        num_warps=num_warps,
    )
