"""Decode steps at fixed shapes, replayed from CUDA graphs: one launch a step instead of hundreds.

On a GPU a decode step is host-bound (hundreds of small launches, each costing the host more than its kernel
costs the device), so steps where every request decodes one token (`takes`) run from a captured CUDA graph. A
graph fixes every shape and address, so such a step is padded: the batch up to the next of `batch_sizes` (1, 2,
4, 8, then multiples of 16, as nano-vllm does) and the attention keys to the next power-of-two number of KV
blocks (`key_blocks`; the mask already hides keys past each query's position). Padding requests are addressed to
the scratch entries of the memory plan (memory.Scratch): their token reads and writes its conv state, buffer, KV
row and, with decode_mode=recurrent, checkpoint there and nowhere else, with an empty buffer (buf_len 0, so it
never overflows) and no flush. Whether a real request flushes is read on the device from write_slots, so one
graph serves steps with and without flushes, in either decode mode.

One graph per (padded batch, key blocks), captured the first time that shape comes: the step is planned with
padding requests only, run once eagerly (Triton compiles, cuBLAS picks its kernels, outside the capture; only
scratch entries change), then captured into a memory pool all graphs share (they never run at once). Each graph
reads its index lists from its own flat static tensor, refilled every step by one host-to-device copy
(`HostStaging.send(into=...)`), and writes the final hidden states into a buffer all graphs share; the logits of
the real rows are computed from it after the replay.

Without `capture` (no CUDA) the same padded step runs eagerly on the same static tensor, which is how CPU tests
check the padding against the unpadded step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .api import SamplingParams
from .kvstate import GdnStep
from .memory import Scratch
from .scheduler import ScheduledSeq
from .sequence import Sequence

if TYPE_CHECKING:
    from .model_runner import ModelRunner


def batch_sizes(max_batch: int) -> list[int]:
    """The padded batch sizes: 1, 2, 4, 8, the multiples of 16, up to and including max_batch itself."""
    return sorted({n for n in (1, 2, 4, 8) if n < max_batch} | set(range(16, max_batch, 16)) | {max_batch})


def key_blocks(blocks: int, max_blocks: int) -> int:
    """KV blocks the keys of a padded step span when its longest context covers `blocks`: the next power of two,
    at most max_blocks (those of max_context_length, which no context exceeds)."""
    return min(1 << (blocks - 1).bit_length(), max_blocks)


def padding_request(scratch: Scratch) -> ScheduledSeq:
    """A decode of token 0 at position 0 in the scratch entries: an empty buffer, no flush, and a checkpoint read
    (and, by recurrent decode, written) only where the scratch has one."""
    seq = Sequence("padding", [0], 1, SamplingParams(), None, req_slot=scratch.request_slot,
                   state_slot=scratch.state_slot, block_table=[scratch.kv_block])
    recurrent = scratch.state_slot >= 0
    step = GdnStep("decode", fold=False, read=recurrent, flush=False, takes_slot=False,
                   path="recurrent" if recurrent else "stateless")
    return ScheduledSeq(seq, 1, [], step)


@dataclass
class StaticStep:
    """One captured shape: the flat tensor its index lists are copied into, and what runs the step on it."""

    inputs: torch.Tensor
    replay: Callable[[], None]


class DecodeGraphs:
    """Runs the steps `takes` accepts at padded shapes: a CUDA graph per shape, or eagerly without `capture`."""

    def __init__(self, runner: ModelRunner, scratch: Scratch, max_batch: int, max_key_blocks: int,
                 capture: bool) -> None:
        self.runner, self.max_key_blocks, self.capture = runner, max_key_blocks, capture
        self.sizes = batch_sizes(max_batch)
        self.padding = padding_request(scratch)
        model = runner.model
        self.hidden = model.lm_head.weight.new_empty(max_batch, model.config.hidden_size)  # every graph's output
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.steps: dict[tuple[int, int], StaticStep] = {}  # by (padded batch, key blocks)

    def takes(self, batch: list[ScheduledSeq]) -> bool:
        """At most max_batch requests, each decoding one token (op decode: no drafts) with no fold before it."""
        return len(batch) <= self.sizes[-1] and all(s.step.op == "decode" and not s.step.fold for s in batch)

    def run(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Logits `[len(batch), V]` of a batch `takes` accepts, row i request i's."""
        n = len(batch)
        size = next(b for b in self.sizes if b >= n)
        longest = max(s.seq.num_computed for s in batch) + 1
        blocks = key_blocks(-(-longest // self.runner.block_size), self.max_key_blocks)
        step = self.steps.get((size, blocks)) or self._capture(size, blocks)
        stage, _ = self.runner.plan(batch + [self.padding] * (size - n), blocks)
        stage.send(into=step.inputs)
        step.replay()
        return self.runner.model.logits(self.hidden[:n])

    def _capture(self, size: int, blocks: int) -> StaticStep:
        """The step of this shape, planned with padding requests only; warmed up once, then captured."""
        stage, inputs = self.runner.plan([self.padding] * size, blocks)
        static = torch.empty(stage.size(), dtype=torch.int64, device=self.runner.device)
        views = stage.send(into=static)

        def forward() -> None:
            self.hidden[:size] = self.runner.model(*inputs(views))

        forward()  # the warm-up: kernels compiled and chosen outside the capture; only scratch entries change
        replay = forward
        if self.capture:
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (the server's) do not invalidate the capture
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                forward()
            replay = graph.replay
        step = self.steps[(size, blocks)] = StaticStep(static, replay)
        return step
