"""Gated DeltaNet layer: projections, causal conv, and the KVBuffer operations from `kvbuffer.kernels.ops`.

The layer owns no request state: its conv states, checkpoint pool and buffer pool are bound by the model
runner, and the `GdnBatch` of each step says which requests fold, decode, verify or prefill.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from kvbuffer.kernels import BufferPool, ops
from torch import nn

from .batch import GdnBatch
from .config import ModelConfig
from .norm import GatedRMSNorm


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.H, self.HV = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.K, self.V = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.kernel = cfg.linear_conv_kernel_dim
        conv_dim = cfg.conv_dim
        self.in_proj_qkvz = nn.Linear(cfg.hidden_size, 2 * self.H * self.K + 2 * self.HV * self.V, bias=False)
        self.in_proj_ba = nn.Linear(cfg.hidden_size, 2 * self.HV, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, self.kernel, groups=conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.HV))
        self.A_log = nn.Parameter(torch.zeros(self.HV))
        self.norm = GatedRMSNorm(self.V, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.HV * self.V, cfg.hidden_size, bias=False)
        self.conv_state = torch.empty(0)  # [request slots, kernel-1, conv_dim], bound by the model runner
        self.states = torch.empty(0)  # [state slots, HV, V, K] fp32 checkpoints
        self.buffer: BufferPool | None = None

    def split_projections(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k `[N, H*K]`, v, z `[N, HV*V]`, b, a `[N, HV]` from the checkpoint's per-key-head grouped layout."""
        N, g = x.shape[0], self.HV // self.H
        qkvz = self.in_proj_qkvz(x).view(N, self.H, 2 * self.K + 2 * g * self.V)
        q, k, v, z = torch.split(qkvz, [self.K, self.K, g * self.V, g * self.V], dim=-1)
        b, a = torch.split(self.in_proj_ba(x).view(N, self.H, 2 * g), [g, g], dim=-1)
        return (q.reshape(N, -1), k.reshape(N, -1), v.reshape(N, -1), z.reshape(N, -1),
                b.reshape(N, self.HV), a.reshape(N, self.HV))

    def conv(self, mixed: torch.Tensor, gdn: GdnBatch) -> torch.Tensor:
        """Depthwise causal conv + silu over each request's previous kernel-1 inputs and its new tokens.

        Inputs are laid out per request as [old conv state | new tokens] in one buffer, so every token's window
        is `kernel` consecutive rows. The new conv state (all tokens kept) is written back; the buffer is kept
        for `rollback_conv` when the step is speculative.
        """
        kk, C = self.kernel - 1, mixed.shape[1]
        inputs = mixed.new_empty(mixed.shape[0] + gdn.conv_slots.shape[0] * kk, C)
        inputs[gdn.conv_state_rows] = self.conv_state[gdn.conv_slots].reshape(-1, C).to(mixed.dtype)
        inputs[gdn.conv_token_rows] = mixed
        weight = self.conv1d.weight[:, 0, :].T  # [kernel, C]
        out = F.silu((inputs[gdn.conv_windows] * weight).sum(1))
        self.conv_state[gdn.conv_slots] = inputs[gdn.conv_last_rows].view(-1, kk, C).to(self.conv_state.dtype)
        if gdn.keep_conv_inputs:
            gdn.conv_inputs[self.layer_idx] = inputs
        return out

    def rollback_conv(self, gdn: GdnBatch, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Conv states of `slots` set to the kernel-1 inputs ending at their last accepted token (`rows`)."""
        inputs = gdn.conv_inputs[self.layer_idx]
        self.conv_state[slots] = inputs[rows].view(slots.shape[0], -1, inputs.shape[1]).to(self.conv_state.dtype)

    def forward(self, x: torch.Tensor, gdn: GdnBatch) -> torch.Tensor:
        N = x.shape[0]
        q, k, v, z, b, a = self.split_projections(x)
        q, k, v = torch.split(self.conv(torch.cat((q, k, v), dim=-1), gdn),
                              [self.H * self.K, self.H * self.K, self.HV * self.V], dim=-1)
        q, k, v = q.reshape(N, self.H, self.K), k.reshape(N, self.H, self.K), v.reshape(N, self.HV, self.V)
        o = self.core(q, k, v, a, b, gdn)
        o = self.norm(o.reshape(-1, self.V), z.reshape(-1, self.V)).reshape(N, -1)
        return self.out_proj(o)

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
             gdn: GdnBatch) -> torch.Tensor:
        """The recurrence through KVBuffer: folds first, then each call on its token range, writing its rows of
        the output in place (no copy, and no output allocation of its own on the Triton path)."""
        o = torch.empty_like(v)
        gate = (self.A_log, self.dt_bias)
        check = v.device.type != "cuda"  # the value checks read slots back to the host: a sync per call on GPU
        if (f := gdn.fold) is not None:
            ops.fold(self.states, self.buffer, f.buf_slots, f.buf_lens, f.read_slots, f.write_slots,
                     check_values=check)
        if (d := gdn.decode) is not None:
            t = slice(d.start, d.end)
            if self.buffer is None:
                ops.recurrent_decode(q[t], k[t], v[t], a[t], b[t], *gate, self.states, d.read_slots,
                                     check_values=check, out=o[t])
            else:
                ops.buffered_decode(q[t], k[t], v[t], a[t], b[t], *gate, self.states, self.buffer, d.buf_slots,
                                    d.buf_lens, d.read_slots, d.write_slots, check_values=check, out=o[t])
        if (w := gdn.verify) is not None:
            t = slice(w.start, w.end)
            ops.verify(q[t], k[t], v[t], a[t], b[t], *gate, self.states, self.buffer, w.cu_seqlens, w.buf_slots,
                       w.buf_lens, w.read_slots, check_values=check, max_tokens=w.max_tokens, out=o[t])
        if (p := gdn.prefill) is not None:
            t = slice(p.start, p.end)
            ops.prefill(q[t], k[t], v[t], a[t], b[t], *gate, self.states, p.cu_seqlens, p.read_slots,
                        p.write_slots, check_values=check, out=o[t])
        return o
