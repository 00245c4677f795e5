"""Long prompts into checkpoints through fla-core's chunked Gated DeltaNet kernel.

fla-core fuses the same gating (A_log, dt_bias, sigmoid beta, q/k l2norm) and stores the state V-first,
which is our pool's layout, so the checkpoint pool is gathered and scattered with no transposes.
"""

from __future__ import annotations

import torch
from fla.ops.gated_delta_rule import chunk_gated_delta_rule

Tensor = torch.Tensor

def prefill_chunked(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
                    states: Tensor, cu_seqlens: Tensor, read_slots: Tensor, write_slots: Tensor,
                    scale: float | None = None) -> torch.Tensor:
    initial = states[read_slots.clamp(min=0).long()] * (read_slots >= 0).to(states.dtype)[:, None, None, None]
    out, final = chunk_gated_delta_rule(
        q[None], k[None], v[None], g=a[None], beta=b[None], scale=scale, initial_state=initial,
        output_final_state=True, use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True,
        A_log=A_log, dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True, state_v_first=True,
        cu_seqlens=cu_seqlens.long(),
    )
    states[write_slots.long()] = final.to(states.dtype)
    return out[0].to(q.dtype)
