"""Launch configurations of the KVBuffer kernels (tiles, warps, pipelining), one per GPU model.

The kernels are memory-bound: their speed is the bytes each SM keeps in flight, which depends on the tile a
program holds, the warps that hold it and the registers that leaves for other programs. A wider memory system
wants more in flight, so the fastest choice differs between cards; each entry of `LAUNCHES` is the fastest of a
`benchmarks/bench_kernels.py --tunings` sweep on that card (docs/BENCHMARKS.md). `launch_for` picks the entry
of the GPU a call runs on; `use_launch` overrides it for a block of code (benchmark sweeps, tests).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeLaunch:
    """How a decode step of up to `max_requests` requests launches.

    `rows` value rows of one value head per apply program, on `warps` warps. `inline`: each apply program weighs
    the buffer itself (one launch; the weighing is repeated per value tile, which pays only where launch latency
    dominates); otherwise a scores launch weighs it once per (request, value head) first, and `programmatic` lets
    the apply launch start while the scores launch runs (Hopper's programmatic dependent launch: the apply
    streams its checkpoint tile before it waits for the weights)."""

    max_requests: int
    rows: int
    warps: int
    inline: bool = False
    programmatic: bool = False


@dataclass(frozen=True)
class Launch:
    """Every launch choice of the KVBuffer kernels on one GPU model.

    decode: by batch size, ascending `max_requests` (the last entry serves any larger batch).
    decode_scores_warps: warps of the decode scores launch; decode_scores_heads: value heads per scores program
    (a power of two; up to the value heads that share a key head, which then share its loads and products).
    flush_stages: buffer entries a fold (the decode's fused flush, the on-demand fold) loads ahead.
    recurrent: (value rows, warps) of the recurrent baseline.
    verify: (value rows, warps) of the block apply; verify_scores_warps of its scores launch;
    verify_k_chunk, verify_stages: the block apply streams its checkpoint in key chunks this wide, pipelined this
    deep; verify_programmatic: the block apply overlaps its scores launch.
    """

    decode: tuple[DecodeLaunch, ...]
    decode_scores_warps: int = 2
    decode_scores_heads: int = 1
    flush_stages: int = 3
    recurrent: tuple[int, int] = (8, 1)
    verify: tuple[int, int] = (128, 4)
    verify_scores_warps: int = 1
    verify_k_chunk: int = 32
    verify_stages: int = 3
    verify_programmatic: bool = True

    def decode_for(self, requests: int) -> DecodeLaunch:
        return next((d for d in self.decode if requests <= d.max_requests), self.decode[-1])


ANY_BATCH = sys.maxsize
H100 = Launch(decode=(DecodeLaunch(4, 16, 2, inline=True), DecodeLaunch(ANY_BATCH, 8, 1)))
# The H200 sweep (docs/BENCHMARKS.md): two value heads per scores program; 32-row tiles overlapping the scores
# launch where the batch is small (B = 5-8, launch latency) or large (B > 64: more bytes in flight per SM), 8-row
# tiles between; flushes load 16 entries ahead.
H200 = Launch(decode=(DecodeLaunch(4, 16, 2, inline=True), DecodeLaunch(8, 32, 1, programmatic=True),
                      DecodeLaunch(64, 8, 1), DecodeLaunch(ANY_BATCH, 32, 1, programmatic=True)),
              decode_scores_heads=2, flush_stages=16)
# by a substring of torch.cuda.get_device_name; any other device (CPU, the interpreter, other GPUs): DEFAULT
LAUNCHES: dict[str, Launch] = {
    "H100": H100,
    "H200": H200,
}
DEFAULT = H100

_override: list[Launch] = []


@functools.cache
def _gpu_launch(index: int) -> Launch:
    name = torch.cuda.get_device_name(index)
    return next((launch for key, launch in LAUNCHES.items() if key in name), DEFAULT)


def launch_for(device: torch.device) -> Launch:
    """The launch configuration for kernels running on `device` (`use_launch`'s, inside one)."""
    if _override:
        return _override[-1]
    if device.type != "cuda":
        return DEFAULT
    return _gpu_launch(torch.cuda.current_device() if device.index is None else device.index)


@contextlib.contextmanager
def use_launch(launch: Launch) -> Iterator[Launch]:
    """Every launch inside the block uses `launch`, on any device (benchmark sweeps, tests)."""
    _override.append(launch)
    try:
        yield launch
    finally:
        _override.pop()
