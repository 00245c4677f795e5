"""The KVBuffer operations the model calls, one function each, validated and then dispatched.

Shapes (N tokens, B requests, H key heads, HV value heads, K and V head dims, L buffer capacity):
    q, k      `[N, H, K]`   raw projections (l2norm, the K**-0.5 scale and gating are fused in)
    v         `[N, HV, V]`
    a, b      `[N, HV]`     raw decay and write-strength inputs; A_log, dt_bias `[HV]`
    states    `[S, HV, V, K]` fp32 checkpoint pool (SGLang's layout)
    buffer    `BufferPool`  (keys `[slots, H, L, K]`, values `[slots, HV, L, V]`, decay `[slots, HV, L]`)
    buf_slots, buf_lens, read_slots, write_slots `[B]` int; a slot of -1 means none.
Outputs are `[N, HV, V]` in q's dtype.

`backend="auto"` runs the Triton kernels on CUDA tensors and the PyTorch reference elsewhere; tests pass
`backend="triton"` on CPU to run the kernels under TRITON_INTERPRET=1. `check_values=False` skips the checks
that read slot and length values back to the host (CUDA graphs, benchmarks, callers that know them).
`out`, if given, receives the outputs (`[N, HV, V]`, q's dtype) in place. `tuning` overrides the Triton
launchers' tiles and warps (benchmarks/bench_kernels.py `--tunings` sweeps them); the reference ignores it.
"""

from __future__ import annotations

from typing import Literal, TypedDict

import torch

from . import reference
from .pools import BufferPool
from .validate import check_buffer, check_room, check_slots, check_states, check_tokens, expect

Tensor = torch.Tensor

Backend = Literal["auto", "triton", "torch"]


class Tuning(TypedDict, total=False):
    """Launch parameters of the Triton kernels: value rows per program, buffer entries per product, warps."""

    block_v: int
    block_l: int
    num_warps: int


def _check_tuning(tuning: Tuning | None) -> Tuning:
    least = {"block_v": 1, "block_l": 16, "num_warps": 1}  # verify's tl.dot contracts over at least 16 entries
    for name, value in (tuning or {}).items():
        if name not in least:
            raise ValueError(f"tuning has no parameter {name!r} (it takes {', '.join(least)})")
        if not isinstance(value, int) or value < least[name] or value & (value - 1):
            raise ValueError(f"tuning[{name!r}] must be a power of two >= {least[name]}, got {value!r}")
    return tuning or {}


def _use_triton(backend: Backend, *tensors: Tensor) -> bool:
    """Triton for `auto` on CUDA; fp64 (the oracle's dtype) always runs the PyTorch reference."""
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    fp64 = any(t.dtype == torch.float64 for t in tensors)
    if backend == "triton" and fp64:
        raise ValueError("backend='triton' takes 16- and 32-bit tensors; run float64 on backend='torch'")
    return backend == "triton" or (backend == "auto" and tensors[0].device.type == "cuda" and not fp64)


def _into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    if out is None:
        return result
    return out.copy_(result)


def _check_out(out: torch.Tensor | None, v: torch.Tensor, q: torch.Tensor) -> None:
    if out is not None:
        expect("out", out, tuple(v.shape), q.device, (q.dtype,))
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")


def _check_buffered(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
                    states: Tensor, buffer: BufferPool, n_req: int, buf_slots: Tensor, buf_lens: Tensor,
                    read_slots: Tensor, check_values: bool, out: Tensor | None) -> int:
    N, H, HV, K, V = check_tokens(q, k, v, a, b, A_log, dt_bias)
    dev = q.device
    check_states(states, HV, K, V, dev)
    check_buffer(buffer, H, HV, K, V, dev)
    if not q.dtype == k.dtype == buffer.keys.dtype:  # the buffer keeps raw keys; key products need one dtype
        raise ValueError(f"k has dtype {k.dtype}, q {q.dtype} and buffer.keys {buffer.keys.dtype}: they must match "
                         "(allocate the BufferPool with key_dtype=k.dtype)")
    check_slots("buf_slots", buf_slots, n_req, dev, buffer.num_slots if check_values else None)
    check_slots("buf_lens", buf_lens, n_req, dev, None)
    check_slots("read_slots", read_slots, n_req, dev, states.shape[0] if check_values else None, allow_none=True)
    _check_out(out, v, q)
    return N


def buffered_decode(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
                    states: torch.Tensor, buffer: BufferPool, buf_slots: torch.Tensor, buf_lens: torch.Tensor,
                    read_slots: torch.Tensor, write_slots: torch.Tensor, scale: float | None = None,
                    backend: Backend = "auto", check_values: bool = True,
                    out: torch.Tensor | None = None, tuning: Tuning | None = None) -> torch.Tensor:
    """One new token for each of B requests, from checkpoint (read_slots) + buffer; the state is only read.

    o_n = e^{G_n} S0^T q_n + sum_{j<=n} e^{G_n-G_j} (q_n.k_j) d_j, with d_n the corrected value. Appends
    (k_n, d_n, G_n) at position buf_lens; where write_slots >= 0, also folds checkpoint + buffer + this
    token into states[write_slots] (the flush, one extra write in the same pass). The caller then sets
    buf_lens to 0 for flushed requests and adds 1 for the others.
    """
    B = q.shape[0] if isinstance(q, torch.Tensor) else 0
    _check_buffered(q, k, v, a, b, A_log, dt_bias, states, buffer, B, buf_slots, buf_lens, read_slots,
                    check_values, out)
    check_slots("write_slots", write_slots, B, q.device, states.shape[0] if check_values else None,
                allow_none=True)
    if check_values:
        check_room(buf_lens, 1, buffer.capacity)
    tuning = _check_tuning(tuning)
    if _use_triton(backend, q, states, buffer.values):
        from .step import buffered_decode_triton
        return buffered_decode_triton(q, k, v, a, b, A_log, dt_bias, states, buffer, buf_slots, buf_lens,
                                      read_slots, write_slots, scale, out=out, **tuning)
    return _into(out, reference.buffered_decode(q, k, v, a, b, A_log, dt_bias, states, buffer, buf_slots,
                                                buf_lens, read_slots, write_slots, scale))


def recurrent_decode(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
                     states: torch.Tensor, slots: torch.Tensor, scale: float | None = None, backend: Backend = "auto",
                     check_values: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """The baseline decode: one token per request, reading and writing its whole state every step."""
    B, _, HV, K, V = check_tokens(q, k, v, a, b, A_log, dt_bias)
    check_states(states, HV, K, V, q.device)
    check_slots("slots", slots, B, q.device, states.shape[0] if check_values else None)
    _check_out(out, v, q)
    if _use_triton(backend, q, states):
        from .step import recurrent_decode_triton
        return recurrent_decode_triton(q, k, v, a, b, A_log, dt_bias, states, slots, scale, out=out)
    return _into(out, reference.recurrent_decode(q, k, v, a, b, A_log, dt_bias, states, slots, scale))


def verify(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor, states: torch.Tensor,
           buffer: BufferPool, cu_seqlens: torch.Tensor, buf_slots: torch.Tensor, buf_lens: torch.Tensor,
           read_slots: torch.Tensor, scale: float | None = None, backend: Backend = "auto", check_values: bool = True,
           out: torch.Tensor | None = None, max_tokens: int | None = None,
           tuning: Tuning | None = None) -> torch.Tensor:
    """T_i tokens for each request at once (draft verification, or a short prompt into the buffer).

    Request i owns tokens cu_seqlens[i]:cu_seqlens[i+1]. Their entries are appended tentatively at
    buf_lens[i] + t; no state is written and no per-draft state is kept. Committing `accepted` tokens is
    `buf_lens += accepted`: rows depend only on earlier rows, so the kept prefix is exact. `max_tokens`, the
    most tokens any request has, spares reading cu_seqlens back (needed inside CUDA graphs).
    """
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must be a 1-D tensor [B + 1] of token offsets")
    n_req = cu_seqlens.numel() - 1
    N = _check_buffered(q, k, v, a, b, A_log, dt_bias, states, buffer, n_req, buf_slots, buf_lens,
                        read_slots, check_values, out)
    expect("cu_seqlens", cu_seqlens, (n_req + 1,), q.device, (torch.int32, torch.int64))
    if check_values:
        counts = cu_seqlens[1:] - cu_seqlens[:-1]
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != N or (n_req and int(counts.min()) < 0):
            raise ValueError(f"cu_seqlens must rise from 0 to the number of tokens ({N})")
        check_room(buf_lens, counts, buffer.capacity)
        if max_tokens is not None and n_req and int(counts.max()) > max_tokens:
            raise ValueError(f"max_tokens ({max_tokens}) is less than a request's token count ({int(counts.max())})")
    tuning = _check_tuning(tuning)
    if _use_triton(backend, q, states, buffer.values):
        from .step import verify_triton
        return verify_triton(q, k, v, a, b, A_log, dt_bias, states, buffer, cu_seqlens, buf_slots, buf_lens,
                             read_slots, scale, out=out, max_tokens=max_tokens, **tuning)
    return _into(out, reference.verify(q, k, v, a, b, A_log, dt_bias, states, buffer, cu_seqlens, buf_slots,
                                       buf_lens, read_slots, scale))


def fold(states: torch.Tensor, buffer: BufferPool, buf_slots: torch.Tensor, buf_lens: torch.Tensor,
         read_slots: torch.Tensor, write_slots: torch.Tensor, backend: Backend = "auto",
         check_values: bool = True) -> None:
    """Flushes buffers into checkpoints on demand: states[write] = e^{G_last} S0 + sum_j e^{G_last-G_j} k_j d_j^T.

    S0 is states[read] (zeros where read is -1: a request leaving the stateless regime). A write slot of -1
    leaves that request alone (a batch where only some buffers are due, decided on the device). The caller then
    sets buf_lens to 0 for the folded requests.
    """
    if not isinstance(states, torch.Tensor) or states.dim() != 4:
        raise ValueError("states must be a tensor [slots, HV, V, K]")
    _, HV, V, K = states.shape
    if not isinstance(buffer, BufferPool):
        raise ValueError(f"buffer must be a BufferPool, got {type(buffer).__name__}")
    H = buffer.keys.shape[1]
    dev = states.device
    check_states(states, HV, K, V, dev)
    check_buffer(buffer, H, HV, K, V, dev)
    B = buf_slots.shape[0] if isinstance(buf_slots, torch.Tensor) else -1
    check_slots("buf_slots", buf_slots, B, dev, buffer.num_slots if check_values else None)
    check_slots("buf_lens", buf_lens, B, dev, buffer.capacity + 1 if check_values else None)
    check_slots("read_slots", read_slots, B, dev, states.shape[0] if check_values else None, allow_none=True)
    check_slots("write_slots", write_slots, B, dev, states.shape[0] if check_values else None, allow_none=True)
    if _use_triton(backend, states, buffer.values):
        from .fold import fold_triton
        return fold_triton(states, buffer, buf_slots, buf_lens, read_slots, write_slots)
    return reference.fold(states, buffer, buf_slots, buf_lens, read_slots, write_slots)


def prefill(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor, states: torch.Tensor,
            cu_seqlens: torch.Tensor, read_slots: torch.Tensor, write_slots: torch.Tensor, scale: float | None = None,
            backend: Backend = "auto", check_values: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """Long prompts straight into checkpoints (fla-core's chunked kernel on CUDA).

    Starts each request from states[read_slots] (zeros where -1) and writes its final state to
    states[write_slots].
    """
    _, _, HV, K, V = check_tokens(q, k, v, a, b, A_log, dt_bias)
    dev = q.device
    check_states(states, HV, K, V, dev)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must be a 1-D tensor [B + 1] of token offsets")
    n_req = cu_seqlens.numel() - 1
    expect("cu_seqlens", cu_seqlens, (n_req + 1,), dev, (torch.int32, torch.int64))
    check_slots("read_slots", read_slots, n_req, dev, states.shape[0] if check_values else None, allow_none=True)
    check_slots("write_slots", write_slots, n_req, dev, states.shape[0] if check_values else None)
    _check_out(out, v, q)
    if _use_triton(backend, q, states):
        from .prefill import prefill_chunked
        return _into(out, prefill_chunked(q, k, v, a, b, A_log, dt_bias, states, cu_seqlens, read_slots,
                                          write_slots, scale))
    return _into(out, reference.prefill(q, k, v, a, b, A_log, dt_bias, states, cu_seqlens, read_slots,
                                        write_slots, scale))
