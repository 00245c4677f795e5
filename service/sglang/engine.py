"""`SGLangEngine`: the `Engine` interface (service/engine/api.py) over SGLang's in-process `sglang.Engine`.

SGLang's TokenizerManager runs on the service's event loop, in this process; its schedulers (one per
tensor-parallel rank) and its detokenizer are SGLang's own spawned processes. A request is checked here first
(the native engine's checks, with the model directory's tokenizer and SGLang's context length), so SGLang never
sees a bad one, then runs as `async_generate(input_ids=..., stream=True, rid=...)`. Its context length is the
tighter of the model's (SGLang's TokenizerManager refuses prompt + max_new_tokens beyond it) and the one SGLang's
scheduler allows (`max_req_input_len`: the model's less 6, or less if the KV pool is smaller; the scheduler refuses
a longer prompt, and would cut max_new_tokens short without saying so, a few tokens below the model's end).
The rid SGLang gets is the adapter's own, one fixed-length hex string per request: SGLang's scheduler aborts
every request whose rid starts with the aborted one's, so no rid may be a prefix of another. SGLang streams deltas
(incremental_streaming_output, which settings.py turns on): each output carries the new token ids and text
since the last; the last carries the finish reason. A background task per request pumps SGLang's stream into
the request's queue, so that an engine failure can end every open stream at once.

Cancel (the caller closing the stream early: client cancel, deadline, drain) aborts the request in SGLang,
whose scheduler then frees its KV cache and state slots. SGLang's abort comes back as an output of finish type
"abort" (a running request: after one more decode step, with that step's delta; a queued one: repeating what was
streamed); it ends the stream as "cancelled" and adds nothing. SGLang knows a request only from the first step of
its stream (its TokenizerManager registers the rid there, before it first awaits, and sends it to the scheduler),
and its abort_request does nothing for a rid it does not know; so a cancel that comes before (the pump task not
run yet, or still in async_generate) is kept on the request, and the pump then ends it "cancelled" without ever
starting SGLang's stream.

Failure: an SGLang process that dies makes SGLang's watchdog send SIGQUIT to this process; the adapter takes
that signal (on the main thread's event loop) instead of SGLang's handler, which would kill the process tree.
So does an exception out of SGLang's request path. Either turns the engine unhealthy for good: open requests
end with "error", new ones get EngineFailedError, the `on_failure` callbacks run (health NOT_SERVING).

Failure while SGLang starts: SGLang's parent waits for every scheduler's ready message as long as the scheduler
process is alive, and a scheduler that raised stays alive while its non-daemon threads run; SGLang's own SIGQUIT
handler ends that wait by killing the process tree. Ours (`_launch_failed`) raises `SGLangDied` into the
waiting main thread instead, and `start` then kills the SGLang processes the launch left (they are non-daemon
children: the interpreter's exit would wait for them) and raises EngineFailedError, one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import threading
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kvbuffer.service.engine.api import (
    EngineFailedError,
    EngineStats,
    FinishReason,
    GenerateChunk,
    GenerateRequest,
    InvalidRequestError,
    ModelInfo,
    OverloadedError,
    SamplingParams,
    notify_failure,
)
from kvbuffer.service.engine.validation import validate_request

from .stats import DecodePathCounters, EngineCounters, PluginCounters, request_stats

if TYPE_CHECKING:
    from kvbuffer.service.server.settings import ServiceSettings

log = logging.getLogger(__name__)

SERVICE_UNAVAILABLE = 503  # SGLang's status of an abort when its waiting queue is full (max_queued_requests)
BAD_REQUEST = 400
# Our sampling field -> SGLang's sampling parameter; None: a request argument, not a sampling parameter.
SAMPLING_FIELDS = {"max_new_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p",
                   "top_k": "top_k", "seed": "sampling_seed", "stop_token_ids": "stop_token_ids",
                   "stop_strings": "stop", "ignore_eos": "ignore_eos", "logprobs": None}
_SGLANG_TOP_K_OFF = -1
# SGLang keeps seeds in an int64 tensor (one >= 2**63 fails its scheduler) and hashes them as uint64: our uint64
# seed goes as the int64 of the same 64 bits.
_UINT64 = 2**64


class SGLangRuntime(Protocol):
    """What the adapter uses of `sglang.Engine` (0.5.17): its server args, its TokenizerManager
    (`tokenizer`, `model_config`, `abort_request`, `auto_create_handle_loop`), `async_generate`, `shutdown`."""

    server_args: Any
    tokenizer_manager: Any

    async def async_generate(self, *, input_ids: list[int], sampling_params: dict[str, Any], rid: str,
                             stream: bool, return_logprob: bool) -> AsyncIterator[dict[str, Any]]: ...

    def shutdown(self) -> None: ...


class _ModelTokenizer:
    """The model directory's tokenizer (SGLang's, from transformers) as service/engine/validation.py reads one;
    vocab_size is the model's (its embedding rows), which SGLang checks ids against."""

    eos_token_ids: tuple[int, ...] = ()  # SGLang stops on end-of-sequence itself

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text))  # as SGLang tokenizes a text prompt

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)


@dataclass
class _Request:
    request_id: str
    prompt_tokens: int
    rid: str = field(default_factory=lambda: uuid.uuid4().hex)  # SGLang's: fixed length, so no one's prefix
    chunks: asyncio.Queue[GenerateChunk | Exception] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    completion_tokens: int = 0
    started: bool = False  # SGLang has streamed something (it is past its waiting queue)
    cancelled: bool = False  # by us: SGLang's abort ends it as "cancelled", or _pump never starts it in SGLang


class SGLangEngine:
    def __init__(self, settings: ServiceSettings, launch: Callable[[], SGLangRuntime],
                 counters: DecodePathCounters | None = None) -> None:
        """launch starts SGLang (blocking: it loads the model) and returns it; counters: the KVBuffer plugin's,
        when it is on (decode_mode kvbuffer)."""
        self._settings = settings
        self._launch = launch
        self._counters = EngineCounters(counters, settings.decode_mode)
        self._runtime: SGLangRuntime | None = None
        self._tokenizer: _ModelTokenizer | None = None
        self._context_length = 0
        self._requests: dict[str, _Request] = {}
        self._stopping = False
        self._failed = False
        self._failure_callbacks: list[Callable[[], None]] = []

    # Engine interface
    def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateChunk, None]:
        """Checks now (InvalidRequestError); the request goes to SGLang when iteration starts (OverloadedError or
        EngineFailedError then). Closing the generator before the last chunk aborts the request in SGLang."""
        if self._tokenizer is None:
            raise OverloadedError("the engine has not started")
        ids = validate_request(request, self._tokenizer, self._context_length)
        sampling = sglang_sampling(request.sampling, self._context_length - len(ids),
                                   self._settings.sglang.enable_deterministic_inference)
        return self._generate(request, ids, sampling)

    async def _generate(self, request: GenerateRequest, ids: list[int], sampling: dict[str, Any]
                        ) -> AsyncGenerator[GenerateChunk, None]:
        request_id = request.request_id
        if self._failed:
            raise EngineFailedError("the engine failed (SGLang stopped working) and serves no more requests; "
                                    "retry on another replica")
        if self._stopping or self._runtime is None:
            raise OverloadedError("engine is shut down")
        if request_id in self._requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        limit = self._settings.max_running_requests + self._settings.max_waiting_requests
        if len(self._requests) >= limit:
            raise OverloadedError(f"{len(self._requests)} requests in SGLang (max_running_requests + "
                                  "max_waiting_requests)")
        req = _Request(request_id, len(ids))
        self._requests[request_id] = req
        self._counters.waiting += 1
        req.task = asyncio.create_task(self._pump(req, ids, sampling, request.sampling.logprobs),
                                       name=f"sglang-{request_id}")
        done = False
        try:
            while not done:
                item = await req.chunks.get()
                if isinstance(item, Exception):
                    raise item
                done = item.finish_reason is not None
                yield item
        finally:
            if not done:
                self._abort(req)
            self._forget(req)

    async def cancel(self, request_id: str) -> None:
        """Aborts the request in SGLang; its stream ends with "cancelled" once SGLang has let it go."""
        req = self._requests.get(request_id)
        if req is not None:
            self._abort(req)

    def stats(self) -> EngineStats:
        return self._counters.snapshot()

    @property
    def healthy(self) -> bool:
        return not self._failed

    def on_failure(self, callback: Callable[[], None]) -> None:
        if self._failed:
            callback()
        else:
            self._failure_callbacks.append(callback)

    def model_info(self) -> ModelInfo:
        model_config = self._started().tokenizer_manager.model_config
        hf_config = model_config.hf_config
        return ModelInfo(name=self._settings.model, architecture=hf_config.architectures[0],
                         vocab_size=model_config.vocab_size, max_context_length=self._context_length,
                         num_layers=model_config.num_hidden_layers,
                         num_linear_attention_layers=len(getattr(hf_config, "linear_layer_ids", ())),
                         device="cuda", dtype=_dtype_name(model_config.dtype))

    def config(self) -> dict[str, object]:
        """The settings as served: SGLang's resolved values where SGLang chose them (running requests, context
        length, prefill chunk, CUDA graph batch), and SGLang's own under their names."""
        runtime = self._started()
        server_args = runtime.server_args
        settings = self._settings
        graph_batch = 0 if server_args.disable_cuda_graph else _resolved_graph_batch(server_args)
        return {**settings.model_dump(include={"model", "decode_mode", "buffer_size", "chunk_size",
                                               "speculative_algorithm", "speculative_num_draft_tokens",
                                               "max_waiting_requests", "seed"}),
                "max_running_requests": server_args.max_running_requests,
                "max_num_batched_tokens": max(server_args.chunked_prefill_size or 0, 0),
                "max_context_length": self._context_length, "device": "cuda",
                "dtype": _dtype_name(runtime.tokenizer_manager.model_config.dtype),
                "cuda_graph_max_batch": graph_batch,
                **{f"sglang_{name}": getattr(server_args, name) for name in
                   ("tp_size", "ep_size", "quantization", "mem_fraction_static", "attention_backend")}}

    async def start(self) -> None:
        """Starts SGLang on this thread and event loop: it blocks while SGLang loads the model; SGLang installs
        its signal handlers from the main thread and runs its output loop on the loop that first uses it. A
        failed start (an SGLang process died: SIGQUIT, or SGLang raised) stops what SGLang started and raises
        EngineFailedError."""
        if self._runtime is not None:
            return
        main = threading.current_thread() is threading.main_thread()
        before = _child_pids()
        if main:
            signal.signal(signal.SIGQUIT, _launch_failed)  # SGLang installs it again (custom_sigquit_handler)
        try:
            with _service_logging_kept():
                runtime = self._launch()
            manager = runtime.tokenizer_manager
            manager.auto_create_handle_loop()  # its output loop; in the main thread it also claims SIGTERM, SIGQUIT
            if main:
                asyncio.get_running_loop().add_signal_handler(signal.SIGQUIT, self._fail,
                                                              "an SGLang process died (SIGQUIT from SGLang)")
            else:  # SGLang's own SIGQUIT handling stays
                log.warning("SGLang runs outside the main thread: a dying SGLang process is seen only by its "
                            "requests")
        except (Exception, SGLangDied) as exc:  # SGLang reports a failed start as RuntimeError, its checks as
            # ValueError, ...
            if main:
                signal.signal(signal.SIGQUIT, signal.SIG_IGN)  # the processes being stopped may signal again
            _kill_new_children(before)
            raise EngineFailedError(f"SGLang did not start: {_one_line(exc)}") from exc
        self._context_length = min(manager.context_len - manager.num_reserved_tokens, manager.max_req_input_len)
        self._tokenizer = _ModelTokenizer(manager.tokenizer, manager.model_config.vocab_size)
        self._counters.slots_total = runtime.server_args.max_running_requests
        self._runtime = runtime

    async def shutdown(self) -> None:
        """Ends every request ("cancelled"), aborts them in SGLang, and stops SGLang's processes; later
        `generate` calls raise OverloadedError."""
        self._stopping = True
        for req in list(self._requests.values()):
            self._abort(req)
            req.chunks.put_nowait(self._last_chunk(req, "cancelled", {}))
            self._stop_pump(req)
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            await asyncio.to_thread(runtime.shutdown)

    # one request
    async def _pump(self, req: _Request, ids: list[int], sampling: dict[str, Any], logprobs: bool) -> None:
        """SGLang's outputs for req into its queue, as chunks; an error SGLang raises goes there too."""
        runtime = self._started()
        try:
            stream = await runtime.async_generate(input_ids=ids, sampling_params=sampling, rid=req.rid,
                                                  stream=True, return_logprob=logprobs)
            if req.cancelled:  # before SGLang knew the request, so its abort did nothing: never start it
                req.chunks.put_nowait(self._last_chunk(req, "cancelled", {}))
                return
            async for out in stream:
                chunk = self._chunk(req, out, logprobs)
                req.chunks.put_nowait(chunk)
                if chunk.finish_reason is not None:
                    return
            raise RuntimeError(f"SGLang ended request {req.request_id} without a finish reason")
        except (InvalidRequestError, OverloadedError) as exc:  # refused before anything was streamed
            req.chunks.put_nowait(exc)
        except ValueError as exc:  # SGLang's TokenizerManager refuses a request with ValueError
            req.chunks.put_nowait(InvalidRequestError("request", f"SGLang refuses it: {_one_line(exc)}"))
        except Exception as exc:
            log.exception("SGLang failed on request %s (rid %s)", req.request_id, req.rid)
            self._fail(f"SGLang raised {type(exc).__name__} on a request: {_one_line(exc)}")

    def _chunk(self, req: _Request, out: dict[str, Any], logprobs: bool) -> GenerateChunk:
        """One SGLang output (a delta) as a chunk; raises OverloadedError or InvalidRequestError when SGLang
        refused the request before streaming anything."""
        meta = out["meta_info"]
        finish = meta.get("finish_reason")
        if not req.started:
            req.started = True
            self._counters.started()
        if finish is not None and finish.get("type") == "abort":
            return self._aborted(req, finish, meta)
        ids = list(out["output_ids"])
        req.completion_tokens += len(ids)
        self._counters.decoded(len(ids))
        lps = [entry[0] for entry in meta.get("output_token_logprobs", ())] if logprobs else None
        if finish is None:
            return GenerateChunk(ids, out["text"], lps, prompt_tokens=req.prompt_tokens,
                                 completion_tokens=req.completion_tokens)
        reason: FinishReason = "length" if finish.get("type") == "length" else "stop"
        return dataclasses.replace(self._last_chunk(req, reason, meta), token_ids=ids, text=out["text"],
                                   logprobs=lps)

    def _aborted(self, req: _Request, finish: dict[str, Any], meta: dict[str, Any]) -> GenerateChunk:
        if req.cancelled:
            return self._last_chunk(req, "cancelled", meta)
        message = finish.get("message") or "aborted by SGLang"
        if req.completion_tokens == 0 and finish.get("status_code") == SERVICE_UNAVAILABLE:
            raise OverloadedError(f"SGLang: {message} (max_waiting_requests)")
        if req.completion_tokens == 0 and finish.get("status_code") == BAD_REQUEST:
            raise InvalidRequestError("request", f"SGLang refuses it: {message}")
        log.warning("SGLang aborted request %s: %s", req.request_id, message)
        return self._last_chunk(req, "error", meta)

    def _last_chunk(self, req: _Request, reason: FinishReason, meta: dict[str, Any]) -> GenerateChunk:
        stats = request_stats(self._settings.decode_mode, req.completion_tokens, meta)
        self._counters.finished(stats)
        return GenerateChunk([], "", None, reason, req.prompt_tokens, req.completion_tokens, stats)

    def _abort(self, req: _Request) -> None:
        if not req.cancelled and self._runtime is not None:
            req.cancelled = True
            self._runtime.tokenizer_manager.abort_request(rid=req.rid)

    def _forget(self, req: _Request) -> None:
        if self._requests.pop(req.request_id, None) is not None:
            self._counters.left(req.started)
        self._stop_pump(req)

    @staticmethod
    def _stop_pump(req: _Request) -> None:
        if req.task is not None and not req.task.done():
            req.task.cancel()  # closes SGLang's stream, which drops SGLang's state of the request

    # failure
    def _fail(self, reason: str) -> None:
        """SGLang is broken for good: every open stream ends with "error", then the callbacks (health) run."""
        if self._failed:
            return
        self._failed = True
        log.error("SGLang failed: %s; ending %d requests, refusing new ones", reason, len(self._requests))
        callbacks, self._failure_callbacks = self._failure_callbacks, []
        notify_failure(callbacks)
        for req in list(self._requests.values()):
            req.chunks.put_nowait(GenerateChunk([], "", finish_reason="error", prompt_tokens=req.prompt_tokens,
                                                completion_tokens=req.completion_tokens))
            self._stop_pump(req)

    def _started(self) -> SGLangRuntime:
        if self._runtime is None:
            raise OverloadedError("the engine has not started or is shut down")
        return self._runtime


def sglang_sampling(params: SamplingParams, room: int, deterministic: bool) -> dict[str, Any]:
    """Our sampling parameters as SGLang's, one to one. room: tokens left in the context after the prompt; the
    native engine ends such a request by "length" at the context's end, SGLang would refuse it, so
    max_new_tokens is capped there. A field without a SGLang equivalent that is not at its default is refused
    (InvalidRequestError naming it), never dropped; so are stop_token_ids with ignore_eos, which SGLang ignores
    (its Req._check_token_based_finish returns before looking at them)."""
    defaults = type(params)()
    for f in dataclasses.fields(params):
        if f.name not in SAMPLING_FIELDS and getattr(params, f.name) != getattr(defaults, f.name):
            raise InvalidRequestError(f"sampling.{f.name}", "engine sglang has no equivalent")
    if params.seed is not None and params.temperature > 0 and not deterministic:
        raise InvalidRequestError("sampling.seed", "engine sglang repeats seeded sampling only with "
                                                   "sglang.enable_deterministic_inference on")
    if params.ignore_eos and params.stop_token_ids:
        raise InvalidRequestError("sampling.stop_token_ids", "engine sglang ignores them when ignore_eos is set")
    seed = None if params.seed is None else params.seed - _UINT64 * (params.seed >= _UINT64 // 2)
    values = {"max_new_tokens": min(params.max_new_tokens, room), "temperature": params.temperature,
              "top_p": params.top_p, "top_k": params.top_k or _SGLANG_TOP_K_OFF, "seed": seed,
              "stop_token_ids": list(params.stop_token_ids) or None, "stop_strings": list(params.stop_strings) or None,
              "ignore_eos": params.ignore_eos}
    return {SAMPLING_FIELDS[name]: value for name, value in values.items() if value is not None}


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _resolved_graph_batch(server_args: Any) -> int:
    """The largest decode batch SGLang captures as a CUDA graph (its resolved cuda_graph_config)."""
    decode = getattr(getattr(server_args, "cuda_graph_config", None), "decode", None)
    sizes = getattr(decode, "bs", None) or ()
    return int(max(sizes, default=getattr(decode, "max_bs", None) or 0))


def _one_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def build_sglang_engine(settings: ServiceSettings) -> SGLangEngine:
    """The adapter over a real `sglang.Engine` for settings; SGLang's ServerArgs checks them now
    (SGLangSettingsError naming the setting), SGLang starts in `start()`."""
    import torch

    from .settings import COUNTERS_DIR_ENV, SGLangSettingsError, build_server_args, plugin_environment

    visible = torch.cuda.device_count()
    if visible < settings.sglang.tp_size:
        raise SGLangSettingsError(f"sglang.tp_size: {settings.sglang.tp_size} GPU(s) needed, {visible} visible")
    server_args = build_server_args(settings, custom_sigquit_handler=_launch_failed)

    environment = plugin_environment(settings, os.environ)

    def launch() -> SGLangRuntime:
        import sglang

        os.environ.update(environment)  # SGLang's processes inherit it
        return sglang.Engine(server_args=server_args)

    return SGLangEngine(settings, launch, PluginCounters(os.environ.get(COUNTERS_DIR_ENV)
                                                        or environment[COUNTERS_DIR_ENV]))


@contextlib.contextmanager
def _service_logging_kept() -> Iterator[None]:
    """Gives the service its log back after SGLang's start. `sglang.Engine` sets up logging for its whole process,
    which is the service's (`configure_logger`: `basicConfig(force=True)` at SGLang's level, one step quieter than
    ours, in SGLang's format): without this every INFO line of the service was dropped from then on, the "serving
    ... on" line that says the server is up among them. The service's handlers and level come back; SGLang's
    loggers keep the level SGLang set."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        if root.level != level:
            logging.getLogger("sglang").setLevel(root.level)
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
            handler.close()
        for handler in [h for h in handlers if h not in root.handlers]:
            root.addHandler(handler)
        root.setLevel(level)


class SGLangDied(BaseException):
    """Raised by the SIGQUIT handler into the thread starting SGLang. A BaseException, so that no `except
    Exception` of SGLang's start-up swallows it."""


def _launch_failed(signum: int, frame: object) -> None:
    """SGLang's SIGQUIT while it starts: a process of it died or hit an exception (logged above by SGLang)."""
    raise SGLangDied("an SGLang process died or failed while SGLang started (SIGQUIT from SGLang; its log says "
                     "why)")


def _child_pids() -> set[int]:
    import psutil

    return {child.pid for child in psutil.Process().children(recursive=True)}


def _kill_new_children(before: set[int]) -> None:
    """Kills this process's descendants that are not in `before`: what a failed SGLang start left running."""
    import psutil

    left = [child for child in psutil.Process().children(recursive=True) if child.pid not in before]
    for child in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(left, timeout=10)
    if left:
        log.error("stopped %d SGLang process(es) left by the failed start", len(left))
