"""The native serving engine: `build_engine(config)` returns an `Engine` (see api.py) running Qwen3-Next."""

from __future__ import annotations

from .api import Engine
from .config import EngineConfig

__all__ = ["Engine", "EngineConfig", "build_engine"]


def build_engine(config: EngineConfig) -> Engine:
    """Loads the model and sizes every pool from config.memory_budget_bytes (ValueError if it cannot fit)."""
    from .engine import NativeEngine  # torch and the model code: imported only when an engine is built

    return NativeEngine(config)
