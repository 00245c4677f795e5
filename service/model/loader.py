"""Weights from safetensors into the model, by Hugging Face name, refusing missing or misshapen tensors.

Accepts both expert layouts found in the wild: transformers' fused `mlp.experts.gate_up_proj` / `down_proj`
and the per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight` of the original Qwen checkpoints.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

log = logging.getLogger(__name__)

_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_IGNORED = re.compile(r"^mtp\.|rotary_emb\.inv_freq$")  # multi-token-prediction head, derived buffers


def _place(params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> tuple[str, str] | None:
    """Copies one checkpoint tensor into its parameter (or expert slice); returns (parameter, piece) it filled."""
    target, index, piece = name, (), "all"
    if m := _PER_EXPERT.match(name):
        prefix, e, part = m.group(1), int(m.group(2)), m.group(3)
        target = f"{prefix}.{'down_proj' if part == 'down' else 'gate_up_proj'}"
        if target in params:
            half = params[target].shape[1] // 2
            index = (e,) if part == "down" else (e, slice(0, half) if part == "gate" else slice(half, None))
            piece = f"{e}.{part}"
    if target not in params:
        if not _IGNORED.search(name):
            log.warning("checkpoint tensor %s is not used by the model", name)
        return None
    dest = params[target][index] if index else params[target]
    if tuple(dest.shape) != tuple(tensor.shape):
        raise ValueError(f"checkpoint tensor {name} has shape {list(tensor.shape)}, "
                         f"the model expects {list(dest.shape)}")
    with torch.no_grad():
        dest.copy_(tensor)
    return target, piece


def load_tensors(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Fills every parameter of `model` from (name, tensor) pairs; raises naming the first missing one."""
    params = dict(model.named_parameters())
    pieces: dict[str, set[str]] = {name: set() for name in params}
    for name, tensor in tensors:
        if (placed := _place(params, name, tensor)) is not None:
            pieces[placed[0]].add(placed[1])
    missing = []
    for name, got in pieces.items():
        experts = params[name].shape[0] if name.endswith(("experts.gate_up_proj", "experts.down_proj")) else 0
        per_expert = {f"{e}.{p}" for e in range(experts)
                      for p in (("down",) if name.endswith("down_proj") else ("gate", "up"))}
        if "all" not in got and not (experts and per_expert <= got):
            missing.append(name)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{source}: missing tensor {missing[0]}{more}")


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights found")
    return files


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Loads a Hugging Face model directory's safetensors shards into `model` (tensors go to its device)."""
    path = Path(path)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for file in _checkpoint_files(path):
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, f.get_tensor(name)

    load_tensors(model, tensors(), str(path))
