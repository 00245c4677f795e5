"""Feed-forward blocks: the dense SwiGLU MLP and the sparse MoE with a gated shared expert."""

from __future__ import annotations

import functools

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


@functools.cache
def _sm_major(device: torch.device) -> int:
    return torch.cuda.get_device_capability(device)[0]


def _grouped_mm_fits(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` takes these operands with no host sync.

    On CUDA only bf16 on SM90/SM100 with under 1024 experts reaches torch's CUTLASS kernel (elsewhere torch
    loops over the groups after copying the offsets to the host); the CPU kernel takes fp32/bf16/fp16. Both need
    contiguous weights with 16-byte-aligned pointers and rows, and at least one row.
    """
    if x.device.type == "cuda":
        dtype_ok = x.dtype == torch.bfloat16 and _sm_major(x.device) in (9, 10) and weights[0].shape[0] < 1024
    else:
        dtype_ok = x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return dtype_ok and x.shape[0] > 0 and all(
        w.is_contiguous() and w.shape[-1] * w.element_size() % 16 == 0 and w.data_ptr() % 16 == 0 for w in weights)


class Experts(nn.Module):
    """All experts' weights as 3-D tensors (transformers' layout): gate_up `[E, 2I, H]`, down `[E, H, I]`."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x `[N, H]`, index and weights `[N, top_k]`: each token's experts and their routing weights.

        Assignments are sorted by expert and each expert's end offset found on the device, so both projections
        are one grouped GEMM each and a step needs no host sync and no per-expert launches. Where grouped GEMM
        does not fit (see `_grouped_mm_fits`) the same groups run one expert at a time, reading the offsets once.
        """
        n, k = index.shape
        ids, order = index.flatten().sort(stable=True)
        experts = torch.arange(self.gate_up_proj.shape[0], device=ids.device)
        ends = torch.searchsorted(ids, experts, right=True, out_int32=True)
        xs = x[order // k]
        if _grouped_mm_fits(xs, self.gate_up_proj, self.down_proj):
            gate, up = F.grouped_mm(xs, self.gate_up_proj.mT, offs=ends).chunk(2, dim=-1)
            ys = F.grouped_mm(F.silu(gate) * up, self.down_proj.mT, offs=ends)
        else:
            ys, start = torch.empty_like(xs), 0
            for e, end in enumerate(ends.tolist()):
                if end > start:
                    gate, up = F.linear(xs[start:end], self.gate_up_proj[e]).chunk(2, dim=-1)
                    ys[start:end] = F.linear(F.silu(gate) * up, self.down_proj[e])
                start = end
        unsorted = ys.new_empty(ys.shape)  # back to (token, slot) order: a scatter, so the sum is deterministic
        unsorted[order] = ys
        return (unsorted.view(n, k, x.shape[1]) * weights.unsqueeze(-1)).sum(dim=1)


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
