"""The plugin's per-forward plans (service/sglang/plugin/plan.py) on random cursors: plain tensors, no SGLang needed."""

from __future__ import annotations

import torch
from kvbuffer.service.sglang.plugin.plan import plan_decode
from kvbuffer.service.sglang.plugin.pools import KVBufferPools

CAPACITY, CHUNK = 8, 6


def pools(requests: int) -> KVBufferPools:
    return KVBufferPools.allocate(1, requests, CAPACITY, num_k_heads=1, num_v_heads=2, head_k_dim=4, head_v_dim=4,
                                  key_dtype=torch.float32, device="cpu")


def test_decode_plans_keep_every_cursor_inside_the_buffer_with_padded_rows() -> None:
    """CUDA-graph batches are padded with rows of mamba slot -1, which all append to the scratch slot: over many
    steps no cursor may pass the buffer's capacity (the kernels store the new entry at the cursor, unmasked)."""
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    p = pools(requests=5)
    live = torch.randperm(5, generator=generator)[:3]
    p.lens[live] = torch.randint(0, CHUNK, (3,), generator=generator, dtype=torch.int32)
    mamba = torch.cat([live + 10, torch.full((4,), -1)])  # 3 requests, 4 padding rows
    rows = torch.cat([live, torch.zeros(4, dtype=torch.int64)])
    for step in range(4 * CAPACITY):
        plan = plan_decode(p, mamba, rows, CHUNK)
        assert int(plan.buf_lens.max()) < CAPACITY, f"step {step}: a row appends at {int(plan.buf_lens.max())}"
        assert (plan.write_slots[3:] == -1).all() and (plan.read_slots[3:] == -1).all()
    assert int(p.lens.max()) < CAPACITY
