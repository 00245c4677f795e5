"""A step's small index and parameter tensors, sent to the device in one copy that the host never waits for.

`torch.tensor(values, device="cuda")` copies from pageable memory: the host blocks until the copy is done, and
the copy is queued behind all work already on the stream, so every such tensor is a host-device sync (about 16
per decode step). `pack` writes all the lists into one host tensor, pinned on CUDA, sends it with a single
`non_blocking` copy and returns views of the device copy.

Pinned memory is not reused by hand: every `pack` takes a fresh pinned tensor from torch's caching host
allocator, which records an event for each `non_blocking` copy out of a block and hands that block out again
only once the copy is done. So the host tensor may be dropped as soon as the copy is queued, and after warm-up an
allocation is a free-list lookup, not a cudaHostAlloc. Double-buffering under an event of our own would save
nothing and adds a way to overwrite a buffer that is still being read.

Every part starts at a multiple of 16 bytes, as a tensor of its own would: Triton specialises kernels on the
alignment of pointer arguments, so a part's alignment must not vary from step to step (another compilation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import chain

import torch

Values = Sequence[float] | Sequence[Sequence[float]]  # 1-D, or 2-D as rows of one length


def pack(parts: Sequence[Values], device: torch.device, dtype: torch.dtype = torch.int64) -> list[torch.Tensor]:
    """`parts` as `dtype` tensors on `device` (views of one buffer), sent in one copy without a host sync."""
    align = 16 // dtype.itemsize
    flat: list[float] = []
    layout: list[tuple[int, tuple[int, ...]]] = []
    for part in parts:
        rows = len(part) > 0 and isinstance(part[0], Sequence)
        shape = (len(part), len(part[0])) if rows else (len(part),)
        layout.append((len(flat), shape))
        flat.extend(chain.from_iterable(part) if rows else part)
        if len(flat) != layout[-1][0] + math.prod(shape):
            raise ValueError(f"rows of different lengths in a 2-D part of shape {shape}")
        flat.extend([0] * (-len(flat) % align))
    host = torch.tensor(flat, dtype=dtype, pin_memory=device.type == "cuda")
    sent = host.to(device, non_blocking=True)
    return [sent[start:start + math.prod(shape)].view(shape) for start, shape in layout]


class HostStaging:
    """Collects the lists of a step as it is planned (`add` returns a part's index), then `send` packs them all."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.parts: list[Values] = []

    def add(self, values: Values) -> int:
        self.parts.append(values)
        return len(self.parts) - 1

    def send(self) -> list[torch.Tensor]:
        """The device tensors, by the index `add` gave; they hold data once the stream reaches the copy."""
        return pack(self.parts, self.device)
