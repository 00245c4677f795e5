"""The native serving engine: `build_engine(config)` returns an `Engine` (see api.py) running Qwen3-Next."""

from __future__ import annotations

from .api import Engine
from .config import EngineConfig
from .engine import NativeEngine

__all__ = ["Engine", "EngineConfig", "NativeEngine", "build_engine"]


def build_engine(config: EngineConfig) -> Engine:
    """Loads the model and sizes every pool from config.memory_budget_bytes (ValueError if it cannot fit)."""
    return NativeEngine(config)
