"""The KVBuffer plugin under SGLang 0.5.17's radix cache, strategy extra_buffer (what SGLang resolves for Qwen3-Next
with its overlap scheduler on), on the CPU.

Two SGLang schedulers' worth of state run the same requests: one as SGLang ships it (recurrent GDN decode: the
oracle), one with the plugin. What runs is SGLang's: `Req.init_next_round_input` (radix match, copy-on-write of the
cached state), `ScheduleBatch.init_new` / `prepare_for_extend` / `prepare_for_decode` (slot and KV allocation, track
slots and masks), `ForwardBatch.init_new`, the model runner's deferred state copy, `GDNAttnBackend` (metadata, conv,
track copies), the result processor's `_mamba_prefix_cache_update` and `release_kv_cache` ->
`MambaRadixCache.cache_finished_req`, `maybe_cache_unfinished_req` after prefill, in the scheduler's order (one
batch at a time: the overlap scheduler's next batch is not built early). Reproduced, not called: the PrefillAdder's
two steps for a request it takes whole (lock the matched node, extend range = the whole input) and the result
processors' token append and finish. Stand-ins: SGLang's conv and prefill kernels and pinned host memory
(sglang_cpu.py says why), the model around the GDN layers (each token's layer inputs come from a fixed random table)
and sampling (output tokens drawn at random, the same for both).
"""

from __future__ import annotations

from array import array
from types import SimpleNamespace

import pytest
import sglang_cpu as sc
import torch

sc.require_sglang()

INTERVAL = 8  # mamba_track_interval: SGLang snapshots a decoding request's state at lengths that are multiples of it
VOCAB = 64
TOL = 2e-5
# SGLang's prefill kernel takes the model's bf16 (on a GPU); the CPU stand-in runs fp32, checked as tightly as decode
PREFILL_DTYPE, PREFILL_TOL = (torch.float32, TOL) if sc.DEVICE == "cpu" else (torch.bfloat16, 2**-8)
RADIX = {"disable_radix_cache": False, "mamba_radix_cache_strategy": "extra_buffer", "mamba_track_interval": INTERVAL,
         "_mamba_cache_chunk_size": 64, "page_size": 1}  # 64: FLA's chunk, what SGLang resolves it to


pytestmark = pytest.mark.usefixtures("sglang_plugin")


class Scheduler:
    """One SGLang scheduler's pools, radix cache and GDN backend (the plugin's, or SGLang's own kernels)."""

    def __init__(self, s: sc.Shapes, layers: list, table: tuple[torch.Tensor, ...], plugin: bool) -> None:
        from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
        from sglang.srt.mem_cache.cache_init_params import CacheInitParams
        from sglang.srt.mem_cache.mamba_radix_cache import MambaRadixCache
        from sglang.srt.runtime_context import get_server_args

        self.layers, self.table = layers, table
        self.pool = sc.new_pool(s, extra_buffer=True)
        self.backend = sc.new_backend(self.pool, **RADIX)  # publishes the server arguments the cache reads
        if not plugin:
            del self.backend._kvbuffer, self.backend.kernel_dispatcher._kvbuffer
            self.backend.kernel_dispatcher.supports_packed_decode = False  # interpreted, it does not run
        self.kv = TokenToKVPoolAllocator(size=256, dtype=torch.float32, device=sc.DEVICE, kvcache=None,
                                         need_sort=False)
        self.tree = MambaRadixCache(CacheInitParams(disable=False, req_to_token_pool=self.pool,
                                                    token_to_kv_pool_allocator=self.kv, page_size=1,
                                                    enable_mamba_extra_buffer=True))
        self.runner = SimpleNamespace(  # what ForwardBatch.init_new and the runner's deferred state copy read
            is_draft_worker=False, server_args=get_server_args(), device=sc.DEVICE, req_to_token_pool=self.pool,
            dcp_size=1, dcp_rank=0, ngram_embedding_manager=SimpleNamespace(enabled=False),
            model_config=SimpleNamespace(model_is_mrope=False, is_encoder_decoder=False))

    def prefill(self, req, sampled: int):
        """Match, allocate and extend one request (chunked prefill off: the whole input at once), then the prefill's
        result processing: its first token, and the unfinished request offered to the radix cache. Returns the batch,
        the GDN outputs and the length of the cached prefix it matched."""
        from sglang.srt.managers.schedule_batch import ScheduleBatch
        from sglang.srt.mem_cache.common import maybe_cache_unfinished_req
        from sglang.srt.model_executor.model_runner import ModelRunner
        from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

        req.init_next_round_input(self.tree)
        self.tree.inc_lock_ref(req.last_node)  # the PrefillAdder's, which takes the whole input
        req.set_extend_range(len(req.prefix_indices), len(req.full_untruncated_fill_ids))
        model = SimpleNamespace(vocab_size=VOCAB, is_encoder_decoder=False, is_multimodal=False)
        batch = ScheduleBatch.init_new([req], self.pool, self.kv, self.tree, model, False, SpeculativeAlgorithm.NONE)
        batch.prepare_for_extend()
        fb = self._forward_batch(batch)
        ModelRunner._maybe_execute_deferred_mamba_cow_and_clear(self.runner, fb)
        matched = len(req.prefix_indices)
        outs = self._forward(fb, list(req.full_untruncated_fill_ids)[matched:], self.backend.forward_extend,
                             PREFILL_DTYPE)
        req.output_ids.append(sampled)
        maybe_cache_unfinished_req(req, self.tree)
        return batch, outs, matched

    def decode(self, batch, req, sampled: int, last: bool) -> list[torch.Tensor]:
        """One decode step of the batch's one request (its last token in), then the decode's result processing: the
        sampled token, the track slot moved on where this step was snapshotted, and on the `last` step the finished
        request cached."""
        from sglang.srt.managers.schedule_batch import FINISH_LENGTH
        from sglang.srt.managers.scheduler_components.batch_result_processor import SchedulerBatchResultProcessor
        from sglang.srt.mem_cache.common import release_kv_cache

        with sc.unpinned_host_memory():
            batch.prepare_for_decode()
        outs = self._forward(self._forward_batch(batch), [req.output_ids[-1]], self.backend.forward_decode)
        req.output_ids.append(sampled)
        if last:
            req.finished_reason = FINISH_LENGTH(length=len(req.output_ids))
        object.__new__(SchedulerBatchResultProcessor)._mamba_prefix_cache_update(req, batch, None, 0)
        if last:
            release_kv_cache(req, self.tree, is_insert=True)
        return outs

    def cached_state(self, token_ids: list[int]) -> tuple[int, torch.Tensor]:
        """The longest cached prefix of `token_ids` that has a state, and that state (every layer)."""
        from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
        from sglang.srt.mem_cache.radix_cache import RadixKey

        match = self.tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", token_ids), None)))
        slot = match.last_device_node.mamba_value
        return len(match.device_indices), self.pool.mamba_pool.mamba_cache.temporal[:, slot[0]].clone()

    def _forward_batch(self, batch):
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch
        from sglang.srt.runtime_context import get_parallel

        with get_parallel().override(moe_ep_size=1):
            return ForwardBatch.init_new(batch, self.runner, return_hidden_states_before_norm=False)

    def _forward(self, fb, tokens: list[int], forward, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        self.backend.init_forward_metadata(fb)
        ids = torch.tensor(tokens)
        mixed, a, b = (t[ids].to(sc.DEVICE, dtype) for t in self.table)
        return [forward(layer, fb, mixed, a, b) for layer in self.layers]


def new_req(rid: str, tokens: list[int]):
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=64, temperature=0)
    params.normalize(None)
    return Req(rid, "", array("q", tokens), params)


def assert_close(theirs: torch.Tensor, ours: torch.Tensor, what: str, tol: float = TOL) -> None:
    assert theirs.shape == ours.shape, f"{what}: shapes {theirs.shape} vs {ours.shape}"
    err = ((theirs - ours).abs().max() / theirs.abs().max()).item()
    assert err < tol, f"{what}: relative error {err:.2e}"


def test_cached_prefix_states_and_decodes_match_sglang_recurrent() -> None:
    """Request A (5 prompt tokens) decodes 13 tokens: the plugin flushes at steps 4, 8, 12 and SGLang snapshots its
    state for the radix cache at length 8 and 16 (steps 3 and 11, between flushes). A finishes and its first 16
    tokens are cached with that state. Request B (those 16 tokens + 3 new) matches them, starts from a copy of the
    cached state and decodes 9 tokens past two flushes and a snapshot at 24; it finishes and is cached too."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    s = sc.Shapes(requests=4, mamba_slots=16)
    layers = sc.new_layers(s, gen)
    table = (torch.randn(VOCAB, s.conv_dim, generator=gen), torch.randn(VOCAB, s.HV, generator=gen),
             torch.randn(VOCAB, s.HV, generator=gen))
    theirs, ours = (Scheduler(s, layers, table, plugin) for plugin in (False, True))

    def tokens(n: int) -> list[int]:
        return torch.randint(0, VOCAB, (n,), generator=gen).tolist()

    def serve(rid: str, prompt: list[int], decodes: int) -> tuple[int, list[int]]:
        """One request on both schedulers, outputs compared at every forward; its matched prefix and tokens."""
        reqs = [new_req(rid, prompt), new_req(rid, prompt)]
        sampled = tokens(decodes + 1)
        (b0, out0, m0), (b1, out1, m1) = (sched.prefill(r, sampled[0])
                                          for sched, r in zip((theirs, ours), reqs, strict=True))
        for layer, (x, y) in enumerate(zip(out0, out1, strict=True)):
            assert_close(x, y, f"{rid} prefill layer {layer}", PREFILL_TOL)
        for step in range(1, decodes + 1):
            outs = [sched.decode(batch, r, sampled[step], step == decodes)
                    for sched, batch, r in zip((theirs, ours), (b0, b1), reqs, strict=True)]
            for layer, (x, y) in enumerate(zip(*outs, strict=True)):
                assert_close(x, y, f"{rid} decode step {step} layer {layer}")
        assert m0 == m1 and reqs[0].finished() and reqs[1].finished()
        return m1, [*reqs[1].origin_input_ids, *reqs[1].output_ids]

    matched, a_ids = serve("a", tokens(5), decodes=13)
    assert matched == 0
    a_cached = [sched.cached_state(a_ids) for sched in (theirs, ours)]
    assert a_cached[0][0] == a_cached[1][0] == 16
    assert_close(a_cached[0][1], a_cached[1][1], "A's cached state (length 16)")

    matched, b_ids = serve("b", a_ids[:16] + tokens(3), decodes=9)
    assert matched == 16, "B did not start from A's cached state"
    b_cached = [sched.cached_state(b_ids) for sched in (theirs, ours)]
    assert b_cached[0][0] == b_cached[1][0] == 24
    assert_close(b_cached[0][1], b_cached[1][1], "B's cached state (length 24)")
