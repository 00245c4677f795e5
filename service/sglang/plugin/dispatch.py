"""The GDN kernel calls the plugin takes over: SGLang's `GDNKernelDispatcher` decode and target-verify entry points,
called by SGLang's own `GDNAttnBackend` after its causal conv, split and reshape (which stay SGLang's).

    decode / packed_decode  -> kvbuffer.kernels.buffered_decode: the checkpoint (SGLang's state slot) is read,
                               the token appended to the buffer, the fused flush writes the slot when due
    target_verify           -> kvbuffer.kernels.fold (rows due) + kvbuffer.kernels.verify: the draft block is
                               appended to the buffer, no state written, no per-draft state kept
    commit                  -> cursor += accepted (plan.commit) and the conv state rolled to the last accepted
                               step from SGLang's per-draft conv windows (what SGLang's own commit does for conv)

Shapes as SGLang passes them: q, k `[1, N, H, K]`, v `[1, N, HV, V]` (or packed `mixed_qkv [N, 2HK + HV V]`),
a, b `[N, HV]`, states `[slots, HV, V, K]` fp32; outputs `[1, N, HV, V]`.
"""

from __future__ import annotations

import torch
from kvbuffer.kernels.ops import buffered_decode, fold, verify  # not the package: its `fold` is shadowed once

# the kvbuffer.kernels.fold module is imported
from . import plan as planning
from .runtime import Runtime

Tensor = torch.Tensor

# "auto": Triton on CUDA, the PyTorch reference elsewhere; CPU tests set "triton" (TRITON_INTERPRET=1)
KERNEL_BACKEND = "auto"


def _flat(x: Tensor, *inner: int) -> Tensor:
    return x.reshape(-1, *inner)


def decode(rt: Runtime, q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
           states: Tensor) -> Tensor:
    """One token per row from the running layer's checkpoint + buffer."""
    H, K = q.shape[-2:]
    HV, V = v.shape[-2:]
    plan = rt.current_plan()
    q, k, v = _flat(q, H, K), _flat(k, H, K), _flat(v, HV, V)
    out = torch.empty(1, q.shape[0], HV, V, dtype=q.dtype, device=q.device)
    buffered_decode(q, k, v, _flat(a, HV), _flat(b, HV), A_log, dt_bias, states, rt.pools.buffers[rt.layer],
                    plan.buf_slots, plan.buf_lens, plan.read_slots, plan.write_slots, scale=K ** -0.5,
                    backend=KERNEL_BACKEND, check_values=False, out=out[0])
    return out


def packed_decode(rt: Runtime, mixed_qkv: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
                  states: Tensor, num_v_heads: int, head_v_dim: int) -> Tensor:
    """`decode` from SGLang's packed projection `[q | k | v]` (its fast path on CUDA)."""
    K = states.shape[-1]
    N = mixed_qkv.shape[0]
    H = (mixed_qkv.shape[1] - num_v_heads * head_v_dim) // (2 * K)
    q, k, v = torch.split(mixed_qkv, [H * K, H * K, num_v_heads * head_v_dim], dim=-1)
    return decode(rt, q.reshape(N, H, K), k.reshape(N, H, K), v.reshape(N, num_v_heads, head_v_dim), a, b, A_log,
                  dt_bias, states)


def target_verify(rt: Runtime, q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor,
                  dt_bias: Tensor, states: Tensor, query_start_loc: Tensor, draft_tokens: int) -> Tensor:
    """A chain of `draft_tokens` tokens per row, verified in parallel against checkpoint + buffer."""
    H, K = q.shape[-2:]
    HV, V = v.shape[-2:]
    plan = rt.current_plan()
    buffer = rt.pools.buffers[rt.layer]
    fold(states, buffer, plan.buf_slots, plan.fold_lens, plan.read_slots, plan.write_slots, backend=KERNEL_BACKEND,
         check_values=False)
    q, k, v = _flat(q, H, K), _flat(k, H, K), _flat(v, HV, V)
    out = torch.empty(1, q.shape[0], HV, V, dtype=q.dtype, device=q.device)
    verify(q, k, v, _flat(a, HV), _flat(b, HV), A_log, dt_bias, states, buffer, query_start_loc, plan.buf_slots,
           plan.buf_lens, plan.read_slots, scale=K ** -0.5, backend=KERNEL_BACKEND, check_values=False,
           out=out[0], max_tokens=draft_tokens)
    return out


def commit(rt: Runtime, last_correct_step: Tensor, conv: list[Tensor], conv_windows: list[Tensor]) -> None:
    """After a verify: keep each row's accepted prefix (last_correct_step + 1 tokens) and roll its conv state to the
    window SGLang's verify conv stored for that step (row i's windows live in scratch row i). Masked, not selected:
    selecting the rows would read their count back to the host, a sync on every verify step; a row not rolled
    (slot -1 indexes SGLang's padding slot, the pool's last) writes back what it holds."""
    plan = rt.current_plan()
    n = last_correct_step.shape[0]
    planning.commit(rt.pools, plan, last_correct_step + 1)
    slots = plan.read_slots[:n]
    rolled = (last_correct_step >= 0) & (slots >= 0)
    rows = torch.arange(n, device=slots.device)
    steps = last_correct_step.clamp(min=0).long()
    for state, windows in zip(conv, conv_windows, strict=True):
        mask = rolled.view(1, n, *(1,) * (state.dim() - 2))
        state[:, slots] = torch.where(mask, windows[:, rows, steps].to(state.dtype), state[:, slots])
