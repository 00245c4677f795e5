"""Qwen3-Next settings read from a Hugging Face `config.json`: only what the forward pass needs."""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

ARCHITECTURE = "Qwen3NextForCausalLM"
LAYER_KINDS = ("linear_attention", "full_attention")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    # gated full attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    partial_rotary_factor: float
    # Gated DeltaNet
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    # MLP / MoE
    intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Validates a config.json dict; refuses other architectures and features we do not implement."""
        archs = raw.get("architectures") or []
        if ARCHITECTURE not in archs and raw.get("model_type") != "qwen3_next":
            got = ", ".join(archs) or raw.get("model_type") or "unknown"
            raise ValueError(f"config.json: architecture {got} is not supported; expected {ARCHITECTURE}")
        if raw.get("quantization_config"):
            raise ValueError("config.json: quantization_config is set; only unquantized bf16/fp32 checkpoints load")
        derived = {"layer_types", "rope_theta", "partial_rotary_factor", "head_dim", "mlp_only_layers",
                   "eos_token_ids"}
        for f in fields(cls):
            if f.default is MISSING and f.name not in derived and f.name not in raw:
                raise ValueError(f"config.json: missing field {f.name}")
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"config.json: rope type {rope_type!r} is not supported (only 'default')")
        n_layers = raw["num_hidden_layers"]
        interval = raw.get("full_attention_interval", 4)
        layer_types = tuple(raw.get("layer_types") or
                            ("full_attention" if (i + 1) % interval == 0 else "linear_attention"
                             for i in range(n_layers)))
        bad = sorted(set(layer_types) - set(LAYER_KINDS))
        if len(layer_types) != n_layers or bad:
            raise ValueError(f"config.json: layer_types must list {n_layers} of {LAYER_KINDS}, "
                             f"got {bad or len(layer_types)}")
        eos = raw.get("eos_token_id")
        values: dict[str, Any] = {f.name: raw[f.name] for f in fields(cls) if f.name in raw and f.name not in derived}
        values.update(
            layer_types=layer_types,
            rope_theta=rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
            partial_rotary_factor=rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.25)),
            head_dim=raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"],
            mlp_only_layers=tuple(raw.get("mlp_only_layers") or ()),
            eos_token_ids=() if eos is None else tuple(eos) if isinstance(eos, list) else (eos,),
        )
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
        return cls(**values)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: the model must be a Hugging Face model directory")
        return cls.from_dict(json.loads(file.read_text()))

    def is_moe_layer(self, i: int) -> bool:
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0

    @property
    def linear_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def conv_dim(self) -> int:
        """Channels of the GDN depthwise conv: q, k (key heads) and v (value heads), concatenated."""
        return (2 * self.linear_num_key_heads * self.linear_key_head_dim
                + self.linear_num_value_heads * self.linear_value_head_dim)
