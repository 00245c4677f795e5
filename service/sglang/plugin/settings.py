"""The plugin's settings, read from the environment of every SGLang process that loads it.

SGLang spawns its scheduler processes (one per tensor-parallel rank) from the process that builds the Engine, so
whoever starts the Engine sets these variables first (`plugin_env` builds them) and every rank sees the same
values. Names follow the service's vocabulary (service/server/settings.py):

    KVBUFFER_SGLANG_DECODE_MODE                   kvbuffer | recurrent (SGLang's own decode, counted only)
    KVBUFFER_SGLANG_BUFFER_SIZE                   buffer entries per request and GDN layer
    KVBUFFER_SGLANG_CHUNK_SIZE                    the buffer is folded into the state every chunk_size tokens
    KVBUFFER_SGLANG_SPECULATIVE_NUM_DRAFT_TOKENS  tokens per verified block (SGLang's speculative_num_draft_tokens)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from kvbuffer.kernels import check_settings

PREFIX = "KVBUFFER_SGLANG_"
DecodeMode = Literal["kvbuffer", "recurrent"]


@dataclass(frozen=True)
class PluginSettings:
    decode_mode: DecodeMode = "kvbuffer"
    buffer_size: int = 24
    chunk_size: int = 16
    speculative_num_draft_tokens: int = 0

    def __post_init__(self) -> None:
        if self.decode_mode not in ("kvbuffer", "recurrent"):
            raise ValueError(f"decode_mode must be 'kvbuffer' or 'recurrent', got {self.decode_mode!r}")
        check_settings(self.buffer_size, self.chunk_size, self.speculative_num_draft_tokens)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PluginSettings:
        """Settings from KVBUFFER_SGLANG_* variables (defaults where unset); a bad value raises a ValueError
        naming the variable."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for name, kind in (("decode_mode", str), ("buffer_size", int), ("chunk_size", int),
                           ("speculative_num_draft_tokens", int)):
            raw = env.get(PREFIX + name.upper())
            if raw is None or raw == "":
                continue
            try:
                values[name] = kind(raw)
            except ValueError:
                raise ValueError(f"{PREFIX}{name.upper()} must be an integer, got {raw!r}") from None
        try:
            return cls(**values)  # type: ignore[arg-type]
        except ValueError as e:
            raise ValueError(f"{PREFIX}*: {e}") from None


def plugin_env(settings: PluginSettings) -> dict[str, str]:
    """The variables that carry `settings` to every SGLang process (set them before the Engine starts)."""
    return {PREFIX + name.upper(): str(getattr(settings, name)) for name in
            ("decode_mode", "buffer_size", "chunk_size", "speculative_num_draft_tokens")}
