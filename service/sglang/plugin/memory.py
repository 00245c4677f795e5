"""Speculative-decoding state memory under decode_mode=kvbuffer: one state per request, none per draft token.

For target verify SGLang's MambaPool keeps one fp32 state per draft token and request (`intermediate_ssm`,
`[layers, requests + 1, drafts, HV, V, K]`, sglang/srt/mem_cache/memory_pool.py) for its commit to copy from, and
its memory accounting reserves them before it sizes the KV pool. The plugin's verify reads the checkpoint and the
buffer and writes no state, and its commit moves the cursor (dispatch.py): nothing reads those states. Its commit
does roll the conv state from SGLang's per-draft conv windows (`intermediate_conv_window`), which stay.

    MambaPool.__init__                            AROUND  the pool without per-draft states
    KVCacheConfigurator._handle_max_mamba_cache   AROUND  their reservation goes back to the KV pool
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch

logger = logging.getLogger(__name__)

GiB = 2**30


def mamba_pool(original: Callable[..., Any], pool: Any, *, speculative_num_draft_tokens: int | None = None,
               **kwargs: Any) -> None:
    """SGLang's pool built without draft tokens (conv and state slots), then the per-draft conv windows laid out as
    SGLang lays them out, and an `intermediate_ssm` with no draft steps: SGLang's GDN verify asserts it exists
    before it calls the kernel the plugin replaces. Windows go on the pool's device (SGLang hard-codes CUDA; its
    overlapping layout for chain drafts is kept on CUDA, where its helper allocates)."""
    original(pool, **kwargs)
    drafts = speculative_num_draft_tokens
    if drafts is None:
        return
    from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
    from sglang.srt.mem_cache import memory_pool as sglang_pool

    params, cache = kwargs["cache_params"], pool.mamba_cache
    layers, rows = cache.temporal.shape[0], kwargs["spec_state_size"] + 1
    dedup = (torch.device(kwargs["device"]).type == "cuda" and not params.shape.disable_conv_window_dedup
             and sglang_pool.conv_window_dedup_enabled(sglang_pool._is_npu, sglang_pool._is_cpu,
                                                       kwargs.get("speculative_eagle_topk"), params.is_kda))
    with pool.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):
        if dedup:  # chain drafts on CUDA: step t's window is columns t..t+K-2 of one buffer (SGLang's helper)
            pool.conv_window_axis = pool._detect_conv_window_axis(params.shape.conv, params.shape.conv_kernel - 1)
            made = [pool._allocate_deduplicated_conv_window(
                conv_shape=shape, num_mamba_layers=layers, spec_state_size=rows - 1,
                speculative_num_draft_tokens=drafts, conv_dtype=params.dtype.conv) for shape in params.shape.conv]
            phys, windows = [buffer for buffer, _ in made], [view for _, view in made]
        else:
            phys = windows = [torch.zeros(layers, rows, drafts, *shape, dtype=params.dtype.conv,
                                          device=kwargs["device"]) for shape in params.shape.conv]
    pool._intermediate_conv_window_phys = phys
    pool.mamba_cache = pool.SpeculativeState(
        **{f.name: getattr(cache, f.name) for f in fields(cache)}, intermediate_conv_window=windows,
        intermediate_ssm=cache.temporal.new_empty(layers, rows, 0, *cache.temporal.shape[2:]))
    window_bytes = sum(p.numel() * p.element_size() for p in phys)
    pool.mem_usage += window_bytes / GiB
    states = layers * rows * drafts * math.prod(cache.temporal.shape[2:]) * cache.temporal.element_size()
    logger.info("kvbuffer: speculative state of %d requests: %.2f GiB of conv windows and no per-draft states "
                "(SGLang keeps %.2f GiB of them)", rows - 1, window_bytes / GiB, states / GiB)


def kv_budget(original: Callable[..., Any], configurator: Any, total_rest_memory: float) -> float:
    """SGLang's memory left for the KV pool (GiB) after the mamba state, plus the per-draft states it reserved:
    (conv + state) x draft tokens for min(max_running_requests per DP rank, mamba slots / ratio) + 1 requests, in
    every branch of its solve; the states' share comes back. Under pipeline parallelism SGLang charges each stage
    the largest stage's layers; that reservation is left as it is (too large, so safe)."""
    rest = original(configurator, total_rest_memory)
    if configurator.spec_algorithm.is_none() or configurator.ps.pp_size > 1:
        return rest
    from sglang.srt.runtime_context import get_schedule, get_spec

    schedule = get_schedule()
    requests = min(schedule.max_running_requests // configurator.ps.attn_dp_size,
                   schedule.max_mamba_cache_size // configurator._calculate_mamba_ratio()) + 1
    params = configurator.mambaish_config.mamba2_cache_params
    state = math.prod(params.shape.temporal) * params.dtype.temporal.itemsize * len(params.layers)
    return rest + requests * get_spec().speculative_num_draft_tokens * state / GiB


def targets() -> list[tuple[str, Callable[..., Any], str]]:
    return [("sglang.srt.mem_cache.memory_pool.MambaPool.__init__", mamba_pool, "AROUND"),
            ("sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._handle_max_mamba_cache", kv_budget,
             "AROUND")]
