"""Per-forward KVBuffer metadata, decided on the device so it is the same in eager steps and CUDA-graph replays.

Each function reads the cursor (`KVBufferPools.lens`) for the batch's rows, writes what every GDN layer of this
forward needs into a `StepPlan`, and moves the cursor on at once (layers read the plan, never the cursor), the way
SGLang snapshots and advances its ReplaySSM cursor once per forward. Padded rows (mamba slot -1) get the scratch
buffer slot, kept empty, no checkpoint and no write. No function reads a value back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pools import KVBufferPools

Tensor = torch.Tensor


@dataclass
class StepPlan:
    buf_slots: Tensor  # [B] buffer slot per row (req-to-token slot; scratch for padding)
    buf_lens: Tensor  # [B] entries in the buffer when the step's tokens are appended
    read_slots: Tensor  # [B] checkpoint (SGLang state slot) per row, -1 for padding
    write_slots: Tensor  # [B] decode: the slot the fused flush writes, else -1; verify: the slot folded first
    fold_lens: Tensor  # [B] verify: entries folded before the block (0 where nothing is due); decode: unused


def _rows(pools: KVBufferPools, mamba_slots: Tensor, req_slots: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    valid = mamba_slots >= 0
    buf = torch.where(valid, req_slots.to(torch.int64), pools.scratch)
    read = torch.where(valid, mamba_slots.to(torch.int64), -1)
    return valid, buf, read, pools.lens[buf]


def plan_decode(pools: KVBufferPools, mamba_slots: Tensor, req_slots: Tensor, chunk_size: int,
                snapshot: Tensor | None = None) -> StepPlan:
    """One token per row: flush where the buffer reaches chunk_size, and where SGLang snapshots the row's state for
    its radix cache this step (`snapshot`, its mamba_track_mask: the track copy after the last GDN layer must see
    the whole state), then the cursor is 0 there and one more elsewhere."""
    valid, buf, read, lens = _rows(pools, mamba_slots, req_slots)
    due = lens + 1 >= chunk_size
    flush = valid & (due if snapshot is None else due | snapshot)
    pools.lens[buf] = torch.where(flush | ~valid, 0, lens + 1).to(torch.int32)  # padding rows: always empty
    pools.counts[0] += flush.sum()
    return StepPlan(buf, lens, read, torch.where(flush, read, -1), torch.zeros_like(lens))


def plan_verify(pools: KVBufferPools, mamba_slots: Tensor, req_slots: Tensor, chunk_size: int) -> StepPlan:
    """A block of draft tokens per row: rows whose buffer holds chunk_size entries or more fold it into their
    checkpoint first, so the block always fits (chunk_size + draft tokens <= buffer_size). The cursor is set to the
    entries kept before the block; the commit adds the accepted tokens."""
    valid, buf, read, lens = _rows(pools, mamba_slots, req_slots)
    fold = valid & (lens >= chunk_size)
    kept = torch.where(fold, 0, lens).to(torch.int32)
    pools.lens[buf] = kept
    pools.counts[0] += fold.sum()
    return StepPlan(buf, kept, read, torch.where(fold, read, -1), torch.where(fold, lens, 0).to(torch.int32))


def plan_prefill(pools: KVBufferPools, mamba_slots: Tensor, req_slots: Tensor) -> None:
    """SGLang's prefill writes the whole context into the checkpoint: the buffer of every row starts empty."""
    _, buf, _, _ = _rows(pools, mamba_slots, req_slots)
    pools.lens[buf] = 0


def commit(pools: KVBufferPools, plan: StepPlan, accepted: Tensor) -> None:
    """Keeps the first `accepted` [n] entries each of the first n rows appended in its verify step."""
    n = accepted.shape[0]
    pools.counts[1] += (accepted - 1).clamp(min=0).sum()
    keep = plan.read_slots[:n] >= 0
    pools.lens[plan.buf_slots[:n]] = torch.where(keep, plan.buf_lens[:n] + accepted.to(torch.int32), 0).to(
        torch.int32)


FIELDS = ("buf_slots", "buf_lens", "read_slots", "write_slots", "fold_lens")


def into(static: StepPlan, plan: StepPlan) -> StepPlan:
    """`plan` copied into the first rows of `static` (CUDA-graph buffers captured by address); views of them."""
    B = plan.buf_slots.shape[0]
    for name in FIELDS:
        getattr(static, name)[:B].copy_(getattr(plan, name))
    return head(static, B)


def head(static: StepPlan, rows: int) -> StepPlan:
    """Views of the first `rows` rows of `static`: the plan a replayed graph of that batch size writes there."""
    return StepPlan(*(getattr(static, name)[:rows] for name in FIELDS))


def static_plan(max_rows: int, device: torch.device | str) -> StepPlan:
    def column(dtype: torch.dtype) -> Tensor:
        return torch.zeros(max_rows, dtype=dtype, device=device)

    return StepPlan(column(torch.int64), column(torch.int32), column(torch.int64), column(torch.int64),
                    column(torch.int32))
