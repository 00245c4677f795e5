"""Qwen3-Next for causal LM over a flat batch of tokens from many requests (names match HF checkpoints)."""

from __future__ import annotations

import torch
from torch import nn

from .attention import GatedAttention
from .batch import ForwardBatch
from .config import ModelConfig
from .gdn import GatedDeltaNet
from .mlp import MLP, SparseMoE
from .norm import RMSNorm
from .rotary import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int) -> None:
        super().__init__()
        self.is_linear = cfg.layer_types[i] == "linear_attention"
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(cfg, i)
        else:
            self.self_attn = GatedAttention(cfg)
        self.mlp = SparseMoE(cfg) if cfg.is_moe_layer(i) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch
                ) -> torch.Tensor:
        h = self.input_layernorm(x)
        h = self.linear_attn(h, batch.gdn) if self.is_linear else self.self_attn(h, rope, batch)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3NextBody(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3NextForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Qwen3NextBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.partial_rotary_factor, cfg.rope_theta)

    def gdn_layers(self) -> list[GatedDeltaNet]:
        return [layer.linear_attn for layer in self.model.layers if layer.is_linear]

    def attention_layers(self) -> list[GatedAttention]:
        return [layer.self_attn for layer in self.model.layers if not layer.is_linear]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states `[N, hidden]` of the flat token batch `[N]`."""
        x = self.model.embed_tokens(input_ids)
        rope = self.rotary(batch.positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, rope, batch)
        return self.model.norm(x)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
