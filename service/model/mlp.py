"""Feed-forward blocks: the dense SwiGLU MLP and the sparse MoE with a gated shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """All experts' weights as 3-D tensors (transformers' layout): gate_up `[E, 2I, H]`, down `[E, H, I]`."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x `[N, H]`, index and weights `[N, top_k]`: each token's experts and their routing weights.

        Assignments are sorted by expert so each expert runs on one contiguous slice; the only host sync is
        reading the per-expert counts once.
        """
        flat = index.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        token = order // index.shape[1]
        xs, ws = x[token], weights.flatten()[order, None]
        ys = torch.empty_like(xs)
        start = 0
        for e, count in enumerate(counts):
            if count:
                seg = slice(start, start + count)
                gate, up = F.linear(xs[seg], self.gate_up_proj[e]).chunk(2, dim=-1)
                ys[seg] = F.linear(F.silu(gate) * up, self.down_proj[e]) * ws[seg]
                start += count
        return torch.zeros_like(x).index_add_(0, token, ys)


class SparseMoE(nn.Module):
    """Top-k softmax routing (optionally renormalized over the chosen k) plus a sigmoid-gated shared expert."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        routed = self.experts(x, index, weights.to(logits.dtype))
        return routed + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
