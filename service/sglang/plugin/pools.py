"""The memory the plugin adds beside SGLang's pools: one KVBuffer buffer per GDN layer and request, and the
per-request entry count (the cursor) shared by all layers.

The checkpoint is SGLang's own state slot (`MambaPool.temporal[layer, slot]`, `[HV, V, K]` fp32), read by the
decode kernel and written only by flushes, prefill and commits. SGLang's ReplaySSM ring tensors are not used: they
exist only under `--enable-linear-replayssm`, whose server-argument checks force the overlap scheduler off and the
no_buffer radix strategy, and they hold fp32 keys and fp32 decays where KVBuffer keeps the model's key dtype and
fp64 cumulative decays. Buffers are indexed by the request's req-to-token slot, not its mamba slot: radix-cache
track slots and copies never decode, so they need no buffer; one extra slot at the end absorbs padded rows of
CUDA-graph batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from kvbuffer.kernels import BufferPool


@dataclass
class KVBufferPools:
    buffers: list[BufferPool]  # by SGLang's mamba layer index (req_to_token_pool.mamba_map[layer_id])
    lens: torch.Tensor  # [req slots + 1] int32: entries buffered since the checkpoint (same for every layer)
    counts: torch.Tensor = field(init=False)  # int64 [flushes, accepted drafts] so far, on the device (counters.py)

    def __post_init__(self) -> None:
        self.counts = torch.zeros(2, dtype=torch.int64, device=self.lens.device)

    @classmethod
    def allocate(cls, num_layers: int, req_slots: int, capacity: int, num_k_heads: int, num_v_heads: int,
                 head_k_dim: int, head_v_dim: int, key_dtype: torch.dtype, device: torch.device | str
                 ) -> KVBufferPools:
        """Buffers for `req_slots` requests plus the scratch slot, per layer (per-rank head counts under TP)."""
        buffers = [BufferPool.allocate(req_slots + 1, capacity, num_k_heads, num_v_heads, head_k_dim, head_v_dim,
                                       key_dtype=key_dtype, device=device) for _ in range(num_layers)]
        return cls(buffers, torch.zeros(req_slots + 1, dtype=torch.int32, device=device))

    @property
    def scratch(self) -> int:
        """The slot padded rows of a CUDA-graph batch write to (nobody reads it)."""
        return self.lens.shape[0] - 1

    @property
    def capacity(self) -> int:
        return self.buffers[0].capacity

    def nbytes(self) -> int:
        """Device memory the plugin added (all layers, all slots, the cursor)."""
        return sum(b.bytes_per_slot() * b.num_slots for b in self.buffers) + self.lens.numel() * 4
