"""A stand-in for `sglang.Engine`, for the adapter's tests on a CPU: SGLang's engine cannot run without a GPU (its
schedulers load the model onto CUDA), so this plays its part at the surface the adapter uses (SGLangRuntime in
kvbuffer.service.sglang.engine), with SGLang 0.5.17's observable behaviour there:

- `async_generate(..., stream=True)` returns an async iterator of outputs `{"text", "output_ids", "meta_info"}`;
  with incremental_streaming_output each carries the delta since the last, and several decode steps can arrive
  coalesced in one output (SGLang coalesces what queued up); meta_info has `prompt_tokens`, `completion_tokens`
  (cumulative), `finish_reason` (None, or schedule_batch.py's FINISH_*.to_json(): {"type": "stop", "matched":
  token id | the stop string} / {"type": "length", "length"} / {"type": "abort", "message", "status_code",
  "err_type"}), `output_token_logprobs` ([(logprob, id, None)], sliced to the delta) when asked, and the
  speculative counts at the end when speculation is on;
- stop strings end the text before them; while the text's tail may begin one, the scheduler streams nothing
  (output_streamer.py, check_match_stop_str_prefix); a matched stop token is in output_ids, its text is not; with
  ignore_eos no token id stops a request, stop_token_ids included (Req._check_token_based_finish);
- the scheduler's length limits (scheduler.py, init_req_max_new_tokens and validate_input_length): a prompt of
  `max_req_input_len` tokens or more (the model's context less 6, as `tokenizer_manager.max_req_input_len` says)
  ends at once with an "abort" of status_code 400, and max_new_tokens is cut to `max_req_input_len + 4 - prompt`
  without a word;
- a request is known to SGLang (registered: its TokenizerManager's `rid_to_state`) only from the first step of
  its stream: `async_generate` only builds the stream, and SGLang's `generate_request` registers the rid when
  first iterated, before its first await, then dispatches it to the scheduler; it unregisters it when it ends.
  `register_delay_s` is how long `async_generate` takes to hand the stream back (SGLang's does at once): it
  widens, for tests, the window in which the adapter has asked for the request but SGLang does not know it yet;
- `tokenizer_manager.abort_request(rid)` for a registered request has the scheduler abort every request whose rid
  starts with rid (Scheduler.abort_request: `req.rid.startswith(recv_req.rid)`): a queued one ends with an "abort"
  output, message "Abort in waiting queue", whose text is the whole text so far and whose output_ids is its last
  id (TokenizerManager._handle_abort_req); a running one decodes one more step and ends with that step's delta and
  FINISH_ABORT's {"type": "abort", "message": "Aborted"}. For a request not registered (not started, or ended)
  abort_request does nothing;
- a full waiting queue (max_queued_requests) is an "abort" output with status_code 503 before any token.

Its "model" is a fixed function of the context (`next_token`), so tests know every token it will produce.
"""

from __future__ import annotations

import asyncio
import math
import random
import signal
import threading
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

EOS = 2
SPECIAL = ["<pad>", "<unk>", "<|endoftext|>"]
TRAINING_TEXT = [
    "KVBuffer keeps a checkpoint of each request's state and a buffer of its recent keys and values.",
    "Decode reads the state and never writes it; the buffer is folded in once every chunk.",
    "Gated DeltaNet layers carry a large recurrent state; attention layers keep a cache of keys and values.",
    "Speculative drafts are verified in parallel without copies of the state.",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!",
]


def make_tokenizer(directory: Path, every_byte: bool = True) -> Any:
    """A byte-level BPE tokenizer trained with `tokenizers` on a few sentences (no hub), saved in directory and
    loaded back as transformers' fast tokenizer, the kind SGLang loads from a model directory. every_byte=False
    leaves out the bytes the sentences lack, so that any id sequence decodes to whole (ASCII) characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if every_byte else [])
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(directory)
    return PreTrainedTokenizerFast.from_pretrained(directory)


def next_token(context: Sequence[int], vocab: int) -> int:
    """The stand-in model: a fixed function of the last tokens, never a special token."""
    h = (sum((i + 1) * t for i, t in enumerate(context[-4:])) * 2654435761 + len(context)) % (vocab - len(SPECIAL))
    return len(SPECIAL) + h


def logprob_of(context: Sequence[int], token: int) -> float:
    return -((token * 7 + len(context)) % 50) / 10.0


def continuation(prompt: list[int], n: int, vocab: int) -> list[int]:
    """The n tokens the stand-in model produces after prompt."""
    ids: list[int] = []
    for _ in range(n):
        ids.append(next_token(prompt + ids, vocab))
    return ids


def prompts(rng: random.Random, n: int, vocab: int) -> list[list[int]]:
    """n fresh prompts of 3 to 11 tokens below vocab, none special."""
    return [[rng.randrange(len(SPECIAL), vocab) for _ in range(rng.randrange(3, 12))] for _ in range(n)]


class StandInSGLang:
    """One `sglang.Engine` in place; see the module docstring. `step_s`: time per decode step; `coalesce`:
    decode steps per streamed output; `fail_after`: outputs after which a stream raises (a broken SGLang);
    `register_delay_s`: how long async_generate takes (the module docstring says why)."""

    def __init__(self, tokenizer: Any, *, context_len: int = 1024, max_running_requests: int = 4,
                 max_queued_requests: int | None = None, step_s: float = 0.002, coalesce: int = 1,
                 speculative_draft_tokens: int = 0, fail_after: int | None = None,
                 register_delay_s: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer) + 24  # the model's embedding has more rows than the tokenizer, as Qwen's
        self.step_s, self.coalesce, self.fail_after = step_s, coalesce, fail_after
        self.register_delay_s = register_delay_s
        self.spec = speculative_draft_tokens
        self.server_args = SimpleNamespace(
            max_running_requests=max_running_requests, max_queued_requests=max_queued_requests,
            chunked_prefill_size=2048, disable_cuda_graph=False,
            cuda_graph_config=SimpleNamespace(decode=SimpleNamespace(bs=[1, 2, 4, 8], max_bs=8)), tp_size=1,
            ep_size=1, quantization=None, mem_fraction_static=0.8, attention_backend="triton")
        hf_config = SimpleNamespace(architectures=["Qwen3NextForCausalLM"], linear_layer_ids=[0, 1, 2, 4, 5, 6])
        model_config = SimpleNamespace(context_len=context_len, vocab_size=self.vocab_size, num_hidden_layers=8,
                                       hf_config=hf_config, dtype="torch.bfloat16")
        self.tokenizer_manager = SimpleNamespace(tokenizer=tokenizer, model_config=model_config,
                                                 context_len=context_len, num_reserved_tokens=0,
                                                 max_req_input_len=context_len - 6,
                                                 abort_request=self._abort, auto_create_handle_loop=self._handle_loop)
        self.received: dict[str, dict[str, Any]] = {}  # rid -> the arguments of async_generate
        self.outputs: dict[str, list[int]] = {}  # rid -> every id it produced
        self.texts: dict[str, str] = {}  # rid -> its whole text
        self.registered: set[str] = set()  # requests SGLang knows (rid_to_state): their streams have started
        self.active: set[str] = set()  # requests holding memory (queued or running)
        self.aborted: list[str] = []  # aborts of registered requests (those SGLang acts on)
        self.shut_down = False
        self.sigterm_taken = False  # SGLang's own SIGTERM handler ran (the server's did not)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._running = 0
        self._slots: asyncio.Condition | None = None
        self._abort_requested: set[str] = set()

    def _handle_loop(self) -> None:
        """SGLang's TokenizerManager.auto_create_handle_loop: its output loop, and on the main thread its own SIGTERM
        handler on that loop (SGLang's drains SGLang alone, then its watchdog kills the process tree)."""
        self.loop = asyncio.get_running_loop()
        self._slots = asyncio.Condition()
        if threading.current_thread() is threading.main_thread():
            self.loop.add_signal_handler(signal.SIGTERM, self._sigterm)

    def _sigterm(self) -> None:
        self.sigterm_taken = True

    def _abort(self, rid: str = "", abort_all: bool = False) -> None:
        if rid in self.registered:  # SGLang's abort_request finds no state for any other rid and does nothing
            hit = sorted(other for other in self.active if other.startswith(rid))  # as the scheduler matches
            self._abort_requested.update(hit)
            self.aborted.extend(hit)

    def shutdown(self) -> None:
        self.shut_down = True

    async def async_generate(self, *, input_ids: list[int], sampling_params: dict[str, Any], rid: str,
                             stream: bool, return_logprob: bool) -> AsyncIterator[dict[str, Any]]:
        assert stream and asyncio.get_running_loop() is self.loop, "streams on the loop of the handle loop"
        self.received[rid] = {"input_ids": list(input_ids), "sampling_params": dict(sampling_params),
                              "return_logprob": return_logprob}
        if self.register_delay_s:
            await asyncio.sleep(self.register_delay_s)
        return self._stream(rid, list(input_ids), sampling_params, return_logprob)

    async def _stream(self, rid: str, prompt: list[int], params: dict[str, Any], logprobs: bool
                      ) -> AsyncIterator[dict[str, Any]]:
        """SGLang's generate_request: registers rid at its first step, then queues, runs and streams it."""
        self.registered.add(rid)
        try:
            async for out in self._schedule(rid, prompt, params, logprobs):
                yield out
        finally:
            self.registered.discard(rid)

    async def _schedule(self, rid: str, prompt: list[int], params: dict[str, Any], logprobs: bool
                        ) -> AsyncIterator[dict[str, Any]]:
        assert self._slots is not None
        limit_input = self.tokenizer_manager.max_req_input_len
        if len(prompt) >= limit_input:
            yield self._out("", [], len(prompt), 0, {
                "type": "abort", "message": f"Input length ({len(prompt)} tokens) exceeds the maximum allowed length "
                f"({limit_input} tokens).", "status_code": 400, "err_type": "BadRequestError"})
            return
        params = {**params, "max_new_tokens": min(params["max_new_tokens"], limit_input + 4 - len(prompt))}
        queued = self.active - {r for r in self.active if r in self.outputs}
        limit = self.server_args.max_queued_requests
        if limit is not None and self._running >= self.server_args.max_running_requests and len(queued) >= limit:
            yield self._out("", [], len(prompt), 0, {"type": "abort", "message": "The request queue is full.",
                                                      "status_code": 503, "err_type": None})
            return
        self.active.add(rid)
        try:
            async with self._slots:
                await self._slots.wait_for(lambda: self._running < self.server_args.max_running_requests
                                           or rid in self._abort_requested)
                if rid in self._abort_requested:  # still queued
                    yield {"text": "", "output_ids": [], "meta_info": {
                        "id": rid, "finish_reason": {"type": "abort", "message": "Abort in waiting queue"},
                        "completion_tokens": 0}}
                    return
                self._running += 1
            try:
                async for out in self._decode(rid, prompt, params, logprobs):
                    yield out
            finally:
                async with self._slots:
                    self._running -= 1
                    self._slots.notify_all()
        finally:  # finished, aborted, or the caller closed the stream: its memory is free
            self.active.discard(rid)

    async def _decode(self, rid: str, prompt: list[int], params: dict[str, Any], logprobs: bool
                      ) -> AsyncIterator[dict[str, Any]]:
        ids: list[int] = []
        self.outputs[rid], self.texts[rid] = ids, ""
        stops = set() if params.get("ignore_eos") else set(params.get("stop_token_ids") or ()) | {EOS}
        stop_strings = params.get("stop") or []
        sent_ids, sent_text, outputs = 0, "", 0
        while True:
            finish = None
            for _ in range(self.coalesce):
                await asyncio.sleep(self.step_s)
                aborted = rid in self._abort_requested
                token = next_token(prompt + ids, self.vocab_size)
                if len(ids) == 3 and not params.get("ignore_eos") and prompt[0] % 5 == 0:
                    token = EOS  # some prompts end early on end-of-sequence
                ids.append(token)
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                hit = next((s for s in stop_strings if s in text), None)  # the first listed, as SGLang checks
                if aborted:
                    finish = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
                elif len(ids) >= params["max_new_tokens"]:
                    finish = {"type": "length", "length": params["max_new_tokens"]}
                elif hit is not None:
                    text, finish = text[:text.find(hit)], {"type": "stop", "matched": hit}
                elif token in stops:
                    finish = {"type": "stop", "matched": token}
                self.texts[rid] = text
                if finish:
                    break
            outputs += 1
            if self.fail_after is not None and outputs > self.fail_after:
                raise RuntimeError("the scheduler's socket is closed")
            visible = self.texts[rid]
            if not finish and any(visible.endswith(s[:i]) for s in stop_strings for i in range(1, len(s) + 1)):
                continue  # the tail may begin a stop string: nothing streamed this step
            if not finish:  # held back: an incomplete character
                visible = visible.rstrip("\ufffd")
            delta_ids, delta_text = ids[sent_ids:], visible[len(sent_text):]
            out = self._out(delta_text, delta_ids, len(prompt), len(ids), finish)
            if logprobs:
                out["meta_info"]["output_token_logprobs"] = [
                    (logprob_of(prompt + ids[:i], ids[i]), ids[i], None) for i in range(sent_ids, len(ids))]
            if finish and self.spec:
                steps = math.ceil(len(ids) / 2)
                out["meta_info"].update(spec_num_proposed_drafts=steps * self.spec,
                                        spec_num_correct_drafts=len(ids) - steps)
            sent_ids, sent_text = len(ids), sent_text + delta_text
            yield out
            if finish:
                return

    @staticmethod
    def _out(text: str, ids: list[int], prompt_tokens: int, completion_tokens: int,
             finish: dict[str, Any] | None) -> dict[str, Any]:
        return {"text": text, "output_ids": ids, "meta_info": {
            "id": "", "finish_reason": finish, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}
