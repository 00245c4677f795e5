"""Argument checks run before any launch, so a bad call fails with a ValueError naming the argument."""

from __future__ import annotations

import torch

from .pools import BufferPool

Tensor = torch.Tensor

_INDEX_DTYPES = (torch.int32, torch.int64)


def expect(name: str, t: torch.Tensor, shape: tuple[int | None, ...], device: torch.device,
           dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    """`t` has `shape` (None matches any size), lives on `device` and has one of `dtypes`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape, strict=True)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {want}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like q")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}, expected one of {[str(d) for d in dtypes]}")


def check_settings(buffer_size: int, chunk_size: int, speculative_num_draft_tokens: int = 0) -> None:
    """The buffer must hold a full chunk plus the draft tokens appended before a flush."""
    if buffer_size < 1:
        raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if speculative_num_draft_tokens < 0:
        raise ValueError(f"speculative_num_draft_tokens must be >= 0, got {speculative_num_draft_tokens}")
    if chunk_size + speculative_num_draft_tokens > buffer_size:
        raise ValueError(f"chunk_size + speculative_num_draft_tokens ({chunk_size} + "
                         f"{speculative_num_draft_tokens}) must be <= buffer_size ({buffer_size})")


def check_tokens(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor,
                 dt_bias: Tensor) -> tuple[int, int, int, int, int]:
    """q, k `[N, H, K]`, v `[N, HV, V]`, a, b `[N, HV]`, A_log, dt_bias `[HV]`; returns N, H, HV, K, V."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be a tensor [N, H, K], got {getattr(q, 'shape', type(q).__name__)}")
    N, H, K = q.shape
    dev = q.device
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    expect("k", k, (N, H, K), dev, floats)
    expect("v", v, (N, None, None), dev, floats)
    HV, V = v.shape[1], v.shape[2]
    if HV % H:
        raise ValueError(f"v has {HV} heads, which is not a multiple of the {H} heads of q and k")
    expect("a", a, (N, HV), dev, floats)
    expect("b", b, (N, HV), dev, floats)
    expect("A_log", A_log, (HV,), dev, floats)
    expect("dt_bias", dt_bias, (HV,), dev, floats)
    return N, H, HV, K, V


def check_states(states: torch.Tensor, HV: int, K: int, V: int, device: torch.device) -> None:
    expect("states", states, (None, HV, V, K), device, (torch.float32, torch.float64))


def check_buffer(buffer: BufferPool, H: int, HV: int, K: int, V: int, device: torch.device) -> None:
    if not isinstance(buffer, BufferPool):
        raise ValueError(f"buffer must be a BufferPool, got {type(buffer).__name__}")
    n, L = buffer.keys.shape[0], buffer.keys.shape[2] if buffer.keys.dim() == 4 else None
    expect("buffer.keys", buffer.keys, (None, H, None, K), device)
    expect("buffer.values", buffer.values, (n, HV, L, V), device, (torch.float32, torch.float64))
    expect("buffer.decay", buffer.decay, (n, HV, L), device, (torch.float32, torch.float64))


def check_slots(name: str, slots: torch.Tensor, n: int, device: torch.device, limit: int | None,
                allow_none: bool = False) -> None:
    """Index vector of length n; its values in [0, limit) (or -1 where allow_none) when limit is given.

    Checking values reads them back to the host, so hot paths that already know them pass limit=None.
    """
    expect(name, slots, (n,), device, _INDEX_DTYPES)
    if limit is None or n == 0:
        return
    lo, hi = int(slots.min()), int(slots.max())
    if lo < (-1 if allow_none else 0) or hi >= limit:
        allowed = f"-1 or 0..{limit - 1}" if allow_none else f"0..{limit - 1}"
        raise ValueError(f"{name} has values in [{lo}, {hi}], allowed {allowed}")


def check_room(buf_lens: torch.Tensor, adding: torch.Tensor | int, capacity: int) -> None:
    """Appending `adding` entries after buf_lens must stay within the buffer's capacity (reads values back)."""
    if buf_lens.numel() == 0:
        return
    need = int((buf_lens + adding).max())
    if need > capacity:
        raise ValueError(f"buf_lens: appending would hold {need} entries, more than the buffer capacity "
                         f"{capacity}; fold the buffer first or raise buffer_size")
    if int(buf_lens.min()) < 0:
        raise ValueError("buf_lens must be >= 0")
