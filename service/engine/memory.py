"""The memory manager: owns every per-request pool, sized once at start from `memory_budget_bytes`.

Per GDN layer: a checkpoint pool `[state slots, HV, V, K]` fp32, a BufferPool and conv states (both indexed
by request slot). Per full-attention layer: a paged KV cache of `block_size`-token blocks. A running request
holds one request slot, the KV blocks its context covers, and a checkpoint slot only once its context
outgrows the buffer (or always, with decode_mode=recurrent). Nothing grows after start.

With CUDA graphs on (cuda_graph_max_batch > 0) each pool also has scratch entries that no request ever holds: the
padding rows of a padded decode step (cuda_graphs.py) read and write there only. They are paid for from the same
budget.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from kvbuffer.kernels import BufferPool, new_state_pool

from ..model import ModelConfig, Qwen3NextForCausalLM
from .config import EngineConfig
from .kvstate import GdnStep, buf_len_after, plan_step
from .sequence import Sequence

BLOCK_SIZE = 16


@dataclass(frozen=True)
class Scratch:
    """The entries padding rows use, past those requests hold: a request slot (its buffer and conv states), a KV
    block, and a checkpoint slot with decode_mode=recurrent, whose decode reads and writes one; -1 with kvbuffer,
    whose padding reads no checkpoint and flushes none."""

    request_slot: int
    state_slot: int
    kv_block: int


@dataclass(frozen=True)
class MemoryPlan:
    """Pool sizes (the entries requests may hold) and what one entry of each costs, over all layers."""

    request_slots: int
    state_slots: int
    kv_blocks: int
    block_size: int
    request_slot_bytes: int  # buffers + conv states
    state_slot_bytes: int  # checkpoints
    kv_block_bytes: int
    scratch: Scratch | None = None  # with CUDA graphs on: one more entry in the pools, for padding rows

    @property
    def allocated(self) -> tuple[int, int, int]:
        """Request slots, checkpoint slots and KV blocks allocated: those requests hold, then the scratch ones."""
        if self.scratch is None:
            return self.request_slots, self.state_slots, self.kv_blocks
        return self.request_slots + 1, self.state_slots + int(self.scratch.state_slot >= 0), self.kv_blocks + 1

    @property
    def total_bytes(self) -> int:
        requests, states, blocks = self.allocated
        return requests * self.request_slot_bytes + states * self.state_slot_bytes + blocks * self.kv_block_bytes


def buffer_bytes(cfg: ModelConfig, ec: EngineConfig, dtype: torch.dtype) -> int:
    """One request's buffer in one GDN layer: buffer_size entries of a key `[H, K]` in dtype, a corrected value
    `[HV, V]` in fp32 and a cumulative decay `[HV]` in fp64 (none with decode_mode=recurrent): BufferPool's."""
    if ec.decode_mode == "recurrent":
        return 0
    H, HV, K, V = (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                   cfg.linear_value_head_dim)
    return ec.buffer_size * (H * K * dtype.itemsize + HV * V * 4 + HV * 8)


def conv_state_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """One request's conv state in one GDN layer: its last kernel - 1 conv inputs."""
    return (cfg.linear_conv_kernel_dim - 1) * cfg.conv_dim * dtype.itemsize


def state_bytes(cfg: ModelConfig) -> int:
    """One checkpoint in one GDN layer: `[HV, V, K]` fp32."""
    return cfg.linear_num_value_heads * cfg.linear_value_head_dim * cfg.linear_key_head_dim * 4


def kv_block_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """One KV-cache block of one full-attention layer: keys and values of BLOCK_SIZE tokens."""
    return 2 * BLOCK_SIZE * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize


def slot_bytes(cfg: ModelConfig, ec: EngineConfig, dtype: torch.dtype) -> tuple[int, int, int]:
    """Bytes of one request slot (buffers + conv states), one checkpoint slot and one KV block, summed over
    layers."""
    n_gdn, n_attn = len(cfg.linear_layers), len(cfg.attention_layers)
    return (n_gdn * (buffer_bytes(cfg, ec, dtype) + conv_state_bytes(cfg, dtype)), n_gdn * state_bytes(cfg),
            n_attn * kv_block_bytes(cfg, dtype))


def plan_memory(cfg: ModelConfig, ec: EngineConfig, dtype: torch.dtype) -> MemoryPlan:
    """Sizes the pools from the budget.

    With CUDA graphs on, the scratch entries of padding rows come out of the budget first. Then the KV cache
    gets room for one request of max_context_length (so any single request can always run). Every request slot
    comes with a checkpoint slot, so admitted requests never wait on checkpoints; the number of request slots is
    what the rest of the budget affords, capped at max_running_requests. The KV cache takes the remainder,
    capped at what the request slots could ever use.
    """
    req, state, block = slot_bytes(cfg, ec, dtype)
    graphs = ec.cuda_graph_max_batch > 0
    scratch_state = graphs and ec.decode_mode == "recurrent"
    reserved = (req + block if graphs else 0) + (state if scratch_state else 0)
    budget = ec.memory_budget_bytes - reserved
    blocks_per_request = math.ceil(ec.max_context_length / BLOCK_SIZE)
    left = budget - blocks_per_request * block
    slots = min(ec.max_running_requests, left // (req + state)) if left > 0 else 0
    if slots < 1:
        need = reserved + blocks_per_request * block + req + state
        raise ValueError(f"memory_budget_bytes ({ec.memory_budget_bytes}) is too small: one request of "
                         f"max_context_length {ec.max_context_length} needs {need} bytes"
                         + (" (with the scratch entries of cuda_graph_max_batch)" if graphs else ""))
    blocks = blocks_per_request
    if block:
        blocks = min(blocks_per_request * slots, (budget - slots * (req + state)) // block)
    scratch = Scratch(slots, slots if scratch_state else -1, blocks) if graphs else None
    return MemoryPlan(slots, slots, blocks, BLOCK_SIZE, req, state, block, scratch)


class MemoryManager:
    """Allocates pools, binds them to the model's layers, and hands slots and blocks to requests."""

    def __init__(self, model: Qwen3NextForCausalLM, ec: EngineConfig, plan: MemoryPlan,
                 device: torch.device, dtype: torch.dtype) -> None:
        cfg = model.config
        self.config, self.plan = ec, plan
        request_slots, state_slots, kv_blocks = plan.allocated
        for layer in model.gdn_layers():
            layer.states = new_state_pool(state_slots, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
                                          cfg.linear_value_head_dim, device=device)
            layer.buffer = None if ec.decode_mode == "recurrent" else BufferPool.allocate(
                request_slots, ec.buffer_size, cfg.linear_num_key_heads, cfg.linear_num_value_heads,
                cfg.linear_key_head_dim, cfg.linear_value_head_dim, key_dtype=dtype, device=device)
            layer.conv_state = torch.zeros(request_slots, cfg.linear_conv_kernel_dim - 1, cfg.conv_dim,
                                           device=device, dtype=dtype)
        rows = kv_blocks * plan.block_size
        for layer in model.attention_layers():
            layer.k_cache = torch.zeros(rows, cfg.num_key_value_heads, cfg.head_dim, device=device, dtype=dtype)
            layer.v_cache = torch.zeros_like(layer.k_cache)
        self._gdn_layers = model.gdn_layers()
        # each request slot's block table, mirrored from its Sequence for the planner's vectorized gathers; entries
        # past a request's blocks are stale (masked by attention: keys past each query's position)
        self.block_tables = np.zeros((request_slots, math.ceil(ec.max_context_length / plan.block_size)), np.int64)
        if plan.scratch is not None:
            self.block_tables[plan.scratch.request_slot, 0] = plan.scratch.kv_block
        self.free_request_slots = deque(range(plan.request_slots))
        self.free_state_slots = deque(range(plan.state_slots))
        self.free_blocks = deque(range(plan.kv_blocks))

    def plan_step(self, seq: Sequence, n: int) -> GdnStep:
        ec = self.config
        return plan_step(ec.decode_mode, seq.state_slot >= 0, seq.buf_len, n, ec.buffer_size, ec.chunk_size)

    def try_reserve(self, seq: Sequence, n: int) -> GdnStep | None:
        """Everything `seq` needs to process n more tokens (request slot, blocks, checkpoint), or None."""
        step = self.plan_step(seq, n)
        blocks = math.ceil((seq.num_computed + n) / self.plan.block_size) - len(seq.block_table)
        if (seq.req_slot < 0 and not self.free_request_slots) or blocks > len(self.free_blocks) or (
                step.takes_slot and not self.free_state_slots):
            return None
        if seq.req_slot < 0:
            seq.req_slot = self.free_request_slots.popleft()
            for layer in self._gdn_layers:
                layer.conv_state[seq.req_slot].zero_()
        if blocks > 0:
            held = len(seq.block_table)
            seq.block_table.extend(self.free_blocks.popleft() for _ in range(blocks))
            self.block_tables[seq.req_slot, held:held + blocks] = seq.block_table[held:]
        if step.takes_slot:
            seq.state_slot = self.free_state_slots.popleft()
        return step

    def commit(self, seq: Sequence, step: GdnStep, accepted: int) -> None:
        """After a step: `accepted` tokens are in the caches; blocks past them (rejected drafts) go back."""
        seq.buf_len = buf_len_after(step, seq.buf_len, accepted)
        seq.num_computed += accepted
        keep = math.ceil(seq.num_computed / self.plan.block_size)
        while len(seq.block_table) > keep:
            self.free_blocks.append(seq.block_table.pop())

    def free(self, seq: Sequence) -> None:
        """Returns every slot and block of `seq` at once; it restarts from scratch if it runs again."""
        if seq.req_slot >= 0:
            self.free_request_slots.append(seq.req_slot)
        if seq.state_slot >= 0:
            self.free_state_slots.append(seq.state_slot)
        self.free_blocks.extend(seq.block_table)
        seq.req_slot, seq.state_slot, seq.buf_len, seq.num_computed = -1, -1, 0, 0
        seq.block_table = []

    @property
    def state_slots_used(self) -> int:
        return self.plan.state_slots - len(self.free_state_slots)

    @property
    def request_slots_used(self) -> int:
        return self.plan.request_slots - len(self.free_request_slots)
