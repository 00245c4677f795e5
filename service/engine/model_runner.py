"""Executes a scheduled step: builds the flat token batch and its cache addresses, runs the model, returns logits.

Requests are ordered by GDN operation (decode, verify, prefill) so each KVBuffer call covers one contiguous
token range. Speculative steps keep the conv inputs so `rollback` can rewind conv states to what was accepted.
Every index tensor of a step is planned as a Python list first and reaches the device in one `HostStaging` copy
that the host does not wait for (see staging.py). Steps where every request decodes one token go to `graphs`
when it is set (cuda_graphs.py: padded to a fixed shape, replayed from a CUDA graph on a GPU).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from itertools import accumulate
from typing import TYPE_CHECKING

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


class ModelRunner:
    def __init__(self, model: Qwen3NextForCausalLM, block_size: int, short_query: int) -> None:
        """`short_query`: segments with at most this many tokens share one padded attention batch."""
        self.model, self.block_size, self.short_query = model, block_size, short_query
        self.device = model.lm_head.weight.device
        self.kk = model.config.linear_conv_kernel_dim - 1
        self._gdn: GdnBatch | None = None
        self.graphs: DecodeGraphs | None = None  # set by the engine when cuda_graph_max_batch > 0

    def order(self, batch: list[ScheduledSeq]) -> list[ScheduledSeq]:
        return sorted(batch, key=lambda s: _OP_ORDER[s.step.op])

    def _kv_rows(self, block_table: list[int], positions: range) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in positions]

    def _attention(self, batch: list[ScheduledSeq], starts: list[int], stage: HostStaging, key_blocks: int | None
                   ) -> list[tuple[int, int, int]]:
        """Stages each attention group's query rows, query positions and block tables; their indices in `stage`.
        Keys span the group's longest context in whole blocks, or `key_blocks` blocks if given (a fixed shape)."""
        short = [i for i, s in enumerate(batch) if s.n <= self.short_query]
        groups = [short] if short else []
        groups += [[i] for i, s in enumerate(batch) if s.n > self.short_query]
        out = []
        for members in groups:
            Q = max(batch[i].n for i in members)
            L = max(batch[i].seq.num_computed + batch[i].n for i in members)
            blocks = key_blocks or -(-L // self.block_size)
            q_rows, q_pos, tables = [], [], []
            for i in members:
                s, nc = batch[i], batch[i].seq.num_computed
                q_rows.append([starts[i] + min(t, s.n - 1) for t in range(Q)])
                q_pos.append([nc + min(t, s.n - 1) for t in range(Q)])
                table = s.seq.block_table[:blocks]
                tables.append(table + [0] * (blocks - len(table)))
            out.append((stage.add(q_rows), stage.add(q_pos), stage.add(tables)))
        return out

    def _group(self, q_rows: torch.Tensor, q_pos: torch.Tensor, tables: torch.Tensor) -> AttentionGroup:
        """Key rows and the causal mask of one attention group, built once for every attention layer."""
        # whole blocks: the key length changes every block_size tokens, not every step
        bs = self.block_size
        kv_rows = (tables[:, :, None] * bs + torch.arange(bs, device=self.device)).flatten(1)
        mask = torch.arange(kv_rows.shape[1], device=self.device) <= q_pos[:, None, :, None]
        return AttentionGroup(q_rows, kv_rows, mask)

    def _gdn_batch(self, batch: list[ScheduledSeq], starts: list[int], stage: HostStaging
                   ) -> Callable[[list[torch.Tensor]], GdnBatch]:
        """Stages the conv rows and the slots of the KVBuffer calls; returns what builds the GdnBatch from the
        sent tensors."""
        kk, put = self.kk, stage.add
        state_rows, token_rows, last_rows = [], [], []
        for i, s in enumerate(batch):
            base = starts[i] + i * kk
            state_rows += range(base, base + kk)
            token_rows += range(base + kk, base + kk + s.n)
            last_rows += range(base + s.n, base + s.n + kk)
        conv = [put([s.seq.req_slot for s in batch]), put(state_rows), put(token_rows), put(last_rows)]
        calls: dict[str, tuple[Callable[..., object], list[int]]] = {}  # GdnBatch field: constructor, staged args
        folds = [s for s in batch if s.step.fold]
        if folds:
            calls["fold"] = (FoldCall, [put([s.seq.req_slot for s in folds]), put([s.seq.buf_len for s in folds]),
                                        put([-1 if s.step.takes_slot else s.seq.state_slot for s in folds]),
                                        put([s.seq.state_slot for s in folds])])
        for op in _OP_ORDER:
            members = [i for i, s in enumerate(batch) if s.step.op == op]
            if not members:
                continue
            seqs = [batch[i] for i in members]
            start, end = starts[members[0]], starts[members[-1]] + batch[members[-1]].n
            read = [s.seq.state_slot if s.step.read else -1 for s in seqs]
            cu = [starts[i] - start for i in members] + [end - start]
            buf_slots = [s.seq.req_slot for s in seqs]
            buf_lens = [0 if s.step.fold else s.seq.buf_len for s in seqs]
            if op == "decode":
                flush = [s.seq.state_slot if s.step.flush else -1 for s in seqs]
                calls[op] = (partial(DecodeCall, start, end), [put(v) for v in (buf_slots, buf_lens, read, flush)])
            elif op == "verify":
                calls[op] = (partial(VerifyCall, start, end, max_tokens=max(s.n for s in seqs)),
                             [put(v) for v in (cu, buf_slots, buf_lens, read)])
            else:
                calls[op] = (partial(PrefillCall, start, end),
                             [put(v) for v in (cu, read, [s.seq.state_slot for s in seqs])])

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
        starts, ids, positions, kv_rows = [], [], [], []
        for s in batch:
            seq, nc = s.seq, s.seq.num_computed
            starts.append(len(ids))
            ids += seq.token_ids[nc:nc + s.n - len(s.drafts)] + s.drafts
            positions += range(nc, nc + s.n)
            kv_rows += self._kv_rows(seq.block_table, range(nc, nc + s.n))
        stage = HostStaging(self.device)
        flat = [stage.add(v) for v in (ids, positions, kv_rows)]
        groups = self._attention(batch, starts, stage, key_blocks)
        build_gdn = self._gdn_batch(batch, starts, stage)

        def inputs(t: list[torch.Tensor]) -> tuple[torch.Tensor, ForwardBatch]:
            input_ids, pos, kv = (t[i] for i in flat)
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
        ends = accumulate(s.n for s in batch)
        rows, spans = [], []
        for s, end in zip(batch, ends, strict=True):
            take = s.n if s.drafts else int(s.samples)
            spans.append((len(rows), take))
            rows += range(end - take, end)
        take_rows = stage.add(rows)
        t = stage.send()  # the step's one host-to-device copy, queued ahead of the forward
        input_ids, fb = inputs(t)
        self._gdn = fb.gdn
        hidden = self.model(input_ids, fb)
        return (self.model.logits(hidden[t[take_rows]]) if rows else None), spans

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
