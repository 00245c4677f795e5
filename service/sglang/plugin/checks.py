"""What the plugin refuses at start: each check returns one line naming the setting, or None.

SGLang's `apply_hooks` only logs a hook that failed and its `load_plugins` only logs a plugin that raised, so the
plugin checks its own hooks and stops the process itself (`refuse`), and raises from inside SGLang's start-up
(ServerArgs, the attention backend) where SGLang reports the error to the caller of `Engine`.
"""

from __future__ import annotations

import logging
from typing import Any

from ..version import SGLANG_VERSION
from .settings import PluginSettings

logger = logging.getLogger(__name__)


class Refused(SystemExit):
    """Stops start-up with one line. A SystemExit, so SGLang's plugin loader (which catches Exception) lets it
    through instead of logging it and starting without the plugin."""

    def __init__(self, line: str) -> None:
        logger.error(line)
        super().__init__(line)


def version_problem(installed: str) -> str | None:
    if installed != SGLANG_VERSION:
        return (f"kvbuffer: the SGLang plugin is built for sglang=={SGLANG_VERSION}, found sglang=={installed} "
                f"(pip install 'kvbuffer[sglang]' installs the pinned release)")
    return None


def server_args_problem(args: Any, settings: PluginSettings) -> str | None:
    """Combinations the KVBuffer decode path cannot serve, with the SGLang setting that makes them."""
    if settings.decode_mode != "kvbuffer":
        return None
    if getattr(args, "enable_linear_replayssm", False) or getattr(args, "enable_linear_replayssm_spec", False):
        return ("kvbuffer: decode_mode=kvbuffer replaces SGLang's GDN decode; turn off enable_linear_replayssm / "
                "enable_linear_replayssm_spec (or set decode_mode=recurrent)")
    if getattr(args, "enable_mixed_chunk", False):
        return ("kvbuffer: enable_mixed_chunk runs decodes through SGLang's prefill kernel, which ignores the "
                "KVBuffer buffer; turn it off")
    if getattr(args, "disaggregation_mode", "null") not in ("null", None):
        return f"kvbuffer: disaggregation_mode={args.disaggregation_mode!r} is not supported; use 'null'"
    if getattr(args, "enable_unified_memory", False):
        return "kvbuffer: enable_unified_memory (virtual mamba slots) is not supported; turn it off"
    if getattr(args, "enable_page_major_kv_layout", False):
        return "kvbuffer: enable_page_major_kv_layout strides the state pool; the KVBuffer kernels need it dense"
    if getattr(args, "mamba_ssm_dtype", None) not in (None, "float32"):
        return f"kvbuffer: mamba_ssm_dtype={args.mamba_ssm_dtype!r}: the KVBuffer kernels keep float32 states"
    radix = not getattr(args, "disable_radix_cache", False)
    strategy = getattr(args, "mamba_radix_cache_strategy", None)
    if radix and strategy != "extra_buffer":
        # extra_buffer caches the states its decode snapshots into track slots, and the plan flushes the buffer on
        # those steps (plan.plan_decode). no_buffer caches the request's own slot, which lags the buffer by its
        # entries; extra_buffer_lazy's slot handling has not run with the plugin.
        return (f"kvbuffer: decode_mode=kvbuffer serves SGLang's radix cache with mamba_radix_cache_strategy="
                f"'extra_buffer' only, not {strategy!r}: set it (or disable_radix_cache)")
    if radix and getattr(args, "speculative_algorithm", None):
        return ("kvbuffer: speculative decoding with SGLang's radix cache (state tracking during verify) is not "
                "supported with decode_mode=kvbuffer; set disable_radix_cache")
    if getattr(args, "speculative_algorithm", None):
        # NGRAM: SGLang sets speculative_eagle_topk to speculative_ngram_max_bfs_breadth. At 1 its GDN verify runs the
        # drafts as one chain (no retrieve_parent_token) and commits the state at the last accepted node's index;
        # the plugin does the same (its drafts may still branch where a match is short: SGLang's semantics, kept).
        breadth = getattr(args, "speculative_ngram_max_bfs_breadth", 1)
        if args.speculative_algorithm == "NGRAM" and breadth != 1:
            return (f"kvbuffer: speculative_ngram_max_bfs_breadth={breadth} makes tree drafts; KVBuffer verifies "
                    "chains: set it (and speculative_ngram_min_bfs_breadth) to 1")
        topk = getattr(args, "speculative_eagle_topk", None)
        if topk not in (None, 1):
            return f"kvbuffer: speculative_eagle_topk={topk}: KVBuffer verifies chain drafts only (top-k 1)"
        drafts = args.speculative_num_draft_tokens
        if drafts != settings.speculative_num_draft_tokens:
            return (f"kvbuffer: speculative_num_draft_tokens is {drafts} in SGLang and "
                    f"{settings.speculative_num_draft_tokens} in KVBUFFER_SGLANG_SPECULATIVE_NUM_DRAFT_TOKENS; "
                    "they must match (chunk_size + speculative_num_draft_tokens <= buffer_size)")
    return None


def no_gdn_problem(model_config: Any) -> str:
    arch = getattr(getattr(model_config, "hf_config", None), "architectures", None) or ["?"]
    return (f"kvbuffer: decode_mode=kvbuffer needs a model with Gated DeltaNet layers; {arch[0]} has none "
            "(set decode_mode=recurrent or drop the plugin from SGLANG_PLUGINS)")


def hooks_problem(before: dict[str, object], after: dict[str, object]) -> str | None:
    """Targets whose attribute is still the object it was before the hooks were applied."""
    stale = [target for target, obj in before.items() if after.get(target) is obj]
    if stale:
        return f"kvbuffer: SGLang did not take the plugin's hook on {stale[0]} (sglang=={SGLANG_VERSION} expected)"
    return None
