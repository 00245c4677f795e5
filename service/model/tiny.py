"""The embedded default: a tiny Qwen3-Next with seeded random weights, so the service runs with no download.

Both layer kinds are present (three Gated DeltaNet layers, one gated attention layer), dense MLP and sparse
MoE both appear, and head counts keep grouped value heads (HV = 2H). Its text is random bytes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

NAME = "embedded:tiny-qwen3-next"

CONFIG: dict = {
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "vocab_size": 257,  # ByteTokenizer: 256 bytes + end-of-text
    "eos_token_id": 256,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_conv_kernel_dim": 4,
    "intermediate_size": 96,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [0],
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "max_position_embeddings": 32768,
}


@torch.no_grad()
def init_seeded(model: nn.Module, seed: int) -> None:
    """Deterministic weights on any device (drawn on CPU in name order), scaled so activations stay O(1).

    Matrices ~ N(0, 1/fan_in) so logits are well separated (greedy choices are not near-ties); norms near
    their identity; slow decay (A in [0.02, 0.5], dt_bias around 1) so the state carries the whole context
    and a wrong state shows in the logits.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if name.endswith("A_log"):
            value = torch.empty(p.shape).uniform_(0.02, 0.5, generator=gen).log()
        elif name.endswith("dt_bias"):
            value = 1.0 + 0.5 * torch.randn(p.shape, generator=gen)
        elif name.endswith("linear_attn.norm.weight"):
            value = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        elif name.endswith("norm.weight"):
            value = 0.1 * torch.randn(p.shape, generator=gen)  # zero-centred: applied as (1 + w)
        elif name.endswith("embed_tokens.weight"):
            value = torch.randn(p.shape, generator=gen)
        else:
            value = torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1])
        p.copy_(value)
