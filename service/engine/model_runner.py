"""Executes a scheduled step: builds the flat token batch and its cache addresses, runs the model, returns logits.

Requests are ordered by GDN operation (decode, verify, prefill) so each KVBuffer call covers one contiguous
token range. Speculative steps keep the conv inputs so `rollback` can rewind conv states to what was accepted.
"""

from __future__ import annotations

import torch

from ..model import Qwen3NextForCausalLM
from ..model.batch import AttentionGroup, DecodeCall, FoldCall, ForwardBatch, GdnBatch, PrefillCall, VerifyCall
from .scheduler import ScheduledSeq

_OP_ORDER = {"decode": 0, "verify": 1, "prefill": 2}


class ModelRunner:
    def __init__(self, model: Qwen3NextForCausalLM, block_size: int, short_query: int) -> None:
        """`short_query`: segments with at most this many tokens share one padded attention batch."""
        self.model, self.block_size, self.short_query = model, block_size, short_query
        self.device = model.lm_head.weight.device
        self.kk = model.config.linear_conv_kernel_dim - 1
        self._gdn: GdnBatch | None = None

    def order(self, batch: list[ScheduledSeq]) -> list[ScheduledSeq]:
        return sorted(batch, key=lambda s: _OP_ORDER[s.step.op])

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def _kv_rows(self, block_table: list[int], positions: range) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in positions]

    def _attention(self, batch: list[ScheduledSeq], starts: list[int]) -> list[AttentionGroup]:
        short = [i for i, s in enumerate(batch) if s.n <= self.short_query]
        groups = [short] if short else []
        groups += [[i] for i, s in enumerate(batch) if s.n > self.short_query]
        bs, out = self.block_size, []
        for members in groups:
            Q = max(batch[i].n for i in members)
            L = max(batch[i].seq.num_computed + batch[i].n for i in members)
            blocks = -(-L // bs)
            q_rows, q_pos, tables = [], [], []
            for i in members:
                s, nc = batch[i], batch[i].seq.num_computed
                q_rows.append([starts[i] + min(t, s.n - 1) for t in range(Q)])
                q_pos.append([nc + min(t, s.n - 1) for t in range(Q)])
                table = s.seq.block_table[:blocks]
                tables.append(table + [0] * (blocks - len(table)))
            # whole blocks: the key length changes every block_size tokens, not every step
            kv_rows = (self._tensor(tables)[:, :, None] * bs + torch.arange(bs, device=self.device)).flatten(1)
            out.append(AttentionGroup(self._tensor(q_rows), self._tensor(q_pos), kv_rows))
        return out

    def _gdn_batch(self, batch: list[ScheduledSeq], starts: list[int]) -> GdnBatch:
        kk, t = self.kk, self._tensor
        state_rows, token_rows, last_rows = [], [], []
        for i, s in enumerate(batch):
            base = starts[i] + i * kk
            state_rows += range(base, base + kk)
            token_rows += range(base + kk, base + kk + s.n)
            last_rows += range(base + s.n, base + s.n + kk)
        gdn = GdnBatch(t([s.seq.req_slot for s in batch]), t(state_rows), t(token_rows), t(last_rows),
                       keep_conv_inputs=any(s.drafts for s in batch))
        folds = [s for s in batch if s.step.fold]
        if folds:
            gdn.fold = FoldCall(t([s.seq.req_slot for s in folds]), t([s.seq.buf_len for s in folds]),
                                t([-1 if s.step.takes_slot else s.seq.state_slot for s in folds]),
                                t([s.seq.state_slot for s in folds]))
        for op in _OP_ORDER:
            members = [i for i, s in enumerate(batch) if s.step.op == op]
            if not members:
                continue
            seqs = [batch[i] for i in members]
            start, end = starts[members[0]], starts[members[-1]] + batch[members[-1]].n
            read = t([s.seq.state_slot if s.step.read else -1 for s in seqs])
            cu = t([starts[i] - start for i in members] + [end - start])
            buf_slots = t([s.seq.req_slot for s in seqs])
            buf_lens = t([0 if s.step.fold else s.seq.buf_len for s in seqs])
            if op == "decode":
                gdn.decode = DecodeCall(start, end, buf_slots, buf_lens, read,
                                        t([s.seq.state_slot if s.step.flush else -1 for s in seqs]))
            elif op == "verify":
                gdn.verify = VerifyCall(start, end, cu, buf_slots, buf_lens, read, max(s.n for s in seqs))
            else:
                gdn.prefill = PrefillCall(start, end, cu, read, t([s.seq.state_slot for s in seqs]))
        return gdn

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor | None, list[tuple[int, int]]]:
        """Logits `[rows, V]` and each request's (first row, row count) in them, for `batch` (already in
        `order`): all its tokens' rows when it has drafts to verify, its last row when it samples, none for a
        prefill chunk that does not reach its last token."""
        starts, ids, positions, kv_rows = [], [], [], []
        for s in batch:
            seq, nc = s.seq, s.seq.num_computed
            starts.append(len(ids))
            ids += seq.token_ids[nc:nc + s.n - len(s.drafts)] + s.drafts
            positions += range(nc, nc + s.n)
            kv_rows += self._kv_rows(seq.block_table, range(nc, nc + s.n))
        self._gdn = self._gdn_batch(batch, starts)
        fb = ForwardBatch(self._tensor(positions), self._tensor(kv_rows), self._attention(batch, starts), self._gdn)
        rows, spans = [], []
        for s, start in zip(batch, starts, strict=True):
            take = s.n if s.drafts else int(s.samples)
            spans.append((len(rows), take))
            rows += range(start + s.n - take, start + s.n)
        # copied before the forward is queued: a host-to-device copy waits for the stream to drain
        take_rows = self._tensor(rows) if rows else None
        hidden = self.model(self._tensor(ids), fb)
        return (self.model.logits(hidden[take_rows]) if take_rows is not None else None), spans

    @torch.inference_mode()
    def rollback(self, batch: list[ScheduledSeq], accepted: list[int]) -> None:
        """Conv states of speculative requests rewound to their last accepted token (others are already right)."""
        gdn = self._gdn
        partial = [i for i, (s, a) in enumerate(zip(batch, accepted, strict=True)) if a < s.n]
        if gdn is None or not partial:
            return
        kk, starts = self.kk, torch.cumsum(torch.tensor([0] + [s.n for s in batch]), 0).tolist()
        slots = self._tensor([batch[i].seq.req_slot for i in partial])
        rows = self._tensor([starts[i] + i * kk + accepted[i] + j for i in partial for j in range(kk)])
        for layer in self.model.gdn_layers():
            layer.rollback_conv(gdn, slots, rows)
