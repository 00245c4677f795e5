"""Memory the KVBuffer kernels work on: a pool of state checkpoints and a pool of token buffers.

Both pools are slot-indexed and shared by all requests of one Gated DeltaNet layer. A request holds at
most one buffer slot and, once its context outgrows the buffer, one state slot. Buffer lengths are kept
by the caller (they are the same for every layer), so kernels only read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def new_state_pool(num_slots: int, num_v_heads: int, head_k_dim: int, head_v_dim: int,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Checkpoints `[slots, HV, V, K]` (SGLang's layout: each value head stores S^T)."""
    return torch.zeros(num_slots, num_v_heads, head_v_dim, head_k_dim, device=device, dtype=dtype)


@dataclass
class BufferPool:
    """Per-request buffers of the tokens since the checkpoint, head-major so a (slot, head) is contiguous.

    keys:   `[slots, H, L, K]`  raw keys as the model produced them (normalized on read)
    values: `[slots, HV, L, V]` corrected values d_j (fp32, or fp64 in reference checks)
    decay:  `[slots, HV, L]`    cumulative log decay G_j since the checkpoint (fp64: differences of large
                                 cumulative sums keep full precision; 8 bytes per head per entry)
    """

    keys: torch.Tensor
    values: torch.Tensor
    decay: torch.Tensor

    @classmethod
    def allocate(cls, num_slots: int, capacity: int, num_k_heads: int, num_v_heads: int, head_k_dim: int,
                 head_v_dim: int, key_dtype: torch.dtype = torch.bfloat16,
                 value_dtype: torch.dtype = torch.float32, decay_dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu") -> BufferPool:
        return cls(
            keys=torch.zeros(num_slots, num_k_heads, capacity, head_k_dim, device=device, dtype=key_dtype),
            values=torch.zeros(num_slots, num_v_heads, capacity, head_v_dim, device=device, dtype=value_dtype),
            decay=torch.zeros(num_slots, num_v_heads, capacity, device=device, dtype=decay_dtype),
        )

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def num_slots(self) -> int:
        return self.keys.shape[0]

    def bytes_per_slot(self) -> int:
        return sum(t[0].numel() * t.element_size() for t in (self.keys, self.values, self.decay))
