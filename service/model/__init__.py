"""Qwen3-Next for the native engine: config, layers, weight loading, tokenizers, the embedded tiny default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import tiny
from .config import ModelConfig
from .loader import load_checkpoint
from .qwen3_next import Qwen3NextForCausalLM
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

__all__ = ["LoadedModel", "ModelConfig", "Qwen3NextForCausalLM", "Tokenizer", "empty_model", "load_model"]


@dataclass
class LoadedModel:
    name: str
    model: Qwen3NextForCausalLM
    tokenizer: Tokenizer
    config: ModelConfig


def empty_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Qwen3NextForCausalLM:
    """Parameters allocated once, on the device, in the dtype, uninitialized (loading fills every one)."""
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(cfg)
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def load_model(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LoadedModel:
    """`embedded:tiny-qwen3-next` (seeded weights, byte tokenizer) or a Hugging Face model directory."""
    if name.startswith("embedded:"):
        if name != tiny.NAME:
            raise ValueError(f"model: unknown embedded model {name!r}; the embedded model is {tiny.NAME!r}")
        cfg = ModelConfig.from_dict(tiny.CONFIG)
        model = empty_model(cfg, device, dtype)
        tiny.init_seeded(model, seed)
        return LoadedModel(name, model, ByteTokenizer(), cfg)
    path = Path(name)
    if not path.is_dir():
        raise FileNotFoundError(f"model: {name} is neither an embedded model nor a model directory")
    cfg = ModelConfig.from_dir(path)
    model = empty_model(cfg, device, dtype)
    load_checkpoint(model, path)
    return LoadedModel(path.name, model, HFTokenizer(path, cfg.vocab_size, cfg.eos_token_ids), cfg)
