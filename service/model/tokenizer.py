"""Tokenizers: bytes for the embedded model, `tokenizers`' tokenizer.json for real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; 256 is end-of-text. Incomplete UTF-8 decodes to U+FFFD."""

    vocab_size = 257
    eos_token_ids = (256,)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer.json; end-of-text ids from generation_config.json, else from config.json."""

    def __init__(self, path: str | Path, vocab_size: int, config_eos: tuple[int, ...]) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: the model directory needs a tokenizer.json")
        self._tok = _Tokenizer.from_file(str(file))
        self.vocab_size = vocab_size
        eos = config_eos
        gen = path / "generation_config.json"
        if gen.is_file() and (value := json.loads(gen.read_text()).get("eos_token_id")) is not None:
            eos = tuple(value) if isinstance(value, list) else (value,)
        self.eos_token_ids = eos

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
