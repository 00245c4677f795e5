"""Gated full attention (Qwen3-Next): q/k RMSNorm per head, partial rotary, sigmoid output gate, paged KV."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .batch import AttentionGroup, ForwardBatch
from .config import ModelConfig
from .norm import RMSNorm
from .rotary import apply_rotary

_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    groups: list[AttentionGroup], scale: float) -> torch.Tensor:
    """Causal attention of q `[N, H, D]` over each request's cached keys and values `[rows, KVH, D]`.

    Padding queries repeat their request's last token, so they write the same values to the same rows (no
    masked indexing, hence no host sync). cuDNN attention is left out: it builds a graph per new shape.
    """
    out = torch.empty_like(q)
    rep = q.shape[1] // k_cache.shape[1]
    for g in groups:
        Q = q[g.q_rows].transpose(1, 2)  # [B, H, Q, D]
        K = k_cache[g.kv_rows].repeat_interleave(rep, dim=2).transpose(1, 2)  # [B, H, L, D]
        V = v_cache[g.kv_rows].repeat_interleave(rep, dim=2).transpose(1, 2)
        with sdpa_kernel(_BACKENDS):
            O = F.scaled_dot_product_attention(Q, K, V, attn_mask=g.mask, scale=scale)
        out[g.q_rows.flatten()] = O.transpose(1, 2).flatten(0, 1)
    return out


class GatedAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                            cfg.head_dim)
        hidden, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim * 2, bias=bias)  # query and gate per head
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_cache = torch.empty(0)  # [rows, KVH, D], bound by the model runner
        self.v_cache = torch.empty(0)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch
                ) -> torch.Tensor:
        N = x.shape[0]
        q, gate = self.q_proj(x).view(N, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        q = apply_rotary(self.q_norm(q), *rope)
        k = apply_rotary(self.k_norm(self.k_proj(x).view(N, self.num_kv_heads, self.head_dim)), *rope)
        v = self.v_proj(x).view(N, self.num_kv_heads, self.head_dim)
        self.k_cache[batch.kv_rows] = k.to(self.k_cache.dtype)
        self.v_cache[batch.kv_rows] = v.to(self.v_cache.dtype)
        o = paged_attention(q, self.k_cache, self.v_cache, batch.attention, self.head_dim ** -0.5)
        return self.o_proj(o.reshape(N, -1) * torch.sigmoid(gate.reshape(N, -1)))
