"""The synchronous engine: add requests, run steps, abort; everything the async `NativeEngine` wraps.

One step: propose drafts for decoding requests, schedule, run the model, choose tokens (accepting drafts),
commit what was kept to the state manager (buffer lengths, conv states, KV blocks), and stream the deltas.

Decode steps that replay a CUDA graph are overlapped with the host work around them. Such a step keeps exactly one
token per request, so its commit is known before its tokens are: the step is launched, committed, and its tokens
chosen on the device and copied back without waiting (`InFlight`); the host then reads back and streams the
previous step's tokens while the device runs this one, and the next step is scheduled and planned before this
one's tokens reach the host (the next forward reads them on the device, ModelRunner.last_tokens). The host's
per-request work (scheduling, planning, detokenizing, streaming: milliseconds at batch 256) then hides behind
the forward instead of adding to it. What this costs: a request that ends on a stop token or stop string decodes
one more token, thrown away (a request that ends by length is known to and leaves the schedule in time); its
memory is freed when its last token is read, and another request reusing it runs after the wasted step on the
same stream. Any other step (prefill, drafts, logprobs, graphs off) first reads back the step in flight.
"""

from __future__ import annotations

import logging
import math
import secrets
from dataclasses import asdict, dataclass

import torch

from ..model import LoadedModel, load_model
from .api import EngineStats, FinishReason, GenerateChunk, GenerateRequest, ModelInfo, RequestStats
from .config import EngineConfig
from .cuda_graphs import DecodeGraphs
from .drafter import propose_ngram
from .memory import MemoryManager, plan_memory
from .model_runner import ModelRunner
from .output import append_output
from .sampler import choose_batch, logprobs, next_tokens
from .scheduler import ScheduledSeq, Scheduler
from .sequence import Sequence, Status
from .validation import validate_request

log = logging.getLogger(__name__)

PATHS = ("stateless", "buffered", "recurrent")


@dataclass
class InFlight:
    """An overlapped decode step, launched and committed: its requests and the tokens it chose, on their way to the
    host (`tokens`, pinned on CUDA, holds them once `ready` has passed)."""

    batch: list[ScheduledSeq]
    tokens: torch.Tensor
    ready: torch.cuda.Event | None


def resolve_device(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    """auto: CUDA if present; dtype auto: bfloat16 on CUDA, float32 on CPU. ValueError if CUDA is asked for
    and there is none."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but no CUDA device is available")
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          "cpu" if config.device == "auto" else config.device)
    if config.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, config.dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """The name the settings use for a dtype: `float32`, `bfloat16` (not `torch.float32`)."""
    return str(dtype).removeprefix("torch.")


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        """`loaded`: an already built model (benchmarks with random weights); else config.model is loaded."""
        self.config = config
        self.device, self.dtype = resolve_device(config)
        self.loaded = loaded or load_model(config.model, self.device, self.dtype, config.seed)
        self.tokenizer = self.loaded.tokenizer
        self.plan = plan_memory(self.loaded.config, config, self.dtype)
        self.memory = MemoryManager(self.loaded.model, config, self.plan, self.device, self.dtype)
        self.num_drafts = config.speculative_num_draft_tokens if config.speculative_algorithm == "ngram" else 0
        self.runner = ModelRunner(self.loaded.model, self.plan.block_size, short_query=1 + self.num_drafts,
                                  block_tables=self.memory.block_tables, max_requests=config.max_running_requests)
        if self.plan.scratch is not None:  # cuda_graph_max_batch > 0
            self.runner.graphs = DecodeGraphs(self.runner, self.plan.scratch,
                                              min(config.cuda_graph_max_batch, config.max_running_requests),
                                              math.ceil(config.max_context_length / self.plan.block_size),
                                              capture=self.device.type == "cuda")
        self.scheduler = Scheduler(config, self.memory)
        self.requests: dict[str, Sequence] = {}
        self.tokens_by_path = dict.fromkeys(PATHS, 0)
        self.flushes = self.drafted_tokens = self.accepted_tokens = 0
        self._inflight: InFlight | None = None
        self._unsent: list[tuple[str, GenerateChunk]] = []  # chunks of the current step, in the order made

    # requests in and out
    def validate(self, request: GenerateRequest) -> list[int]:
        return validate_request(request, self.tokenizer, self.config.max_context_length)

    def add(self, request: GenerateRequest, prompt_ids: list[int]) -> Sequence:
        """Queues a validated request (the caller bounds the requests in the engine: running + waiting)."""
        p = request.sampling
        seed = None
        if p.temperature > 0:  # unseeded: random, from the operating system (not from the engine's own seed)
            seed = p.seed if p.seed is not None else secrets.randbits(64)
        seq = Sequence(request.request_id, list(prompt_ids), len(prompt_ids), p, seed)
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort(self, request_id: str) -> GenerateChunk | None:
        """Cancels a request and frees all its memory now; its last chunk, or None if it is not active."""
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        return self._finish(seq, "cancelled", [], "")

    def abort_all(self, reason: FinishReason) -> list[tuple[str, GenerateChunk]]:
        """Ends every active request (shutdown, or an error in a step) and frees all memory; first the chunks a
        failed step made but could not return (the last ones of the requests it ended)."""
        self._inflight = None  # its requests all end here; the device finishes the step on its own
        return self._take_unsent() + [(rid, self._finish(seq, reason, [], "")) for rid, seq in
                                      list(self.requests.items())]

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self._inflight)

    # the step
    def _propose(self) -> None:
        limit = self.config.max_context_length
        for seq in self.scheduler.running:
            seq.drafts = []
            if self.num_drafts and seq.in_decode:
                room = min(self.num_drafts, seq.sampling.max_new_tokens - seq.num_output_tokens - 1,
                           limit - seq.num_tokens - 1)
                seq.drafts = propose_ngram(seq.token_ids, room)

    def step(self) -> list[tuple[str, GenerateChunk]]:
        """One engine step; the chunks it produced, by request id (an overlapped step: those of the step before).
        Chunks are gathered in `_unsent` as they are made, so a step that fails part-way (and the `abort_all`
        after it) still delivers the last chunk of every request it ended."""
        self._propose()
        batch = self.runner.order(self.scheduler.schedule())
        if batch and self._overlaps(batch):
            launched = self._launch(batch)
            self._read_back()
            self._inflight = launched
            return self._take_unsent()
        self._read_back()
        batch = [s for s in batch if s.seq.status is Status.RUNNING]  # a token read back may have ended one
        if batch:
            logits, spans = self.runner.run(batch)
            emitted = choose_batch(logits, spans, [s.drafts for s in batch], [s.seq.sampling for s in batch],
                                   [s.seq.seed for s in batch], [s.seq.next_position for s in batch])
            accepted = []
            for s, tokens in zip(batch, emitted, strict=True):
                kept = s.n - len(s.drafts) + max(len(tokens) - 1, 0)
                self._commit(s, kept)
                accepted.append(kept)
            if self.num_drafts:
                self.runner.rollback(batch, accepted)
            for s, span, tokens in zip(batch, spans, emitted, strict=True):
                self._emit(s, logits, span, tokens)
        return self._take_unsent()

    def _take_unsent(self) -> list[tuple[str, GenerateChunk]]:
        unsent, self._unsent = self._unsent, []
        return unsent

    def _overlaps(self, batch: list[ScheduledSeq]) -> bool:
        """A CUDA-graph decode step where every request samples its next token (not a one-token piece of a chunked
        prefill, which samples nothing) and needs nothing of it before the next step (no drafts to propose from
        it, no logprobs)."""
        graphs = self.runner.graphs
        return (graphs is not None and not self.num_drafts and graphs.takes(batch)
                and all(s.samples and not s.seq.sampling.logprobs for s in batch))

    def _launch(self, batch: list[ScheduledSeq]) -> InFlight:
        """Runs an overlapped step up to its tokens' copy to the host, and commits it (one token each)."""
        logits, _ = self.runner.run(batch)
        tokens = next_tokens(logits, [s.seq.sampling for s in batch], [s.seq.seed for s in batch],
                             [s.seq.next_position for s in batch])
        self.runner.last_tokens[:len(batch)] = tokens
        host = torch.empty_like(tokens, device="cpu", pin_memory=tokens.is_cuda).copy_(tokens, non_blocking=True)
        ready = None
        if tokens.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        limit = self.config.max_context_length
        for row, s in enumerate(batch):
            seq = s.seq
            self._commit(s, 1)
            seq.pending, seq.pending_row = seq.pending + 1, row
            if seq.num_tokens - seq.prompt_len >= seq.sampling.max_new_tokens or seq.num_tokens >= limit:
                self.scheduler.remove(seq)  # this token is its last: it leaves the schedule now
        return InFlight(batch, host, ready)

    def _commit(self, s: ScheduledSeq, kept: int) -> None:
        """Commits a request's step (its `kept` tokens are in the caches) and counts the flush the step made, if
        any: it happened on the device even if the request ends before the step's tokens are read back."""
        self.memory.commit(s.seq, s.step, kept)
        flushed = int(s.step.fold or s.step.flush)
        s.seq.stats.flushes += flushed
        self.flushes += flushed

    def _read_back(self) -> None:
        """Streams the tokens of the step in flight (if any) once they are on the host."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return
        if inflight.ready is not None:
            inflight.ready.synchronize()
        for s, token in zip(inflight.batch, inflight.tokens.tolist(), strict=True):
            s.seq.pending -= 1
            if s.seq.status is not Status.FINISHED:
                self._emit(s, None, (0, 0), [token])

    def _emit(self, s: ScheduledSeq, logits: torch.Tensor | None, span: tuple[int, int], tokens: list[int]) -> None:
        """Adds to `_unsent` the chunk for one request's tokens of this step, if any. `span` is its (first row, row
        count) in `logits`, sliced only for a request that asked for logprobs: a step adds no tensor op per
        request."""
        seq, st = s.seq, s.seq.stats
        if not tokens:
            return
        st.drafted_tokens += len(s.drafts)
        st.accepted_tokens += len(tokens) - 1
        self.drafted_tokens += len(s.drafts)
        self.accepted_tokens += len(tokens) - 1
        new, delta, reason = append_output(seq, tokens, self.tokenizer, self.config.max_context_length)
        st.tokens_by_path[s.step.path] += len(new)
        self.tokens_by_path[s.step.path] += len(new)
        a, k = span
        lps = logprobs(logits[a:a + k], new) if seq.sampling.logprobs and logits is not None and k else None
        if reason is not None:
            self._unsent.append((seq.request_id, self._finish(seq, reason, new, delta, lps)))
        else:
            self._unsent.append((seq.request_id, GenerateChunk(new, delta, lps, prompt_tokens=seq.prompt_len,
                                                               completion_tokens=seq.num_output_tokens)))

    def _finish(self, seq: Sequence, reason: FinishReason, new: list[int], delta: str,
                lps: list[float] | None = None) -> GenerateChunk:
        self.scheduler.remove(seq)
        self.memory.free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
        del self.requests[seq.request_id]
        return GenerateChunk(new, delta, lps, reason, seq.prompt_len, seq.num_output_tokens,
                             RequestStats(**asdict(seq.stats)))

    # observability
    def stats(self) -> EngineStats:
        # running: scheduled, or off the schedule with its last token still on the device (InFlight)
        running = [seq for seq in self.requests.values() if seq.status is Status.RUNNING]
        kvbuffer = self.config.decode_mode == "kvbuffer"
        buffered = [s.buf_len for s in running if s.req_slot >= 0] if kvbuffer else []
        occupancy = sum(buffered) / (len(buffered) * self.config.buffer_size) if buffered else 0.0
        return EngineStats(
            tokens_by_path=dict(self.tokens_by_path), flushes=self.flushes, drafted_tokens=self.drafted_tokens,
            accepted_tokens=self.accepted_tokens, running_requests=len(running),
            waiting_requests=len(self.scheduler.waiting), state_slots_used=self.memory.state_slots_used,
            state_slots_total=self.plan.state_slots,
            buffer_slots_used=self.memory.request_slots_used if kvbuffer else 0,
            buffer_slots_total=self.plan.request_slots if kvbuffer else 0,
            buffer_occupancy=occupancy)

    def model_info(self) -> ModelInfo:
        cfg = self.loaded.config
        return ModelInfo(self.loaded.name, "Qwen3NextForCausalLM", cfg.vocab_size, self.config.max_context_length,
                         cfg.num_hidden_layers, len(cfg.linear_layers), str(self.device), dtype_name(self.dtype))
