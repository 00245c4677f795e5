"""The plugin's per-forward plans (service/sglang/plugin/plan.py) on random cursors: plain tensors, no SGLang needed."""

from __future__ import annotations

import torch
from kvbuffer.service.sglang.plugin import dispatch
from kvbuffer.service.sglang.plugin.plan import plan_decode, plan_verify
from kvbuffer.service.sglang.plugin.pools import KVBufferPools
from kvbuffer.service.sglang.plugin.runtime import Runtime
from kvbuffer.service.sglang.plugin.settings import PluginSettings
from torch._subclasses.fake_tensor import FakeTensorMode

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


def test_rows_sglang_snapshots_flush_their_whole_buffer() -> None:
    """Where SGLang's radix cache snapshots a row's state this step (its mamba_track_mask, extra_buffer strategy), the
    plan flushes that row (checkpoint slot written, cursor back to 0) whatever its cursor; padded rows, whose mask
    entries a CUDA-graph replay leaves stale, never flush."""
    generator = torch.Generator().manual_seed(torch.seed() % 2**31)
    p = pools(requests=6)
    lens = torch.randint(0, CHUNK - 1, (6,), generator=generator, dtype=torch.int32)  # none due by its cursor
    p.lens[:6] = lens
    snapshot = torch.rand(8, generator=generator) < 0.5
    snapshot[6:] = True
    mamba = torch.cat([torch.arange(6) + 10, torch.full((2,), -1)])
    rows = torch.cat([torch.arange(6), torch.zeros(2, dtype=torch.int64)])
    plan = plan_decode(p, mamba, rows, CHUNK, snapshot)
    assert torch.equal(plan.write_slots, torch.cat([torch.where(snapshot[:6], mamba[:6], -1), torch.full((2,), -1)]))
    assert torch.equal(plan.buf_lens[:6], lens)
    assert torch.equal(p.lens[:6], torch.where(snapshot[:6], 0, lens + 1).to(torch.int32))
    assert p.lens[p.scratch] == 0


def test_plans_and_the_commit_read_nothing_back_to_the_host() -> None:
    """The Python the plugin runs on every decode and verify step outside a graph (the plans of eager steps, the
    commit after every verify) must not wait for the device: on CUDA a device value read on the host (.item(), a
    data-dependent shape such as nonzero's) stalls the scheduler until the step's kernels finish. FakeTensorMode
    stands in for the device: it holds shapes and no values, so any such read raises."""
    rows, drafts, width = int(torch.randint(1, 6, ())), 3, 4
    with FakeTensorMode():
        p = pools(requests=8)
        mamba, req = torch.arange(rows) + 2, torch.arange(rows)
        plan_decode(p, mamba, req, CHUNK, torch.zeros(rows, dtype=torch.bool))
        plan = plan_verify(p, mamba, req, CHUNK)
        rt = Runtime(PluginSettings(buffer_size=CAPACITY, chunk_size=2, speculative_num_draft_tokens=drafts), p, {0: 0},
                     None, plan)
        conv = [torch.zeros(1, 12, 16, width - 1)]
        windows = [torch.zeros(1, 9, drafts, 16, width - 1)]
        dispatch.commit(rt, torch.zeros(rows, dtype=torch.int64), conv, windows)
