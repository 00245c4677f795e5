"""Engine sglang's settings: what is refused without SGLang (one line naming the setting), the CLI and environment
of the `sglang` group, and the mapping onto SGLang's real ServerArgs (sglang 0.5.17 installed with --no-deps;
skipped with the reason where it is not importable), whose refusals name the kvbuffer setting at fault."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from kvbuffer.service.model import tiny
from kvbuffer.service.server.settings import SettingsError, load_settings
from kvbuffer.service.sglang.settings import SGLangSettingsError, build_server_args, plugin_environment
from sglang_cpu import gpu_free_server_args

SGLANG = {"engine": "sglang", "model": "/models/qwen3-next"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen3-Next config.json as transformers writes one (what SGLang's ServerArgs reads of the model), with
    SGLang's full_attention_interval and a context length to refuse beyond."""
    path = tmp_path_factory.mktemp("qwen3-next")
    config = {**tiny.CONFIG, "full_attention_interval": 4, "max_position_embeddings": 8192,
              "torch_dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(("settings", "message"), [
    ({"model": "embedded:tiny-qwen3-next"}, "model: engine sglang serves a Hugging Face model directory"),
    ({"device": "cpu"}, "device: engine sglang runs on CUDA GPUs"),
    ({"memory_budget_bytes": 2**30}, "memory_budget_bytes: a setting of engine native; with engine sglang use "
                                     "sglang.mem_fraction_static"),
    ({"max_num_batched_tokens": 512}, "max_num_batched_tokens: a setting of engine native"),
    ({"speculative_algorithm": "eagle"}, "speculative_algorithm: eagle needs a draft model"),
    ({"sglang": {"speculative_num_steps": 2}}, "sglang.speculative_num_steps: only with speculative decoding"),
    ({"sglang": {"tp_size": 4, "ep_size": 3}}, "sglang.ep_size: must divide sglang.tp_size (4), got 3"),
    ({"sglang": {"extra_server_args": {"context_length": "100"}}},
     "sglang.extra_server_args.context_length: kvbuffer sets context_length from setting max_context_length"),
    ({"sglang": {"extra_server_args": {"tp_size": "2"}}},
     "sglang.extra_server_args.tp_size: kvbuffer sets tp_size from setting sglang.tp_size"),
    ({"sglang": {"extra_server_args": "{not json"}}, "sglang.extra_server_args: Value error, not a JSON object"),
    ({"speculative_algorithm": "nextn", "buffer_size": 20, "chunk_size": 16, "speculative_num_draft_tokens": 4},
     "buffer_size: chunk_size + speculative_num_draft_tokens (16 + 5) must be <= buffer_size (20)"),
])
def test_what_engine_sglang_cannot_take_is_refused_naming_the_setting(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings({**SGLANG, **settings})
    assert len(str(error.value).splitlines()) == 1
    assert str(error.value).replace("Value error, ", "").startswith(message.replace("Value error, ", ""))


@pytest.mark.parametrize(("settings", "message"), [
    ({"sglang": {"tp_size": 2}}, "sglang: SGLang's settings need engine sglang"),
    ({"speculative_algorithm": "nextn"}, "speculative_algorithm: nextn needs engine sglang"),
])
def test_engine_native_refuses_sglang_settings(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(SettingsError, match=f"^{message}"):
        load_settings(settings)


def test_the_sglang_group_from_environment_file_and_flags(tmp_path: Path) -> None:
    env = {**os.environ, "KVBUFFER_ENGINE": "sglang", "KVBUFFER_MODEL": "/models/x", "KVBUFFER_SGLANG__TP_SIZE": "4",
           "KVBUFFER_SGLANG__EXTRA_SERVER_ARGS": '{"attention_backend": "triton"}'}
    config = tmp_path / "settings.yaml"
    config.write_text("sglang:\n  ep_size: 2\n  quantization: fp8\n")
    script = ("import sys; from kvbuffer.service.cli import build_parser, settings_values; "
              "from kvbuffer.service.server.settings import ServiceSettings, load_settings; "
              "args = build_parser().parse_args(sys.argv[1:]); "
              "print(load_settings(settings_values(args, ServiceSettings), args.config).sglang.model_dump_json())")
    out = subprocess.run([sys.executable, "-c", script, "serve", "--config", str(config), "--sglang-cuda-graph-bs", "8",
                          "--sglang-cuda-graph-bs", "16", "--sglang-mem-fraction-static", "0.75"],
                         env=env, capture_output=True, text=True, check=True).stdout
    group = json.loads(out)
    assert (group["tp_size"], group["ep_size"], group["quantization"], group["cuda_graph_bs"],
            group["mem_fraction_static"], group["extra_server_args"]) == (4, 2, "fp8", [8, 16], 0.75,
                                                                          {"attention_backend": "triton"})


def test_serve_help_documents_the_sglang_settings() -> None:
    out = subprocess.run([sys.executable, "-m", "kvbuffer.service.cli", "serve", "--help"], capture_output=True,
                         text=True, check=True, env={**os.environ, "COLUMNS": "200"}).stdout
    for flag, env in (("--engine", "KVBUFFER_ENGINE"), ("--sglang-tp-size", "KVBUFFER_SGLANG__TP_SIZE"),
                      ("--sglang-quantization", "KVBUFFER_SGLANG__QUANTIZATION"),
                      ("--sglang-extra-server-args", "KVBUFFER_SGLANG__EXTRA_SERVER_ARGS")):
        assert flag in out and env in out
    assert "one of native," in out and "one of none, ngram, nextn, eagle, eagle3" in out


def test_serve_without_a_gpu_stops_with_one_line() -> None:
    result = subprocess.run([sys.executable, "-m", "kvbuffer.service.cli", "serve", "--engine", "sglang", "--model",
                             "/models/none", "--port", "0", "--metrics-port", "0", "--host", "127.0.0.1"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == ("kvbuffer serve: error: sglang.tp_size: 1 GPU(s) needed, "
                                                      "0 visible")


def test_plugin_environment_carries_the_plugin_settings(tmp_path: Path) -> None:
    settings = load_settings({**SGLANG, "buffer_size": 40, "chunk_size": 16, "speculative_algorithm": "nextn",
                              "speculative_num_draft_tokens": 3})
    env = plugin_environment(settings, {"SGLANG_PLUGINS": "other", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert env == {"KVBUFFER_SGLANG_DECODE_MODE": "kvbuffer", "KVBUFFER_SGLANG_BUFFER_SIZE": "40",
                   "KVBUFFER_SGLANG_CHUNK_SIZE": "16", "KVBUFFER_SGLANG_SPECULATIVE_NUM_DRAFT_TOKENS": "4",
                   "SGLANG_PLUGINS": "other,kvbuffer"}
    fresh = plugin_environment(load_settings({**SGLANG, "decode_mode": "recurrent"}), {})
    assert fresh["KVBUFFER_SGLANG_DECODE_MODE"] == "recurrent" and "SGLANG_PLUGINS" not in fresh
    assert Path(fresh["PROMETHEUS_MULTIPROC_DIR"]).is_dir()


# SGLang's real ServerArgs


def resolve(model_dir: Path, **settings: Any) -> Any:
    with gpu_free_server_args():
        return build_server_args(load_settings({**SGLANG, "model": str(model_dir), **settings}))


def refusal(model_dir: Path, **settings: Any) -> str:
    with pytest.raises(SGLangSettingsError) as error:
        resolve(model_dir, **settings)
    assert len(str(error.value).splitlines()) == 1
    return str(error.value)


def test_settings_reach_sglang_as_its_server_args(model_dir: Path) -> None:
    rng = random.Random()
    running, waiting, seed = rng.randrange(1, 512), rng.randrange(1, 512), rng.randrange(2**31)
    args = resolve(model_dir, max_running_requests=running, max_waiting_requests=waiting, seed=seed,
                   dtype="bfloat16", sglang={"tp_size": 2, "ep_size": 2, "quantization": "fp8",
                                             "mem_fraction_static": 0.7, "chunked_prefill_size": 1024,
                                             "cuda_graph_bs": [1, 8, 32],
                                             "extra_server_args": {"attention_backend": "triton",
                                                                   "disable_overlap_schedule": "true"}})
    assert (args.model_path, args.max_running_requests, args.max_queued_requests, args.random_seed, args.dtype,
            args.tp_size, args.ep_size, args.quantization, args.mem_fraction_static, args.chunked_prefill_size,
            args.cuda_graph_bs_decode, args.attention_backend, args.disable_overlap_schedule,
            args.incremental_streaming_output, args.skip_tokenizer_init) == (
        str(model_dir), running, waiting, seed, "bfloat16", 2, 2, "fp8", 0.7, 1024, [1, 8, 32], "triton", True, True,
        False)
    assert args.context_length is None  # unset: the model's own
    assert resolve(model_dir, max_context_length=2048).context_length == 2048
    assert resolve(model_dir, cuda_graph_max_batch=0).disable_cuda_graph
    assert resolve(model_dir, cuda_graph_max_batch=48).cuda_graph_max_bs_decode == 48


def test_decode_mode_kvbuffer_keeps_sglang_radix_cache_unless_speculating(model_dir: Path) -> None:
    """SGLang's default radix cache for Qwen3-Next (overlap scheduler on: extra_buffer) is the strategy the plugin
    serves, which decode_mode kvbuffer asks for also with the overlap scheduler off (SGLang would pick no_buffer);
    with speculative decoding the plugin refuses the radix cache, so the adapter turns it off there."""
    for mode in ("kvbuffer", "recurrent"):
        args = resolve(model_dir, decode_mode=mode)
        assert not args.disable_radix_cache and args.mamba_radix_cache_strategy == "extra_buffer", mode
    no_overlap = {"sglang": {"extra_server_args": {"disable_overlap_schedule": "true"}}}
    assert resolve(model_dir, **no_overlap).mamba_radix_cache_strategy == "extra_buffer"
    assert resolve(model_dir, decode_mode="recurrent", **no_overlap).mamba_radix_cache_strategy == "no_buffer"
    assert resolve(model_dir, speculative_algorithm="nextn", buffer_size=64).disable_radix_cache
    assert not resolve(model_dir, speculative_algorithm="nextn", buffer_size=64, decode_mode="recurrent"
                       ).disable_radix_cache


def test_speculation_is_a_chain_of_the_draft_tokens_that_the_plugin_serves(model_dir: Path) -> None:
    from kvbuffer.service.sglang.plugin.checks import server_args_problem
    from kvbuffer.service.sglang.plugin.settings import PluginSettings

    drafts = random.randrange(1, 8)
    plugin = PluginSettings.from_env(plugin_environment(load_settings({
        **SGLANG, "speculative_algorithm": "ngram", "speculative_num_draft_tokens": drafts, "buffer_size": 64}), {}))
    args = resolve(model_dir, speculative_algorithm="nextn", speculative_num_draft_tokens=drafts, buffer_size=64)
    assert (args.speculative_algorithm, args.speculative_num_steps, args.speculative_eagle_topk,
            args.speculative_num_draft_tokens) == ("EAGLE", drafts, 1, drafts + 1)  # SGLang: NEXTN is EAGLE + MTP
    assert server_args_problem(args, plugin) is None
    ngram = resolve(model_dir, speculative_algorithm="ngram", speculative_num_draft_tokens=drafts, buffer_size=64)
    assert (ngram.speculative_algorithm, ngram.speculative_num_draft_tokens, ngram.speculative_eagle_topk,
            ngram.speculative_ngram_min_bfs_breadth, ngram.speculative_ngram_max_bfs_breadth) == (
        "NGRAM", drafts + 1, 1, 1, 1)
    assert server_args_problem(ngram, plugin) is None
    tree = resolve(model_dir, speculative_algorithm="ngram", speculative_num_draft_tokens=drafts, buffer_size=64,
                   decode_mode="recurrent", sglang={"extra_server_args": {"speculative_ngram_max_bfs_breadth": "4"}})
    assert tree.speculative_ngram_max_bfs_breadth == 4  # SGLang's own decode verifies trees: a user may ask for one


@pytest.mark.parametrize(("settings", "message"), [
    ({"sglang": {"quantization": "fp9"}}, "sglang.quantization: 'fp9' is not one of SGLang's choices"),
    ({"sglang": {"extra_server_args": {"attention_backend": "fast"}}},
     "sglang.extra_server_args.attention_backend: 'fast' is not one of SGLang's choices"),
    ({"sglang": {"extra_server_args": {"no_such_argument": "1"}}},
     "sglang.extra_server_args.no_such_argument: no_such_argument is not a server argument of SGLang"),
    ({"sglang": {"extra_server_args": {"disable_overlap_schedule": "maybe"}}},
     "sglang.extra_server_args.disable_overlap_schedule: disable_overlap_schedule is a switch"),
    # decode_mode recurrent: SGLang's radix cache stays on (kvbuffer turns it off), whose checks these are
    ({"decode_mode": "recurrent", "sglang": {"extra_server_args": {"mamba_radix_cache_strategy": "no_buffer"}}},
     "sglang.extra_server_args.mamba_radix_cache_strategy: SGLang refuses mamba_radix_cache_strategy='no_buffer': "
     "no_buffer do not support overlap schedule"),
    ({"max_context_length": 100_000}, "max_context_length: SGLang refuses context_length=100000: "),
    ({"speculative_algorithm": "nextn", "buffer_size": 64, "sglang": {"extra_server_args": {"pp_size": "2"}}},
     "sglang.extra_server_args.pp_size: SGLang refuses pp_size=2: Pipeline parallelism is not compatible with "
     "overlap schedule, speculative decoding"),
    ({"decode_mode": "recurrent", "sglang": {"extra_server_args": {"page_size": "3"}}},
     "sglang.extra_server_args.page_size: SGLang refuses "
     "page_size=3: AssertionError in server_args.py:"),
])
def test_what_sglang_refuses_stops_startup_naming_the_setting(model_dir: Path, settings: dict[str, Any],
                                                               message: str) -> None:
    assert refusal(model_dir, **settings).startswith(message)


def test_a_model_sglang_cannot_read_is_named(tmp_path: Path) -> None:
    assert refusal(tmp_path / "missing").startswith("model: SGLang refuses model_path=")
