"""The synchronous engine: add requests, run steps, abort; everything the async `NativeEngine` wraps.

One step: propose drafts for decoding requests, schedule, run the model, choose tokens (accepting drafts),
commit what was kept to the state manager (buffer lengths, conv states, KV blocks), and stream the deltas.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict

import torch

from ..model import LoadedModel, load_model
from .api import EngineStats, FinishReason, GenerateChunk, GenerateRequest, ModelInfo, RequestStats
from .config import EngineConfig
from .cuda_graphs import DecodeGraphs
from .drafter import propose_ngram
from .memory import MemoryManager, plan_memory
from .model_runner import ModelRunner
from .output import append_tokens, text_delta
from .sampler import choose_batch, logprobs, make_generator
from .scheduler import ScheduledSeq, Scheduler
from .sequence import Sequence, Status
from .validation import validate_request

log = logging.getLogger(__name__)

PATHS = ("stateless", "buffered", "recurrent")


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
        self.runner = ModelRunner(self.loaded.model, self.plan.block_size, short_query=1 + self.num_drafts)
        if self.plan.scratch is not None:  # cuda_graph_max_batch > 0
            self.runner.graphs = DecodeGraphs(self.runner, self.plan.scratch,
                                              min(config.cuda_graph_max_batch, config.max_running_requests),
                                              math.ceil(config.max_context_length / self.plan.block_size),
                                              capture=self.device.type == "cuda")
        self.scheduler = Scheduler(config, self.memory)
        self.requests: dict[str, Sequence] = {}
        self._seeds = torch.Generator().manual_seed(config.seed)  # for requests without a seed
        self.tokens_by_path = dict.fromkeys(PATHS, 0)
        self.flushes = self.drafted_tokens = self.accepted_tokens = 0

    # requests in and out
    def validate(self, request: GenerateRequest) -> list[int]:
        return validate_request(request, self.tokenizer, self.config)

    def add(self, request: GenerateRequest, prompt_ids: list[int]) -> Sequence:
        """Queues a validated request (the caller enforces max_waiting_requests)."""
        p = request.sampling
        gen = None
        if p.temperature > 0:
            seed = p.seed if p.seed is not None else int(torch.randint(2**62, (), generator=self._seeds))
            gen = make_generator(seed, self.device)
        seq = Sequence(request.request_id, list(prompt_ids), len(prompt_ids), p, gen)
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
        """Ends every active request (shutdown, or an error in a step) and frees all memory."""
        return [(rid, self._finish(seq, reason, [], "")) for rid, seq in list(self.requests.items())]

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    # the step
    def _propose(self) -> None:
        limit = self.config.max_context_length
        for seq in self.scheduler.running:
            seq.drafts = []
            if self.num_drafts and seq.in_decode:
                room = min(self.num_drafts, seq.sampling.max_new_tokens - len(seq.output_ids) - 1,
                           limit - seq.num_tokens - 1)
                seq.drafts = propose_ngram(seq.token_ids, room)

    def step(self) -> list[tuple[str, GenerateChunk]]:
        """One engine step; the chunks it produced, by request id."""
        self._propose()
        batch = self.runner.order(self.scheduler.schedule())
        if not batch:
            return []
        logits, spans = self.runner.run(batch)
        emitted = choose_batch(logits, spans, [s.drafts for s in batch], [s.seq.sampling for s in batch],
                               [s.seq.generator for s in batch])
        accepted = []
        for s, tokens in zip(batch, emitted, strict=True):
            kept = s.n - len(s.drafts) + max(len(tokens) - 1, 0)
            self.memory.commit(s.seq, s.step, kept)
            accepted.append(kept)
        if self.num_drafts:
            self.runner.rollback(batch, accepted)
        return [out for s, span, tokens in zip(batch, spans, emitted, strict=True)
                if (out := self._emit(s, logits, span, tokens)) is not None]

    def _emit(self, s: ScheduledSeq, logits: torch.Tensor | None, span: tuple[int, int], tokens: list[int]
              ) -> tuple[str, GenerateChunk] | None:
        """The chunk for one request's tokens of this step. `span` is its (first row, row count) in `logits`, sliced
        only for a request that asked for logprobs: a step adds no tensor op per request."""
        seq, st = s.seq, s.seq.stats
        st.flushes += int(s.step.fold or s.step.flush)
        self.flushes += int(s.step.fold or s.step.flush)
        if not tokens:
            return None
        st.drafted_tokens += len(s.drafts)
        st.accepted_tokens += len(tokens) - 1
        self.drafted_tokens += len(s.drafts)
        self.accepted_tokens += len(tokens) - 1
        new, reason = append_tokens(seq, tokens, self.tokenizer.eos_token_ids, self.config.max_context_length)
        st.tokens_by_path[s.step.path] += len(new)
        self.tokens_by_path[s.step.path] += len(new)
        a, k = span
        lps = logprobs(logits[a:a + k], new) if seq.sampling.logprobs and logits is not None and k else None
        delta, stopped = text_delta(seq, self.tokenizer, reason is not None)
        reason = "stop" if stopped else reason
        if reason is not None:
            return seq.request_id, self._finish(seq, reason, new, delta, lps)
        return seq.request_id, GenerateChunk(new, delta, lps, prompt_tokens=seq.prompt_len,
                                  completion_tokens=len(seq.output_ids))

    def _finish(self, seq: Sequence, reason: FinishReason, new: list[int], delta: str,
                lps: list[float] | None = None) -> GenerateChunk:
        self.scheduler.remove(seq)
        self.memory.free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason
        del self.requests[seq.request_id]
        return GenerateChunk(new, delta, lps, reason, seq.prompt_len, len(seq.output_ids),
                             RequestStats(**asdict(seq.stats)))

    # observability
    def stats(self) -> EngineStats:
        running = list(self.scheduler.running)
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
