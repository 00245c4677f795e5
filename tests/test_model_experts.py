"""The sparse MoE's experts against a per-token, per-slot loop in fp64, on fresh random weights and routings.

Shapes cover both paths: 16-byte-aligned rows take grouped GEMM, unaligned ones the per-expert fallback. Token
counts include 0 and 1 and routings that leave experts (first, last, middle) without tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kvbuffer.service.model.mlp import Experts, _grouped_mm_fits
from qwen3_next_cases import fresh_seed

NUM_EXPERTS, TOP_K = 8, 2
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 4e-2}


def oracle(experts: Experts, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    gate_up, down = experts.gate_up_proj.double().cpu(), experts.down_proj.double().cpu()
    x, index, weights = x.double().cpu(), index.cpu(), weights.double().cpu()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(index.shape[1]):
            e = int(index[t, slot])
            gate, up = (gate_up[e] @ x[t]).chunk(2)
            out[t] += weights[t, slot] * (down[e] @ (F.silu(gate) * up))
    return out


def routing(kind: str, tokens: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "random":
        return torch.rand(tokens, NUM_EXPERTS, generator=gen).argsort(dim=-1)[:, :TOP_K]
    pair = {"middle": [3, 5], "edges": [NUM_EXPERTS - 1, 0]}[kind]  # the others get no tokens
    return torch.tensor([pair] * tokens, dtype=torch.long)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("hidden", "intermediate", "grouped"), [(32, 16, True), (12, 6, False)],
                         ids=["aligned", "unaligned"])
@pytest.mark.parametrize(("tokens", "kind"), [(0, "random"), (1, "random"), (3, "random"), (64, "random"),
                                              (5, "middle"), (5, "edges")])
def test_experts_match_loop_oracle(device, dtype, hidden, intermediate, grouped, tokens, kind):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    experts = Experts(NUM_EXPERTS, hidden, intermediate)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=gen) / hidden**0.5)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=gen) / intermediate**0.5)
    experts = experts.to(device, dtype)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    index = routing(kind, tokens, gen).to(device)
    weights = torch.rand(tokens, TOP_K, generator=gen).softmax(dim=-1).to(device, dtype)
    if device == "cpu":
        assert _grouped_mm_fits(x, experts.gate_up_proj, experts.down_proj) == (grouped and tokens > 0)

    with torch.no_grad():
        got = experts(x, index, weights)

    assert got.shape == x.shape and got.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double().cpu(), oracle(experts, x, index, weights), rtol=tol, atol=tol,
                               msg=lambda m: f"{m} (seed {seed})")
