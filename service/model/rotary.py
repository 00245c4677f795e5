"""Partial rotary embedding: only the first `partial_rotary_factor` of each head's dims are rotated."""

from __future__ import annotations

import torch


class RotaryEmbedding:
    def __init__(self, head_dim: int, partial_rotary_factor: float, theta: float) -> None:
        dim = int(head_dim * partial_rotary_factor)
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[N, rotary_dim]` for token positions `[N]`."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[N, heads, head_dim]`; rotates the leading rotary dims (rotate-half convention), passes the rest."""
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    x1, x2 = rot[..., : d // 2], rot[..., d // 2:]
    rotated = rot * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]
    return torch.cat((rotated, rest), dim=-1)
