"""Executes a scheduled step: builds the flat token batch and its cache addresses, runs the model, returns logits.

Requests are ordered by GDN operation (decode, verify, prefill) so each KVBuffer call covers one contiguous
token range. Speculative steps keep the conv inputs so `rollback` can rewind conv states to what was accepted.
Every index tensor of a step is computed on the host with numpy over per-request arrays (`StepArrays`; a Python
loop per request costs milliseconds at batch 256) and reaches the device in one `HostStaging` copy that the host
does not wait for (see staging.py). Steps where every request decodes one token go to `graphs`
when it is set (cuda_graphs.py: padded to a fixed shape, replayed from a CUDA graph on a GPU).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from itertools import accumulate
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..model import Qwen3NextForCausalLM
from ..model.batch import AttentionGroup, DecodeCall, FoldCall, ForwardBatch, GdnBatch, PrefillCall, VerifyCall
from .scheduler import ScheduledSeq
from .staging import HostStaging, pack

if TYPE_CHECKING:
    from .cuda_graphs import DecodeGraphs

_OP_ORDER = {"decode": 0, "verify": 1, "prefill": 2}

# builds a step's model inputs (token ids, ForwardBatch) from the tensors its HostStaging sent
Inputs = Callable[[list[torch.Tensor]], tuple[torch.Tensor, ForwardBatch]]


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of range(starts[i], starts[i] + lengths[i]) over i, without a Python loop."""
    ends = np.cumsum(lengths)
    return np.arange(ends[-1] if len(ends) else 0) + np.repeat(starts - (ends - lengths), lengths)


@dataclass(frozen=True)
class StepArrays:
    """Per-request numbers of a step as arrays, read off the requests once for the vectorized index math."""

    n: np.ndarray  # tokens fed
    computed: np.ndarray  # tokens already in the caches
    req_slots: np.ndarray
    state_slots: np.ndarray
    buf_lens: np.ndarray
    starts: np.ndarray  # first row of each request in the flat token batch

    @classmethod
    def of(cls, batch: list[ScheduledSeq]) -> StepArrays:
        def column(values: Iterable[int]) -> np.ndarray:
            return np.fromiter(values, np.int64, len(batch))

        n = column(s.n for s in batch)
        return cls(n, column(s.seq.num_computed for s in batch), column(s.seq.req_slot for s in batch),
                   column(s.seq.state_slot for s in batch), column(s.seq.buf_len for s in batch), np.cumsum(n) - n)


class ModelRunner:
    def __init__(self, model: Qwen3NextForCausalLM, block_size: int, short_query: int,
                 block_tables: np.ndarray, max_requests: int) -> None:
        """`short_query`: segments with at most this many tokens share one padded attention batch. `block_tables`:
        each request slot's KV blocks (MemoryManager.block_tables), read when a step is planned."""
        self.model, self.block_size, self.short_query = model, block_size, short_query
        self.block_tables = block_tables
        self.device = model.lm_head.weight.device
        # the tokens an overlapped decode step chose, by row: the next step reads those not yet on the host here
        self.last_tokens = torch.zeros(max_requests, dtype=torch.int64, device=self.device)
        self.kk = model.config.linear_conv_kernel_dim - 1
        self._gdn: GdnBatch | None = None
        self.graphs: DecodeGraphs | None = None  # set by the engine when cuda_graph_max_batch > 0

    def order(self, batch: list[ScheduledSeq]) -> list[ScheduledSeq]:
        return sorted(batch, key=lambda s: _OP_ORDER[s.step.op])

    def _attention(self, a: StepArrays, stage: HostStaging, key_blocks: int | None) -> list[tuple[int, int, int]]:
        """Stages each attention group's query rows, query positions and block tables; their indices in `stage`.
        Keys span the group's longest context in whole blocks, or `key_blocks` blocks if given (a fixed shape)."""
        short = np.flatnonzero(a.n <= self.short_query)
        groups = ([short] if len(short) else []) + [np.array([i]) for i in np.flatnonzero(a.n > self.short_query)]
        out = []
        for members in groups:
            n, computed = a.n[members], a.computed[members]
            blocks = key_blocks or -(-int((computed + n).max()) // self.block_size)
            t = np.minimum(np.arange(n.max()), n[:, None] - 1)  # padding repeats the request's last token
            tables = self.block_tables[a.req_slots[members], :blocks]
            out.append((stage.add(a.starts[members, None] + t), stage.add(computed[:, None] + t), stage.add(tables)))
        return out

    def _group(self, q_rows: torch.Tensor, q_pos: torch.Tensor, tables: torch.Tensor) -> AttentionGroup:
        """Key rows and the causal mask of one attention group, built once for every attention layer."""
        # whole blocks: the key length changes every block_size tokens, not every step
        bs = self.block_size
        kv_rows = (tables[:, :, None] * bs + torch.arange(bs, device=self.device)).flatten(1)
        mask = torch.arange(kv_rows.shape[1], device=self.device) <= q_pos[:, None, :, None]
        return AttentionGroup(q_rows, kv_rows, mask)

    def _gdn_batch(self, batch: list[ScheduledSeq], a: StepArrays, stage: HostStaging
                   ) -> Callable[[list[torch.Tensor]], GdnBatch]:
        """Stages the conv rows and the slots of the KVBuffer calls; returns what builds the GdnBatch from the
        sent tensors."""
        kk, put = self.kk, stage.add
        # each request's conv inputs: its kk old conv-state rows, then its tokens' rows
        base = a.starts + np.arange(len(batch)) * kk
        window = np.arange(kk)
        conv = [put(a.req_slots), put((base[:, None] + window).ravel()), put(ranges(base + kk, a.n)),
                put(((base + a.n)[:, None] + window).ravel())]
        steps = [s.step for s in batch]

        def flag(name: str) -> np.ndarray:
            return np.fromiter((getattr(step, name) for step in steps), bool, len(steps))

        fold, read, flush = flag("fold"), np.where(flag("read"), a.state_slots, -1), flag("flush")
        buf_lens = np.where(fold, 0, a.buf_lens)
        calls: dict[str, tuple[Callable[..., object], list[int]]] = {}  # GdnBatch field: constructor, staged args
        if fold.any():
            f = np.flatnonzero(fold)
            takes = np.fromiter((steps[i].takes_slot for i in f), bool, len(f))
            calls["fold"] = (FoldCall, [put(a.req_slots[f]), put(a.buf_lens[f]),
                                        put(np.where(takes, -1, a.state_slots[f])), put(a.state_slots[f])])
        ops = [step.op for step in steps]
        for op in _OP_ORDER:
            if op not in ops:
                continue
            i, j = ops.index(op), len(ops) - ops[::-1].index(op)  # the op's requests: batch[i:j] (ordered)
            start, end = int(a.starts[i]), int(a.starts[j - 1] + a.n[j - 1])
            cu = np.append(a.starts[i:j], end) - start
            if op == "decode":
                calls[op] = (partial(DecodeCall, start, end), [put(v[i:j]) for v in (
                    a.req_slots, buf_lens, read, np.where(flush, a.state_slots, -1))])
            elif op == "verify":
                calls[op] = (partial(VerifyCall, start, end, max_tokens=int(a.n[i:j].max())),
                             [put(cu), put(a.req_slots[i:j]), put(buf_lens[i:j]), put(read[i:j])])
            else:
                calls[op] = (partial(PrefillCall, start, end), [put(cu), put(read[i:j]), put(a.state_slots[i:j])])

        def build(t: list[torch.Tensor]) -> GdnBatch:
            slots, state, tokens, last = (t[i] for i in conv)  # the conv rows staged above, on the device
            windows = tokens[:, None] + torch.arange(-kk, 1, device=self.device)  # once for every layer
            gdn = GdnBatch(slots, state, tokens, windows, last, keep_conv_inputs=any(s.drafts for s in batch))
            for name, (make, args) in calls.items():
                setattr(gdn, name, make(*(t[i] for i in args)))
            return gdn

        return build

    def plan(self, batch: list[ScheduledSeq], key_blocks: int | None = None) -> tuple[HostStaging, Inputs]:
        """Stages the token ids, positions, cache addresses, attention groups and KVBuffer calls of `batch`
        (already in `order`); returns the staging and what builds the model's inputs from the tensors it sends.
        `key_blocks`: every attention group's keys span this many KV blocks (see `_attention`)."""
        a = StepArrays.of(batch)
        ids: list[int] = []
        for s in batch:
            nc = s.seq.num_computed
            ids += s.seq.token_ids[nc:nc + s.n - len(s.drafts)] + s.drafts + [0] * s.seq.pending
        # a token still on the device (Sequence.pending: only ever a decode's one token) comes from last_tokens
        pending = np.fromiter((s.seq.pending_row if s.seq.pending else -1 for s in batch), np.int64, len(batch))
        positions = ranges(a.computed, a.n)
        owners = np.repeat(a.req_slots, a.n)
        bs = self.block_size
        kv_rows = self.block_tables[owners, positions // bs] * bs + positions % bs
        stage = HostStaging(self.device)
        flat = [stage.add(v) for v in (ids, np.repeat(pending, a.n), positions, kv_rows)]
        groups = self._attention(a, stage, key_blocks)
        build_gdn = self._gdn_batch(batch, a, stage)

        def inputs(t: list[torch.Tensor]) -> tuple[torch.Tensor, ForwardBatch]:
            staged_ids, rows, pos, kv = (t[i] for i in flat)
            input_ids = torch.where(rows >= 0, self.last_tokens[rows.clamp(min=0)], staged_ids)
            return input_ids, ForwardBatch(pos, kv, [self._group(*(t[i] for i in g)) for g in groups], build_gdn(t))

        return stage, inputs

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor | None, list[tuple[int, int]]]:
        """Logits `[rows, V]` and each request's (first row, row count) in them, for `batch` (already in
        `order`): all its tokens' rows when it has drafts to verify, its last row when it samples, none for a
        prefill chunk that does not reach its last token. A step `graphs` takes has one row per request."""
        if self.graphs is not None and self.graphs.takes(batch):
            self._gdn = None  # one token each: nothing to roll back
            return self.graphs.run(batch), [(i, int(s.samples)) for i, s in enumerate(batch)]
        stage, inputs = self.plan(batch)
        take = np.fromiter((s.n if s.drafts else int(s.samples) for s in batch), np.int64, len(batch))
        ends = np.cumsum([s.n for s in batch])
        first = np.cumsum(take) - take
        take_rows = stage.add(ranges(ends - take, take))
        t = stage.send()  # the step's one host-to-device copy, queued ahead of the forward
        input_ids, fb = inputs(t)
        self._gdn = fb.gdn
        hidden = self.model(input_ids, fb)
        spans = list(zip(first.tolist(), take.tolist(), strict=True))
        return (self.model.logits(hidden[t[take_rows]]) if take.sum() else None), spans

    @torch.inference_mode()
    def rollback(self, batch: list[ScheduledSeq], accepted: list[int]) -> None:
        """Conv states of speculative requests rewound to their last accepted token (others are already right)."""
        gdn = self._gdn
        rewind = [i for i, (s, a) in enumerate(zip(batch, accepted, strict=True)) if a < s.n]
        if gdn is None or not rewind:
            return
        kk, starts = self.kk, list(accumulate((s.n for s in batch), initial=0))
        slots, rows = pack([[batch[i].seq.req_slot for i in rewind],
                            [starts[i] + i * kk + accepted[i] + j for i in rewind for j in range(kk)]], self.device)
        for layer in self.model.gdn_layers():
            layer.rollback_conv(gdn, slots, rows)
