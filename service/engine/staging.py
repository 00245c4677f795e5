"""A step's small index and parameter tensors, sent to the device in one copy that the host never waits for.

`torch.tensor(values, device="cuda")` copies from pageable memory: the host blocks until the copy is done, and
the copy is queued behind all work already on the stream, so every such tensor is a host-device sync (about 16
per decode step). `pack` writes all the parts (lists, or numpy arrays from the planner's vectorized index math)
into one host tensor, pinned on CUDA, through numpy (a Python list of 16k indices costs `torch.tensor` about a
millisecond), sends it with a single `non_blocking` copy and returns views of the device copy.

Pinned memory is not reused by hand: every `pack` takes a fresh pinned tensor from torch's caching host
allocator, which records an event for each `non_blocking` copy out of a block and hands that block out again
only once the copy is done. So the host tensor may be dropped as soon as the copy is queued, and after warm-up an
allocation is a free-list lookup, not a cudaHostAlloc. Double-buffering under an event of our own would save
nothing and adds a way to overwrite a buffer that is still being read.

Every part starts at a multiple of 16 bytes, as a tensor of its own would: Triton specialises kernels on the
alignment of pointer arguments, so a part's alignment must not vary from step to step (another compilation).

A CUDA graph reads its inputs from fixed addresses, so `into` copies the parts into a tensor the caller keeps (a
graph's static inputs) instead of a fresh one: the same parts' shapes give the same views of it every step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# 1-D, or 2-D as rows of one length; numpy arrays are taken as they are (the planner's vectorized index math)
Values = Sequence[float] | Sequence[Sequence[float]] | np.ndarray


def _arrays(parts: Sequence[Values], dtype: torch.dtype) -> tuple[list[np.ndarray], list[int], int]:
    """Each part as an array of `dtype`, its offset in the flat buffer (16-byte aligned) and the buffer's length."""
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    align = 16 // dtype.itemsize
    arrays, offsets, size = [], [], 0
    for part in parts:
        try:
            array = np.asarray(part, dtype=np_dtype)
        except ValueError as e:  # numpy's "inhomogeneous shape"
            raise ValueError(f"rows of different lengths in a 2-D part: {e}") from None
        arrays.append(array)
        offsets.append(size)
        size += array.size + (-array.size % align)
    return arrays, offsets, size


def pack(parts: Sequence[Values], device: torch.device, dtype: torch.dtype = torch.int64,
         into: torch.Tensor | None = None) -> list[torch.Tensor]:
    """`parts` as `dtype` tensors on `device` (views of one buffer), sent in one copy without a host sync.

    `into`: the buffer to copy into (1-D, `dtype`, on `device`, as long as the aligned parts: `HostStaging.size`);
    else a new one.
    """
    arrays, offsets, size = _arrays(parts, dtype)
    host = torch.empty(size, dtype=dtype, pin_memory=device.type == "cuda")
    flat = host.numpy()
    for array, start in zip(arrays, offsets, strict=True):
        flat[start:start + array.size] = array.ravel()
    if into is None:
        sent = host.to(device, non_blocking=True)
    elif into.shape != host.shape:
        raise ValueError(f"into holds {into.numel()} values, the parts take {host.numel()} (their shapes changed)")
    else:
        sent = into.copy_(host, non_blocking=True)
    return [sent[start:start + array.size].view(array.shape) for array, start in zip(arrays, offsets, strict=True)]


class HostStaging:
    """Collects the lists of a step as it is planned (`add` returns a part's index), then `send` packs them all."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.parts: list[Values] = []

    def add(self, values: Values) -> int:
        self.parts.append(values)
        return len(self.parts) - 1

    def size(self) -> int:
        """The length of an `into` buffer for the parts added so far (alignment included)."""
        return _arrays(self.parts, torch.int64)[2]

    def send(self, into: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The device tensors, by the index `add` gave (views of `into` if given, see `pack`); they hold data once
        the stream reaches the copy."""
        return pack(self.parts, self.device, into=into)
