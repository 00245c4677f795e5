"""Engine settings. The names are the product's one vocabulary: the service's settings, the custom
resource's spec and the Helm values use exactly these (see DESIGN.md, "Settings")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_MODEL = "embedded:tiny-qwen3-next"


@dataclass(frozen=True)
class EngineConfig:
    model: str = DEFAULT_MODEL  # a Hugging Face model directory, or the embedded tiny model
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    decode_mode: Literal["kvbuffer", "recurrent"] = "kvbuffer"
    buffer_size: int = 64  # tokens a request may hold in its buffer per layer; shorter contexts hold no state
    chunk_size: int = 32  # once a request has a state, its buffer is folded in every chunk_size tokens
    speculative_algorithm: Literal["none", "ngram"] = "none"
    speculative_num_draft_tokens: int = 4
    max_running_requests: int = 64
    max_waiting_requests: int = 256  # may wait for a running slot; more are refused (never an unbounded queue)
    max_num_batched_tokens: int = 2048  # token budget of one engine step (prefill chunks + decodes)
    max_context_length: int = 4096
    memory_budget_bytes: int = 512 * 2**20  # state, buffer and KV-cache pools are sized from this at start
    cuda_graph_max_batch: int = 256  # decode steps of up to this many requests replay CUDA graphs; 0: never
    seed: int = 0  # of the embedded model's generated weights; requests sample from their own seeds

    def __post_init__(self) -> None:
        from kvbuffer.kernels.validate import check_settings  # imports torch: only when a config is built

        positive = ("buffer_size", "chunk_size", "max_running_requests", "max_waiting_requests",
                    "max_num_batched_tokens", "max_context_length", "memory_budget_bytes")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cuda_graph_max_batch < 0:
            raise ValueError(f"cuda_graph_max_batch must be >= 0 (0 turns CUDA graphs off), got "
                             f"{self.cuda_graph_max_batch}")
        drafts = self.speculative_num_draft_tokens if self.speculative_algorithm != "none" else 0
        if not 0 <= self.speculative_num_draft_tokens <= 16:
            raise ValueError(f"speculative_num_draft_tokens must be in 0..16, got "
                             f"{self.speculative_num_draft_tokens}")
        if self.speculative_algorithm != "none" and self.decode_mode == "recurrent":
            raise ValueError("speculative_algorithm: speculative decoding needs decode_mode=kvbuffer (the "
                             "recurrent baseline keeps no per-draft states to roll back)")
        check_settings(self.buffer_size, self.chunk_size, drafts)
