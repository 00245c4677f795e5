"""The hooks the plugin registers with SGLang's HookRegistry, each a thin adapter: SGLang keeps its model code,
causal conv, prefill kernel, radix tracking and CUDA-graph runner; the plugin plans each forward's KVBuffer
metadata (plan.py) and runs the KVBuffer kernels where SGLang would run its recurrent GDN kernels (dispatch.py).

Targets (all in SGLang 0.5.17):
    ServerArgs.__post_init__                          AFTER   refuse combinations at start (main process)
    attn_backend_wrapper                              AFTER   refuse a model without GDN layers
    GDNAttnBackend.__init__                           AFTER   allocate the buffers, attach the Runtime
    GDNAttnBackend.init_cuda_graph_state              AFTER   static plan buffers for captured graphs
    GDNAttnBackend.init_forward_metadata              AFTER   plan an eager forward
    GDNAttnBackend.init_forward_metadata_in_graph     AFTER   plan a captured forward (recorded in the graph)
    GDNAttnBackend.init_forward_metadata_out_graph    AFTER   empty the buffers of a graph prefill; count tokens
    GDNAttnBackend.forward_decode / forward_extend    AROUND  note the running layer
    GDNKernelDispatcher.packed_decode / decode        AROUND  KVBuffer buffered decode with the fused flush
    GDNKernelDispatcher.target_verify                 AROUND  KVBuffer fold-if-due + parallel verify
    HybridLinearAttnBackend.update_mamba_state_after_mtp_verify  AROUND  the accepted-length commit
    MambaPool.__init__, KVCacheConfigurator._handle_max_mamba_cache   no per-draft states (memory.py)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from . import checks, counters, dispatch, memory
from . import plan as planning
from .pools import KVBufferPools
from .runtime import ATTRIBUTE, Runtime
from .settings import PluginSettings

logger = logging.getLogger(__name__)

GDN = "sglang.srt.layers.attention.linear.gdn_backend"
HYBRID = "sglang.srt.layers.attention.hybrid_linear_attn_backend"
SETTINGS = PluginSettings()  # replaced by `install` with the process's settings


def _runtime(obj: Any) -> Runtime | None:
    return getattr(obj, ATTRIBUTE, None)


def check_server_args(result: None, args: Any) -> None:
    problem = checks.server_args_problem(args, SETTINGS)
    if problem:
        raise ValueError(problem)


def check_model(result: Any, runner: Any, full_attn_backend: Any) -> None:
    from sglang.srt.layers.attention.linear.gdn_backend import GDNAttnBackend

    if runner.is_draft_worker or SETTINGS.decode_mode != "kvbuffer":
        return
    linear = getattr(result, "linear_attn_backend", None)
    if not isinstance(linear, GDNAttnBackend):
        raise RuntimeError(checks.no_gdn_problem(runner.model_config))


def attach(result: None, backend: Any, model_runner: Any) -> None:
    """Allocates the buffers beside SGLang's state pool (per-rank head counts come from the pool's own shapes)."""
    if model_runner.is_draft_worker:
        return
    req_pool = model_runner.req_to_token_pool
    cache = req_pool.mamba_pool.mamba_cache
    temporal = cache.temporal  # [layers, slots, HV, V, K]
    if not temporal.is_contiguous():
        raise RuntimeError("kvbuffer: SGLang's state pool is strided (envelope layout); the kernels need it dense")
    layers, _, HV, V, K = temporal.shape
    conv_dim = cache.conv[0].shape[2]
    H = (conv_dim - HV * V) // (2 * K)
    pools = KVBufferPools.allocate(layers, req_pool.req_to_token.shape[0], SETTINGS.buffer_size, H, HV, K, V,
                                   key_dtype=cache.conv[0].dtype, device=temporal.device)
    ps = model_runner.ps  # the ranks of a tensor-, context- or pipeline-parallel group run the same requests
    reports = ps.attn_tp_rank == 0 and ps.attn_cp_rank == 0 and ps.pp_rank == 0
    rt = Runtime(SETTINGS, pools, dict(req_pool.mamba_map), counters.DeviceTally(pools.counts) if reports else None,
                 draft_tokens=SETTINGS.speculative_num_draft_tokens)
    setattr(backend, ATTRIBUTE, rt)
    setattr(backend.kernel_dispatcher, ATTRIBUTE, rt)
    logger.info("kvbuffer: GDN decode uses KVBuffer (buffer_size %d, chunk_size %d): %d layers, %d heads, "
                "%.1f MiB of buffers", SETTINGS.buffer_size, SETTINGS.chunk_size, layers, HV, pools.nbytes() / 2**20)


def graph_state(result: None, backend: Any, max_bs: int, max_num_tokens: int) -> None:
    rt = _runtime(backend)
    if rt is not None:
        rt.graph_plan = planning.static_plan(max_bs, rt.pools.lens.device)


def _plan(backend: Any, rt: Runtime, forward_batch: Any) -> planning.StepPlan | None:
    mode = forward_batch.forward_mode
    slots = backend.forward_metadata.mamba_cache_indices
    rows = forward_batch.req_pool_indices
    if mode.is_decode_or_idle():
        track = forward_batch.mamba_track_mask  # radix cache extra_buffer: rows snapshotted this step, else None
        return planning.plan_decode(rt.pools, slots, rows[:slots.shape[0]], rt.settings.chunk_size,
                                    None if track is None else track[:slots.shape[0]])
    if mode.is_target_verify():
        return planning.plan_verify(rt.pools, slots, rows[:slots.shape[0]], rt.settings.chunk_size)
    if mode.is_extend():
        planning.plan_prefill(rt.pools, slots, rows[:slots.shape[0]])
    return None


def plan_eager(result: None, backend: Any, forward_batch: Any) -> None:
    rt = _runtime(backend)
    if rt is None:
        return
    rt.plan = _plan(backend, rt, forward_batch)
    _count(rt, forward_batch, forward_batch.batch_size)


def plan_in_graph(result: None, backend: Any, forward_batch: Any) -> None:
    rt = _runtime(backend)
    mode = forward_batch.forward_mode
    if rt is None or not (mode.is_decode_or_idle() or mode.is_target_verify()):
        return
    if rt.graph_plan is None:
        raise RuntimeError("kvbuffer: a CUDA graph was captured before init_cuda_graph_state")
    rt.plan = planning.into(rt.graph_plan, _plan(backend, rt, forward_batch))


def prepare_out_of_graph(result: None, backend: Any, forward_batch: Any, in_capture: bool = False) -> None:
    """Replay preparation: a graph prefill empties its rows' buffers here (eager); graph decode and verify steps
    are counted, and their plan is the static rows the replay writes (the commit after a verify reads it: the
    Python-side plan is whatever ran last, the capture of another batch size or an eager step)."""
    rt = _runtime(backend)
    if rt is None or in_capture:
        return
    mode = forward_batch.forward_mode
    if mode.is_decode_or_idle() or mode.is_target_verify():
        rt.plan = planning.head(rt.graph_plan, forward_batch.batch_size)
    elif mode.is_extend():
        rt.plan = _plan(backend, rt, forward_batch)
    _count(rt, forward_batch, forward_batch.batch_size - int(getattr(forward_batch, "num_padding", 0) or 0))


def _count(rt: Runtime, forward_batch: Any, rows: int) -> None:
    if rt.tally is None:
        return
    mode = forward_batch.forward_mode
    if mode.is_decode():
        counters.count_decoded("buffered", rows)
    elif mode.is_target_verify():
        counters.count_drafted(rows * max(rt.draft_tokens - 1, 0))
    rt.tally.step()


def running_layer(original: Callable[..., Any], backend: Any, layer: Any, *args: Any, **kwargs: Any) -> Any:
    rt = _runtime(backend)
    if rt is not None:
        rt.layer = rt.layer_index[layer.layer_id]
    return original(backend, layer, *args, **kwargs)


def kvbuffer_packed_decode(original: Callable[..., Any], dispatcher: Any, mixed_qkv: Any, a: Any, b: Any, *,
                           A_log: Any, dt_bias: Any, scale: float, ssm_states: Any, cache_indices: Any,
                           num_v_heads: int, head_v_dim: int, **kwargs: Any) -> Any:
    rt = _runtime(dispatcher)
    if rt is None:
        return original(dispatcher, mixed_qkv, a, b, A_log=A_log, dt_bias=dt_bias, scale=scale,
                        ssm_states=ssm_states, cache_indices=cache_indices, num_v_heads=num_v_heads,
                        head_v_dim=head_v_dim, **kwargs)
    return dispatch.packed_decode(rt, mixed_qkv, a, b, A_log, dt_bias, ssm_states, num_v_heads, head_v_dim)


def kvbuffer_decode(original: Callable[..., Any], dispatcher: Any, q: Any, k: Any, v: Any, a: Any, b: Any, *,
                    A_log: Any, dt_bias: Any, ssm_states: Any, cache_indices: Any, query_start_loc: Any,
                    **kwargs: Any) -> Any:
    rt = _runtime(dispatcher)
    if rt is None:
        return original(dispatcher, q, k, v, a, b, A_log=A_log, dt_bias=dt_bias, ssm_states=ssm_states,
                        cache_indices=cache_indices, query_start_loc=query_start_loc, **kwargs)
    return dispatch.decode(rt, q, k, v, a, b, A_log, dt_bias, ssm_states)


def kvbuffer_target_verify(original: Callable[..., Any], dispatcher: Any, A_log: Any, dt_bias: Any, q: Any, k: Any,
                           v: Any, a: Any, b: Any, *, ssm_states: Any, cache_indices: Any, query_start_loc: Any,
                           **kwargs: Any) -> Any:
    rt = _runtime(dispatcher)
    if rt is None:
        return original(dispatcher, A_log, dt_bias, q, k, v, a, b, ssm_states=ssm_states,
                        cache_indices=cache_indices, query_start_loc=query_start_loc, **kwargs)
    if kwargs.get("retrieve_parent_token") is not None:
        raise RuntimeError("kvbuffer: a tree draft reached target_verify; KVBuffer verifies chains (top-k 1)")
    return dispatch.target_verify(rt, q, k, v, a, b, A_log, dt_bias, ssm_states, query_start_loc,
                                  kwargs.get("cache_steps") or rt.draft_tokens)


def kvbuffer_commit(original: Callable[..., Any], hybrid: Any, last_correct_step_indices: Any,
                    mamba_track_indices: Any, mamba_steps_to_track: Any, model: Any, **kwargs: Any) -> Any:
    linear = hybrid.linear_attn_backend
    rt = _runtime(linear)
    if rt is None:
        return original(hybrid, last_correct_step_indices, mamba_track_indices, mamba_steps_to_track, model,
                        **kwargs)
    if mamba_track_indices is not None:
        raise RuntimeError("kvbuffer: radix-cache state tracking during speculative verify is not supported")
    spec = linear.req_to_token_pool.get_speculative_mamba2_params_all_layers()
    dispatch.commit(rt, last_correct_step_indices, spec.conv, spec.intermediate_conv_window)
    return None


def targets(settings: PluginSettings) -> list[tuple[str, Callable[..., Any], str]]:
    """(target, hook, hook type name) for `settings`: decode_mode=recurrent leaves SGLang's kernels alone."""
    always = [("sglang.srt.server_args.ServerArgs.__post_init__", check_server_args, "AFTER")]
    if settings.decode_mode != "kvbuffer":
        return always
    return [
        *always,
        ("sglang.srt.layers.attention.attention_registry.attn_backend_wrapper", check_model, "AFTER"),
        (f"{GDN}.GDNAttnBackend.__init__", attach, "AFTER"),
        (f"{GDN}.GDNAttnBackend.init_cuda_graph_state", graph_state, "AFTER"),
        (f"{GDN}.GDNAttnBackend.init_forward_metadata", plan_eager, "AFTER"),
        (f"{GDN}.GDNAttnBackend.init_forward_metadata_in_graph", plan_in_graph, "AFTER"),
        (f"{GDN}.GDNAttnBackend.init_forward_metadata_out_graph", prepare_out_of_graph, "AFTER"),
        (f"{GDN}.GDNAttnBackend.forward_decode", running_layer, "AROUND"),
        (f"{GDN}.GDNAttnBackend.forward_extend", running_layer, "AROUND"),
        (f"{GDN}.GDNKernelDispatcher.packed_decode", kvbuffer_packed_decode, "AROUND"),
        (f"{GDN}.GDNKernelDispatcher.decode", kvbuffer_decode, "AROUND"),
        (f"{GDN}.GDNKernelDispatcher.target_verify", kvbuffer_target_verify, "AROUND"),
        (f"{HYBRID}.HybridLinearAttnBackend.update_mamba_state_after_mtp_verify", kvbuffer_commit, "AROUND"),
        *memory.targets(),
    ]
