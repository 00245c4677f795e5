"""The service's settings as SGLang server arguments, checked by SGLang's own ServerArgs.

`check_settings` runs with the other settings checks (no SGLang import, no GPU): what engine sglang cannot
take at all. `build_server_args` runs at start-up: it constructs SGLang's real ServerArgs, whose resolution
reads the model's config and the GPUs, and SGLang's `check_server_args`; whatever SGLang refuses stops
start-up with one line naming the kvbuffer setting that brought the refused value in (found by adding the
arguments one at a time, in order, until SGLang refuses).

Mapping, kvbuffer setting -> SGLang argument:
- model -> model_path; device -> cuda; dtype -> dtype; seed -> random_seed
- max_running_requests -> max_running_requests; max_waiting_requests -> max_queued_requests
- max_context_length -> context_length, cuda_graph_max_batch -> cuda_graph_max_bs_decode (0:
  disable_cuda_graph): only when set, else SGLang's own (the model's context length; by GPU memory)
- speculative_algorithm -> speculative_algorithm (upper case); speculative_num_draft_tokens (drafts proposed
  per step) -> speculative_num_draft_tokens + 1 (SGLang counts the verified token too); for nextn and eagle
  also a chain of that many draft steps (speculative_num_steps, speculative_eagle_topk 1) unless the sglang
  group sets those; for ngram a chain too (speculative_ngram_min/max_bfs_breadth 1) unless extra_server_args
  sets them
- sglang.<name> -> <name> (cuda_graph_bs -> cuda_graph_bs_decode); sglang.extra_server_args.<name> -> <name>,
  the text parsed by SGLang's command-line parser as `sglang serve --<name> <text>` would
- decode_mode, buffer_size, chunk_size, speculative_num_draft_tokens: the KVBuffer plugin's, carried to
  SGLang's processes in its environment variables (plugin_environment)
Fixed by the adapter: incremental_streaming_output (chunks are deltas), skip_tokenizer_init off (SGLang
tokenizes and detokenizes with the model directory's tokenizer); log_level one step quieter for SGLang (its info
logs batches); with decode_mode kvbuffer, mamba_radix_cache_strategy extra_buffer (SGLang's own choice for
Qwen3-Next with the overlap scheduler on; the plugin serves the radix cache with that strategy only), or with
speculative decoding disable_radix_cache (the plugin serves none while speculating); other values in
extra_server_args are refused by the plugin, naming them.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import tempfile
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvbuffer.service.engine.config import DEFAULT_MODEL
from kvbuffer.service.server.settings import SettingsError

if TYPE_CHECKING:
    from kvbuffer.service.server.settings import ServiceSettings
    from sglang.srt.server_args import ServerArgs

PLUGIN_NAME = "kvbuffer"  # its entry point in group sglang.srt.plugins (pyproject.toml)
PLUGIN_ENV_PREFIX = "KVBUFFER_SGLANG_"  # the plugin's settings (kvbuffer.service.sglang.plugin.settings)
COUNTERS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # where SGLang's processes leave the plugin's counters
# Settings of the native engine only: with engine sglang, SGLang's equivalents are in the sglang group.
NATIVE_ONLY = {"memory_budget_bytes": "sglang.mem_fraction_static",
               "max_num_batched_tokens": "sglang.chunked_prefill_size"}
_DRAFT_MODELS = ("nextn", "eagle", "eagle3")  # speculative algorithms that draft with a model (SGLang's EAGLE family)
_SPECULATIVE_KNOBS = ("speculative_num_steps", "speculative_eagle_topk", "speculative_draft_model_path")
_SGLANG_NAMES = {"cuda_graph_bs": "cuda_graph_bs_decode"}  # sglang group names that SGLang spells otherwise
# SGLang logs every few decode batches at info: that is our debug.
_SGLANG_LOG_LEVEL = {"debug": "info", "info": "warning"}
# SGLang arguments that shared settings (or the adapter: "engine") set; extra_server_args may not set them.
_MAPPED = {"model_path": "model", "device": "device", "incremental_streaming_output": "engine",
           "skip_tokenizer_init": "engine", "log_level": "log_level", "dtype": "dtype", "random_seed": "seed",
           "max_running_requests": "max_running_requests", "max_queued_requests": "max_waiting_requests",
           "context_length": "max_context_length", "cuda_graph_max_bs_decode": "cuda_graph_max_batch",
           "disable_cuda_graph": "cuda_graph_max_batch", "speculative_algorithm": "speculative_algorithm",
           "speculative_num_draft_tokens": "speculative_num_draft_tokens"}


class SGLangSettingsError(SettingsError):
    """Settings SGLang refuses; the message is one line that starts with the kvbuffer setting's name."""


@dataclasses.dataclass(frozen=True)
class ServerArg:
    """One SGLang server argument and the kvbuffer setting it comes from (named when SGLang refuses it)."""

    setting: str
    name: str
    value: Any


def check_settings(settings: ServiceSettings) -> None:
    """What engine sglang refuses without asking SGLang; ValueError naming the setting."""
    from kvbuffer.kernels.validate import check_settings as check_buffer
    from kvbuffer.service.server.settings import ServiceSettings, SGLangSettings

    if settings.model.startswith(DEFAULT_MODEL.split(":")[0] + ":"):
        raise ValueError(f"model: engine sglang serves a Hugging Face model directory; {settings.model} runs on "
                         "engine native")
    if settings.device == "cpu":
        raise ValueError("device: engine sglang runs on CUDA GPUs (device auto or cuda)")
    for name, instead in NATIVE_ONLY.items():
        if getattr(settings, name) != ServiceSettings.model_fields[name].default:
            raise ValueError(f"{name}: a setting of engine native; with engine sglang use {instead}")
    speculating = settings.speculative_algorithm != "none"
    for knob in _SPECULATIVE_KNOBS:
        if getattr(settings.sglang, knob) is not None and not speculating:
            raise ValueError(f"sglang.{knob}: only with speculative decoding (speculative_algorithm is none)")
    if settings.speculative_algorithm in ("eagle", "eagle3") and settings.sglang.speculative_draft_model_path is None:
        raise ValueError(f"speculative_algorithm: {settings.speculative_algorithm} needs a draft model "
                         "(sglang.speculative_draft_model_path); nextn uses the model's own MTP layers")
    owned = {_SGLANG_NAMES.get(name, name): f"sglang.{name}" for name in SGLangSettings.model_fields} | _MAPPED
    for name in settings.sglang.extra_server_args:
        if name in owned:
            raise ValueError(f"sglang.extra_server_args.{name}: kvbuffer sets {name} from setting {owned[name]}")
    if settings.decode_mode == "kvbuffer":
        try:
            check_buffer(settings.buffer_size, settings.chunk_size, verified_block(settings))
        except ValueError as exc:
            raise ValueError(f"buffer_size: {exc} (SGLang verifies each speculative_num_draft_tokens drafts "
                             "together with the token before them)") from None


def verified_block(settings: ServiceSettings) -> int:
    """Tokens SGLang verifies in one step when speculating (its speculative_num_draft_tokens), else 0."""
    return settings.speculative_num_draft_tokens + 1 if settings.speculative_algorithm != "none" else 0


def plugin_environment(settings: ServiceSettings, environ: Mapping[str, str]) -> dict[str, str]:
    """The environment variables to set before SGLang starts (its processes inherit them): the KVBuffer plugin's
    settings (KVBUFFER_SGLANG_*; decode_mode recurrent keeps SGLang's own decode and only counts), the plugin on
    SGLang's allow-list where one is set, and a directory for the plugin's counters (PROMETHEUS_MULTIPROC_DIR)."""
    env = {f"{PLUGIN_ENV_PREFIX}DECODE_MODE": settings.decode_mode,
           f"{PLUGIN_ENV_PREFIX}BUFFER_SIZE": str(settings.buffer_size),
           f"{PLUGIN_ENV_PREFIX}CHUNK_SIZE": str(settings.chunk_size),
           f"{PLUGIN_ENV_PREFIX}SPECULATIVE_NUM_DRAFT_TOKENS": str(verified_block(settings))}
    allowed = [name.strip() for name in environ.get("SGLANG_PLUGINS", "").split(",") if name.strip()]
    if allowed and PLUGIN_NAME not in allowed:
        env["SGLANG_PLUGINS"] = ",".join([*allowed, PLUGIN_NAME])
    if not environ.get(COUNTERS_DIR_ENV):
        env[COUNTERS_DIR_ENV] = tempfile.mkdtemp(prefix="kvbuffer-sglang-counters-")
    return env


def server_arguments(settings: ServiceSettings) -> list[ServerArg]:
    """The SGLang arguments the settings make, the model first; extra_server_args values still as text."""
    given = settings.model_fields_set
    args = [ServerArg("model", "model_path", settings.model),
            ServerArg("device", "device", "cuda"),
            ServerArg("engine", "incremental_streaming_output", True),
            ServerArg("engine", "skip_tokenizer_init", False),
            ServerArg("log_level", "log_level", _SGLANG_LOG_LEVEL.get(settings.log_level, settings.log_level)),
            ServerArg("dtype", "dtype", settings.dtype),
            ServerArg("seed", "random_seed", settings.seed),
            ServerArg("max_running_requests", "max_running_requests", settings.max_running_requests),
            ServerArg("max_waiting_requests", "max_queued_requests", settings.max_waiting_requests)]
    if settings.decode_mode == "kvbuffer":  # the radix cache strategy the plugin serves, none while speculating
        args.append(ServerArg("decode_mode", "disable_radix_cache", True) if settings.speculative_algorithm != "none"
                    else ServerArg("decode_mode", "mamba_radix_cache_strategy", "extra_buffer"))
    if "max_context_length" in given:
        args.append(ServerArg("max_context_length", "context_length", settings.max_context_length))
    if "cuda_graph_max_batch" in given:
        args.append(ServerArg("cuda_graph_max_batch", "disable_cuda_graph", True) if settings.cuda_graph_max_batch == 0
                    else ServerArg("cuda_graph_max_batch", "cuda_graph_max_bs_decode", settings.cuda_graph_max_batch))
    group = settings.sglang
    drafts = settings.speculative_num_draft_tokens
    if settings.speculative_algorithm != "none":
        args += [ServerArg("speculative_algorithm", "speculative_algorithm", settings.speculative_algorithm.upper()),
                 ServerArg("speculative_num_draft_tokens", "speculative_num_draft_tokens", drafts + 1)]
    if settings.speculative_algorithm in _DRAFT_MODELS:  # unless told otherwise, a chain of `drafts` tokens
        if group.speculative_num_steps is None:
            args.append(ServerArg("speculative_num_draft_tokens", "speculative_num_steps", drafts))
        if group.speculative_eagle_topk is None:
            args.append(ServerArg("speculative_algorithm", "speculative_eagle_topk", 1))
    if settings.speculative_algorithm == "ngram":  # a chain as well (SGLang's default breadth 10 makes trees)
        args += [ServerArg("speculative_algorithm", f"speculative_ngram_{bound}_bfs_breadth", 1)
                 for bound in ("min", "max")]
    for name in type(group).model_fields:
        value = getattr(group, name)
        if name != "extra_server_args" and value is not None and value is not False:
            args.append(ServerArg(f"sglang.{name}", _SGLANG_NAMES.get(name, name), value))
    return args + [ServerArg(f"sglang.extra_server_args.{name}", name, text)
                   for name, text in group.extra_server_args.items()]


def build_server_args(settings: ServiceSettings, **runtime: Any) -> ServerArgs:
    """SGLang's resolved ServerArgs for settings (runtime: arguments without a setting, e.g. callbacks).

    Raises SGLangSettingsError naming the setting whose value SGLang refuses.
    """
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser(add_help=False)
    ServerArgs.add_cli_args(parser)
    actions = {action.dest: action for action in parser._actions}
    args = [_parsed(arg, actions) for arg in server_arguments(settings)]
    fields = {field.name for field in dataclasses.fields(ServerArgs)}
    for arg in args:
        if arg.name not in fields:
            raise SGLangSettingsError(f"{arg.setting}: {arg.name} is not a server argument of SGLang")

    def construct(prefix: Sequence[ServerArg]) -> ServerArgs:
        server_args = ServerArgs(**{a.name: a.value for a in prefix}, **runtime)
        server_args.check_server_args()
        return server_args

    try:
        return construct(args)
    except Exception as exc:  # SGLang refuses with ValueError, AssertionError, OSError, ...
        culprit = _first_refused(args, construct)
        raise SGLangSettingsError(f"{culprit.setting}: SGLang refuses {culprit.name}={culprit.value!r}: "
                                  f"{_one_line(exc)}") from None


def _parsed(arg: ServerArg, actions: dict[str, argparse.Action]) -> ServerArg:
    """arg with its value as SGLang's command-line parser takes it: extra_server_args' text converted by the
    argument's own type, every value checked against the argument's choices."""
    action = actions.get(arg.name)
    if action is None:
        return arg  # not on SGLang's command line (e.g. a runtime field): the dataclass check names it
    value = _from_text(arg, action) if arg.setting.startswith("sglang.extra_server_args.") else arg.value
    for item in value if isinstance(value, list) else [value]:
        if action.choices is not None and item not in action.choices:
            raise SGLangSettingsError(f"{arg.setting}: {item!r} is not one of SGLang's choices for {arg.name} "
                                      f"({', '.join(map(str, action.choices))})")
    return dataclasses.replace(arg, value=value)


def _from_text(arg: ServerArg, action: argparse.Action) -> Any:
    text = arg.value
    if action.nargs == 0:  # a switch: store_true / store_false
        if text.lower() not in ("true", "false"):
            raise SGLangSettingsError(f"{arg.setting}: {arg.name} is a switch: true or false, got {text!r}")
        return text.lower() == "true"
    convert: Callable[[str], Any] = action.type if callable(action.type) else str
    try:
        if action.nargs in ("*", "+") or isinstance(action.nargs, int):
            return [convert(item) for item in text.replace(",", " ").split()]
        return convert(text)
    except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
        raise SGLangSettingsError(f"{arg.setting}: SGLang cannot read {text!r} as {arg.name}: {exc}") from None


def _first_refused(args: Sequence[ServerArg], construct: Callable[[Sequence[ServerArg]], Any]) -> ServerArg:
    """The argument whose addition makes SGLang refuse: bisection over prefixes (the full list is refused)."""

    def refused(n: int) -> bool:
        try:
            construct(args[:n])
        except Exception:
            return True
        return False

    return args[min(bisect.bisect_left(range(1, len(args) + 1), True, key=refused), len(args) - 1)]


def _one_line(exc: BaseException) -> str:
    """The first line of exc's message; for a bare assertion, the asserting line of SGLang's source."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines:
        return lines[0]
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{type(exc).__name__} in {Path(frame.filename).name}:{frame.lineno}: {frame.line}"
