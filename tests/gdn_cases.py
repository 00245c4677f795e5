"""Random Gated DeltaNet inputs and pools for the kernel tests (fresh draws; the seed goes in messages)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch
from kvbuffer.kernels import BufferPool, new_state_pool


def fresh_generator() -> tuple[torch.Generator, int]:
    seed = secrets.randbits(31)
    return torch.Generator().manual_seed(seed), seed


@dataclass
class Shapes:
    H: int = 2
    HV: int = 4
    K: int = 16
    V: int = 32


@dataclass
class Layer:
    A_log: torch.Tensor
    dt_bias: torch.Tensor


def layer_params(gen: torch.Generator, shapes: Shapes, device: str = "cpu") -> Layer:
    A_log = torch.empty(shapes.HV).uniform_(1, 16, generator=gen).log()
    dt_bias = torch.randn(shapes.HV, generator=gen) * 0.5
    return Layer(A_log.to(device), dt_bias.to(device))


def tokens(gen: torch.Generator, n: int, shapes: Shapes, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """q, k, v, a, b for n tokens, of the magnitudes a model produces."""
    s = shapes
    q = torch.randn(n, s.H, s.K, generator=gen)
    k = torch.randn(n, s.H, s.K, generator=gen)
    v = torch.randn(n, s.HV, s.V, generator=gen)
    a = torch.randn(n, s.HV, generator=gen)
    b = torch.randn(n, s.HV, generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v, a, b))


def random_pools(gen: torch.Generator, shapes: Shapes, state_slots: int, buffer_slots: int, capacity: int,
                 key_dtype: torch.dtype = torch.float32, device: str = "cpu") -> tuple[torch.Tensor, BufferPool]:
    """Pools filled with random contents (decays cumulative and decreasing, as the kernels write them)."""
    s = shapes
    states = new_state_pool(state_slots, s.HV, s.K, s.V, device=device)
    states.copy_(torch.randn(states.shape, generator=gen) * 0.3)
    buffer = BufferPool.allocate(buffer_slots, capacity, s.H, s.HV, s.K, s.V, key_dtype=key_dtype, device=device)
    buffer.keys.copy_(torch.randn(buffer.keys.shape, generator=gen))
    buffer.values.copy_(torch.randn(buffer.values.shape, generator=gen))
    buffer.decay.copy_(-(torch.rand(buffer.decay.shape, generator=gen) * 0.3).cumsum(-1))
    return states, buffer


def as_fp64(states: torch.Tensor, buffer: BufferPool) -> tuple[torch.Tensor, BufferPool]:
    return states.double(), BufferPool(buffer.keys.double(), buffer.values.double(), buffer.decay.double())


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())
