"""A scheduler process for SGLang 0.5.17's real `sglang.Engine` on a CPU: the one part of SGLang that cannot run
here (its Scheduler loads the model onto a GPU) replaced, through the Engine's own `run_scheduler_process_func`.

Everything around it is SGLang's: the Engine's launch (ports, the ready handshake, the subprocess watchdog), the
TokenizerManager in the test process, the DetokenizerManager process (`run_detokenizer`: SGLang's, after the CPU
import shims), and the ZMQ messages between them. This process speaks that protocol as SGLang's Scheduler does,
with SGLang's own objects: it receives TokenizedGenerateReqInput and AbortReq, keeps each request as SGLang's `Req`
(whose `update_finish_state` decides length, stop strings and stop tokens, and the abort of a running request one
step later), and streams through SGLang's `SchedulerOutputStreamer` (the BatchTokenIDOutput the detokenizer reads,
with stop-string holdback). Its own parts are small: the model (`sglang_standin.next_token`, one token per running
request per STEP_S, and `logprob_of`), admission (at most max_running_requests running, first come first served),
and the two aborts the Scheduler sends itself, as `Scheduler.abort_request` and `_abort_on_queued_limit` do: a
queued request whose rid starts with the aborted rid ends with a bare AbortReq, and a request beyond
max_queued_requests with an AbortReq of status 503. Not reproduced: prefix caching, chunked prefill, retraction,
the 400 refusal of an over-long prompt.
"""

from __future__ import annotations

import time
from http import HTTPStatus
from types import SimpleNamespace
from typing import Any

from sglang_cpu import import_sglang

import_sglang()  # at import: a spawned child unpickles SGLang's ServerArgs right after importing its target

import zmq  # noqa: E402
from sglang.srt.configs.model_config import ModelConfig  # noqa: E402
from sglang.srt.disaggregation.utils import DisaggregationMode  # noqa: E402
from sglang.srt.entrypoints.engine import Engine  # noqa: E402
from sglang.srt.managers.detokenizer_manager import run_detokenizer_process  # noqa: E402
from sglang.srt.managers.io_struct import AbortReq, TokenizedGenerateReqInput, sock_recv  # noqa: E402
from sglang.srt.managers.schedule_batch import FINISH_ABORT, Req  # noqa: E402
from sglang.srt.managers.scheduler_components.output_sender import SenderWrapper  # noqa: E402
from sglang.srt.managers.scheduler_components.output_streamer import SchedulerOutputStreamer  # noqa: E402
from sglang.srt.runtime_context import publish  # noqa: E402
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm  # noqa: E402
from sglang.srt.utils.hf_transformers_utils import get_tokenizer  # noqa: E402
from sglang.srt.utils.network import get_zmq_socket  # noqa: E402
from sglang_standin import logprob_of, next_token  # noqa: E402

STEP_S = 0.01  # one decode step
MAX_TOTAL_TOKENS = 1 << 16  # the KV pool it reports
RESERVED = 6  # SGLang's max_req_input_len: the context less 6


def run_detokenizer(server_args: Any, port_args: Any) -> None:
    """SGLang's own detokenizer process (this module's import shims SGLang for the CPU first)."""
    run_detokenizer_process(server_args, port_args)


def run_scheduler(server_args: Any, port_args: Any, gpu_id: int, tp_rank: int, attn_cp_rank: int, moe_dp_rank: int,
                  moe_ep_rank: int, pp_rank: int, dp_rank: int | None, pipe_writer: Any) -> None:
    """`run_scheduler_process`'s signature and handshake: the ready message with the limits the tokenizer reads."""
    publish(server_args, role="scheduler")
    scheduler = StandInScheduler(server_args, port_args)
    pipe_writer.send({"status": "ready", "max_total_num_tokens": MAX_TOTAL_TOKENS,
                      "max_req_input_len": scheduler.max_req_input_len, "startup_time": 0.0})
    scheduler.run()


class StandInSchedulerEngine(Engine):
    """SGLang's Engine, its scheduler process this module's (through the Engine's own override points)."""

    run_scheduler_process_func = staticmethod(run_scheduler)
    run_detokenizer_process_func = staticmethod(run_detokenizer)


class StandInScheduler:
    def __init__(self, server_args: Any, port_args: Any) -> None:
        context = zmq.Context(2)
        self.server_args = server_args
        self.recv_from_tokenizer = get_zmq_socket(context, zmq.PULL, port_args.scheduler_input_ipc_name, False)
        self.send_to_tokenizer = SenderWrapper(get_zmq_socket(context, zmq.PUSH, port_args.tokenizer_ipc_name, False))
        self.streamer = SchedulerOutputStreamer(
            send_to_detokenizer=SenderWrapper(get_zmq_socket(context, zmq.PUSH, port_args.detokenizer_ipc_name,
                                                             False)),
            tree_cache=None, ps=SimpleNamespace(dp_rank=0, attn_tp_rank=0), server_args=server_args,
            is_generation=True, spec_algorithm=SpeculativeAlgorithm.NONE, disaggregation_mode=DisaggregationMode.NULL,
            enable_hicache_storage=lambda: False)
        self.model_config = ModelConfig.from_server_args(server_args)
        self.tokenizer = get_tokenizer(server_args.tokenizer_path)
        self.max_req_input_len = self.model_config.context_len - RESERVED
        self.waiting: list[Req] = []
        self.running: list[Req] = []

    def run(self) -> None:
        while True:
            idle = not (self.waiting or self.running)
            while self.recv_from_tokenizer.poll(None if idle else 0):
                self.handle(sock_recv(self.recv_from_tokenizer))
                idle = False
            while self.waiting and len(self.running) < self.server_args.max_running_requests:
                self.running.append(self.waiting.pop(0))
            if self.running:
                time.sleep(STEP_S)
                self.step()

    def handle(self, message: Any) -> None:
        if isinstance(message, TokenizedGenerateReqInput):
            self.add(message)
        elif isinstance(message, AbortReq):
            self.abort(message.rid)

    def add(self, recv: TokenizedGenerateReqInput) -> None:
        req = Req(recv.rid, recv.input_text, recv.input_ids, recv.sampling_params, return_logprob=recv.return_logprob,
                  stream=recv.stream, eos_token_ids=self.model_config.hf_eos_token_id,
                  vocab_size=self.model_config.vocab_size, http_worker_ipc=recv.http_worker_ipc,
                  time_stats=recv.time_stats)
        req.tokenizer = self.tokenizer
        room = self.model_config.context_len - 1 - len(req.origin_input_ids) - 1  # init_req_max_new_tokens
        req.sampling_params.max_new_tokens = max(0, min(req.sampling_params.max_new_tokens, room))
        limit = self.server_args.max_queued_requests
        if limit is not None and len(self.waiting) + 1 > limit:
            self.send_to_tokenizer.send_output(AbortReq(rid=req.rid, finished_reason={
                "type": "abort", "status_code": HTTPStatus.SERVICE_UNAVAILABLE,
                "message": "The request queue is full."}), recv)
            return
        self.waiting.append(req)

    def abort(self, rid: str) -> None:
        for req in [r for r in self.waiting if r.rid.startswith(rid)]:
            self.waiting.remove(req)
            self.send_to_tokenizer.send_output(AbortReq(rid=req.rid), req)
        for req in self.running:
            if not req.finished() and req.rid.startswith(rid):
                req.to_finish = FINISH_ABORT()

    def step(self) -> None:
        """One decode step of every running request, streamed as SGLang's scheduler streams a batch."""
        for req in self.running:
            context = [*req.origin_input_ids, *req.output_ids]
            token = next_token(context, self.model_config.vocab_size)
            req.output_ids.append(token)
            if req.return_logprob:
                req.logprob.output_token_logprobs_val.append(logprob_of(context, token))
                req.logprob.output_token_logprobs_idx.append(token)
            req.update_finish_state()
        self.streamer.stream_output(self.running, any(req.return_logprob for req in self.running))
        self.running = [req for req in self.running if not req.finished()]
