"""The plugin's settings and start-up refusals (no SGLang needed: they judge values and SGLang-shaped arguments)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from kvbuffer.service.sglang.plugin.checks import hooks_problem, server_args_problem, version_problem
from kvbuffer.service.sglang.plugin.settings import PluginSettings, plugin_env
from kvbuffer.service.sglang.version import SGLANG_VERSION


def sglang_args(**overrides: object) -> SimpleNamespace:
    """The ServerArgs fields the checks read, at SGLang's defaults for a Qwen3-Next engine with radix cache off."""
    values = dict(enable_linear_replayssm=False, enable_linear_replayssm_spec=False, enable_mixed_chunk=False,
                  disaggregation_mode="null", enable_unified_memory=False, enable_page_major_kv_layout=False,
                  mamba_ssm_dtype=None, disable_radix_cache=True, mamba_radix_cache_strategy="auto",
                  speculative_algorithm=None, speculative_eagle_topk=None, speculative_num_draft_tokens=None,
                  speculative_ngram_max_bfs_breadth=1, extra_buffer=False)
    values.update(overrides)
    args = SimpleNamespace(**values)
    args.enable_mamba_extra_buffer = lambda: args.extra_buffer
    return args


def test_settings_round_trip_through_the_environment() -> None:
    settings = PluginSettings("kvbuffer", buffer_size=20, chunk_size=12, speculative_num_draft_tokens=4)
    assert PluginSettings.from_env(plugin_env(settings)) == settings
    assert PluginSettings.from_env({}) == PluginSettings()


@pytest.mark.parametrize(("env", "named"), [
    ({"KVBUFFER_SGLANG_CHUNK_SIZE": "x"}, "KVBUFFER_SGLANG_CHUNK_SIZE"),
    ({"KVBUFFER_SGLANG_DECODE_MODE": "fast"}, "decode_mode"),
    ({"KVBUFFER_SGLANG_BUFFER_SIZE": "8", "KVBUFFER_SGLANG_CHUNK_SIZE": "8",
      "KVBUFFER_SGLANG_SPECULATIVE_NUM_DRAFT_TOKENS": "2"}, "buffer_size"),
])
def test_bad_settings_name_the_setting(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        PluginSettings.from_env(env)


@pytest.mark.parametrize(("overrides", "named"), [
    ({"enable_linear_replayssm": True}, "enable_linear_replayssm"),
    ({"enable_mixed_chunk": True}, "enable_mixed_chunk"),
    ({"disaggregation_mode": "decode"}, "disaggregation_mode"),
    ({"mamba_ssm_dtype": "bfloat16"}, "mamba_ssm_dtype"),
    ({"disable_radix_cache": False, "mamba_radix_cache_strategy": "no_buffer"}, "'no_buffer'"),
    ({"disable_radix_cache": False, "mamba_radix_cache_strategy": "extra_buffer_lazy", "extra_buffer": True},
     "'extra_buffer_lazy'"),
    ({"speculative_algorithm": "EAGLE", "speculative_eagle_topk": 4, "speculative_num_draft_tokens": 4},
     "speculative_eagle_topk"),
    ({"speculative_algorithm": "NGRAM", "speculative_ngram_max_bfs_breadth": 2, "speculative_eagle_topk": 2,
      "speculative_num_draft_tokens": 4}, "speculative_ngram_max_bfs_breadth"),
    ({"speculative_algorithm": "NEXTN", "speculative_eagle_topk": 1, "speculative_num_draft_tokens": 5},
     "speculative_num_draft_tokens"),
    ({"speculative_algorithm": "NEXTN", "speculative_eagle_topk": 1, "speculative_num_draft_tokens": 4,
      "disable_radix_cache": False, "mamba_radix_cache_strategy": "extra_buffer", "extra_buffer": True},
     "speculative decoding with SGLang's radix cache"),
])
def test_forbidden_combinations_are_refused_naming_the_setting(overrides: dict, named: str) -> None:
    settings = PluginSettings(speculative_num_draft_tokens=4, buffer_size=24, chunk_size=16)
    problem = server_args_problem(sglang_args(**overrides), settings)
    assert problem is not None and named in problem and "\n" not in problem


def test_supported_combinations_pass() -> None:
    settings = PluginSettings(speculative_num_draft_tokens=4)
    assert server_args_problem(sglang_args(), settings) is None
    assert server_args_problem(sglang_args(speculative_algorithm="NEXTN", speculative_eagle_topk=1,
                                           speculative_num_draft_tokens=4), settings) is None
    # NGRAM at breadth 1 (SGLang then sets speculative_eagle_topk 1 and verifies the drafts as one chain)
    assert server_args_problem(sglang_args(speculative_algorithm="NGRAM", speculative_eagle_topk=1,
                                           speculative_num_draft_tokens=4), settings) is None
    # SGLang's radix cache as it resolves for Qwen3-Next with the overlap scheduler on
    assert server_args_problem(sglang_args(disable_radix_cache=False, mamba_radix_cache_strategy="extra_buffer",
                                           extra_buffer=True), settings) is None
    # recurrent mode leaves SGLang as it is, whatever its settings
    assert server_args_problem(sglang_args(enable_linear_replayssm=True), PluginSettings("recurrent")) is None


def test_version_and_hook_refusals() -> None:
    assert version_problem(SGLANG_VERSION) is None
    assert "0.5.23" in version_problem("0.5.23")
    before = {"a.B.c": object(), "a.B.d": object()}
    assert hooks_problem(before, {"a.B.c": object(), "a.B.d": object()}) is None
    assert "a.B.d" in hooks_problem(before, {"a.B.c": object(), "a.B.d": before["a.B.d"]})
