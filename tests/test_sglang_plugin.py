"""The KVBuffer plugin inside SGLang 0.5.17's real GDN backend (CPU, TRITON_INTERPRET=1, SGLang's pool layout).

Each test runs two SGLang GDNAttnBackends on identical pools and inputs: one as SGLang ships it (its recurrent
Triton kernels: the oracle) and one carrying the plugin's runtime. Outputs must agree at every step, across
flushes, and after drafts are verified with some accepted and some rejected; states agree once the plugin's
buffer is folded in. The plugin is loaded the way SGLang loads it: the `sglang.srt.plugins` entry point,
allow-listed by SGLANG_PLUGINS, through SGLang's own load_plugins. The pool tests build SGLang's MambaPool and run
its memory solve with the plugin's hooks and without them (SGLang's functions as shipped).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import sglang_cpu as sc
import torch

sc.require_sglang()

CHUNK, BUFFER, DRAFTS = sc.CHUNK, sc.BUFFER, sc.DRAFTS
TOL = 2e-5


pytestmark = pytest.mark.usefixtures("sglang_plugin")


def test_plugin_loads_through_the_entry_point() -> None:
    from importlib.metadata import entry_points

    from sglang.srt.layers.attention.linear.gdn_backend import GDNAttnBackend, GDNKernelDispatcher
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.mem_cache.memory_pool import MambaPool

    assert "kvbuffer" in {ep.name for ep in entry_points(group="sglang.srt.plugins")}
    for method in (GDNKernelDispatcher.decode, GDNKernelDispatcher.packed_decode, GDNKernelDispatcher.target_verify,
                   GDNAttnBackend.init_forward_metadata, GDNAttnBackend.__init__, MambaPool.__init__,
                   KVCacheConfigurator._handle_max_mamba_cache):
        assert hasattr(method, "__wrapped__"), f"{method.__qualname__} is not hooked"


class Pair:
    """SGLang's recurrent backend and the plugin's, over two identical pools holding the same requests."""

    def __init__(self, gen: torch.Generator, requests: int, packed: bool = False, drafts: int | None = None) -> None:
        self.s = sc.Shapes()
        self.layers = sc.new_layers(self.s, gen)
        self.pools = [sc.new_pool(self.s, drafts), sc.new_pool(self.s, drafts, per_draft_states=False)]
        self.backends = [sc.new_backend(p, drafts) for p in self.pools]
        sglang, ours = self.backends
        del sglang._kvbuffer, sglang.kernel_dispatcher._kvbuffer  # the oracle runs SGLang's own kernels
        if sc.DEVICE == "cpu":  # its packed kernel does not run interpreted
            sglang.kernel_dispatcher.supports_packed_decode = False
        ours.kernel_dispatcher.supports_packed_decode = packed
        state = torch.randn(self.pools[0].mamba_pool.mamba_cache.temporal.shape, generator=gen).to(sc.DEVICE) * 0.1
        conv = torch.randn(self.pools[0].mamba_pool.mamba_cache.conv[0].shape, generator=gen).to(sc.DEVICE)
        for pool in self.pools:  # as if a prefill had run: SGLang's prefill writes these, the plugin keeps it
            pool.mamba_pool.mamba_cache.temporal.copy_(state)
            pool.mamba_pool.mamba_cache.conv[0].copy_(conv)
        reqs = [SimpleNamespace(req_pool_idx=None, mamba_pool_idx=None, mamba_ping_pong_track_buffer=None)
                for _ in range(requests)]
        allocated = [pool.alloc([SimpleNamespace(**vars(r)) for r in reqs]) for pool in self.pools]
        assert allocated[0] == allocated[1]
        self.slots = allocated[0]
        self.gen = gen

    def inputs(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(torch.randn(n, dim, generator=self.gen).to(sc.DEVICE)
                     for dim in (self.s.conv_dim, self.s.HV, self.s.HV))

    def run(self, mode: str, rows: list[int], seq_lens: list[int]) -> list[list[torch.Tensor]]:
        """One forward of every GDN layer for the requests in `rows` on both backends; outputs per backend."""
        n = len(rows) * (DRAFTS if mode == "verify" else 1)
        mixed, a, b = self.inputs(n)
        outs = []
        for backend in self.backends:
            fb = sc.batch(mode, [self.slots[r] for r in rows], seq_lens, draft_tokens=DRAFTS)
            backend.init_forward_metadata(fb)
            forward = backend.forward_decode if mode == "decode" else backend.forward_extend
            outs.append([forward(layer, fb, mixed, a, b) for layer in self.layers])
        return outs

    def prefill(self, rows: list[int]) -> None:
        """SGLang's prefill metadata for `rows` (its kernels would rewrite their checkpoints): buffers emptied."""
        for backend in self.backends:
            backend.init_forward_metadata(sc.batch("extend", [self.slots[r] for r in rows], [3] * len(rows),
                                                   [3] * len(rows)))

    def refill(self, row: int) -> None:
        """`row` prefilled again: the states SGLang's prefill kernels would write (random here) in both pools."""
        cache = self.pools[0].mamba_pool.mamba_cache
        slot = int(self.pools[0].req_index_to_mamba_index_mapping[self.slots[row]])
        state = torch.randn(cache.temporal[:, slot].shape, generator=self.gen).to(sc.DEVICE) * 0.1
        conv = torch.randn(cache.conv[0][:, slot].shape, generator=self.gen).to(sc.DEVICE)
        for pool in self.pools:
            pool.mamba_pool.mamba_cache.temporal[:, slot] = state
            pool.mamba_pool.mamba_cache.conv[0][:, slot] = conv
        self.prefill([row])

    def folded_states(self) -> torch.Tensor:
        """The plugin's states with every request's buffer folded in (what SGLang's recurrent states hold)."""
        from kvbuffer.kernels.ops import fold

        ours = self.backends[1]
        rt, cache = ours._kvbuffer, self.pools[1].mamba_pool.mamba_cache
        states = cache.temporal.clone()
        slots = torch.tensor(self.slots, device=sc.DEVICE)
        mamba = self.pools[1].req_index_to_mamba_index_mapping[slots].long()
        for i in range(self.s.layers):
            fold(states[i], rt.pools.buffers[i], slots, rt.pools.lens[slots], mamba, mamba, backend="torch")
        return states


def assert_close(outs: list[list[torch.Tensor]], what: str) -> None:
    for layer, (theirs, ours) in enumerate(zip(*outs, strict=True)):
        assert theirs.shape == ours.shape, f"{what}: layer {layer} shapes {theirs.shape} vs {ours.shape}"
        err = ((theirs - ours).abs().max() / theirs.abs().max()).item()
        assert err < TOL, f"{what}: layer {layer} relative error {err:.2e}"


@pytest.mark.parametrize("packed", [False, True], ids=["decode", "packed_decode"])
def test_decode_matches_sglang_recurrent_across_flushes(packed: bool) -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    pair = Pair(gen, requests=3, packed=packed)
    pair.prefill([0, 1])
    for step in range(2 * CHUNK + 1):  # two flushes; request 2 joins (prefilled) after 3 steps
        if step == 3:
            pair.prefill([2])
        rows = [0, 1, 2] if step >= 3 else [0, 1]
        assert_close(pair.run("decode", rows, [10 + step] * len(rows)), f"step {step}")
    lens = pair.backends[1]._kvbuffer.pools.lens[torch.tensor(pair.slots, device=sc.DEVICE)].tolist()
    assert lens == [(2 * CHUNK + 1) % CHUNK, (2 * CHUNK + 1) % CHUNK, (2 * CHUNK + 1 - 3) % CHUNK], lens
    theirs = pair.pools[0].mamba_pool.mamba_cache
    ours = pair.pools[1].mamba_pool.mamba_cache
    assert ((pair.folded_states() - theirs.temporal).abs().max() / theirs.temporal.abs().max()) < TOL
    assert torch.equal(ours.conv[0], theirs.conv[0])


def test_prefill_empties_the_buffer() -> None:
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    pair = Pair(gen, requests=2)
    pair.prefill([0, 1])
    pair.run("decode", [0, 1], [5, 5])
    rt = pair.backends[1]._kvbuffer
    assert rt.pools.lens[pair.slots[0]] == 1
    pair.prefill([0])
    assert rt.pools.lens[pair.slots[0]] == 0 and rt.pools.lens[pair.slots[1]] == 1


def _commit_sglang(pair: Pair, steps: torch.Tensor) -> None:
    """SGLang's recurrent commit (scatter_mamba_states_after_mtp_verify, a CUDA-only kernel) in plain indexing:
    each request's state and conv state become those after its last accepted draft step."""
    cache = pair.pools[0].mamba_pool.mamba_cache
    slots = pair.backends[0].forward_metadata.mamba_cache_indices.long()
    for row, step in enumerate(steps.tolist()):
        cache.temporal[:, slots[row]] = cache.intermediate_ssm[:, row, step]
        cache.conv[0][:, slots[row]] = cache.intermediate_conv_window[0][:, row, step]


def test_verify_then_commit_matches_sglang_with_drafts_accepted_and_rejected() -> None:
    from sglang.srt.layers.attention.hybrid_linear_attn_backend import HybridLinearAttnBackend

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    pair = Pair(gen, requests=2, drafts=DRAFTS)
    pool = pair.pools[1]
    assert pool.mamba_pool.mamba_cache.intermediate_ssm.numel() == 0  # the plugin's pool: no per-draft states
    full = SimpleNamespace(token_to_kv_pool=None, req_to_token_pool=pool, needs_cpu_seq_lens=False)
    hybrid = HybridLinearAttnBackend(full, pair.backends[1], full_attn_layers=[])
    pair.prefill([0, 1])
    seq = [7, 7]
    # tokens kept per request and round (the bonus token included): all rejected (1) to all accepted (DRAFTS)
    for round_, accepted in enumerate([(1, 3), (3, 1), (2, 2), (3, 3), (1, 2)]):
        assert_close(pair.run("verify", [0, 1], seq), f"verify round {round_}")
        steps = torch.tensor(accepted, device=sc.DEVICE) - 1  # each request's last accepted step
        _commit_sglang(pair, steps)
        hybrid.update_mamba_state_after_mtp_verify(steps, None, None, None)
        seq = [s + a for s, a in zip(seq, accepted, strict=True)]
        assert_close(pair.run("decode", [0, 1], seq), f"decode after round {round_}")
        seq = [s + 1 for s in seq]
    theirs = pair.pools[0].mamba_pool.mamba_cache
    assert ((pair.folded_states() - theirs.temporal).abs().max() / theirs.temporal.abs().max()) < TOL
    assert torch.equal(pool.mamba_pool.mamba_cache.conv[0], theirs.conv[0])


def test_verify_replayed_from_a_cuda_graph_commits_its_own_rows() -> None:
    """Verify steps replayed from CUDA graphs (SGLang's replay order: graphs captured largest batch first, eager
    prefills between replays, batches padded to the next captured size), each followed by SGLang's commit call: the
    commit keeps what this replay appended, for its rows, as SGLang's recurrent verify and commit do eagerly."""
    from sglang.srt.layers.attention.hybrid_linear_attn_backend import HybridLinearAttnBackend

    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    pair = Pair(gen, requests=3, drafts=DRAFTS)
    full = SimpleNamespace(token_to_kv_pool=None, req_to_token_pool=pair.pools[1], needs_cpu_seq_lens=False)
    hybrid = HybridLinearAttnBackend(full, pair.backends[1], full_attn_layers=[])
    graphs = sc.GraphRunner(pair.backends[1], pair.layers, "verify", sizes=[1, 2, 4], draft_tokens=DRAFTS)
    sglang = pair.backends[0]
    seq = [7, 7, 7]
    for round_ in range(4):
        rows = [0, 1, 2] if round_ % 2 == 0 else [2, 0]
        if round_ == 2:  # request 1 is prefilled again (eagerly): new checkpoint, empty buffer
            pair.refill(1)
            seq[1] = 3
        mixed, a, b = pair.inputs(len(rows) * DRAFTS)
        fb = sc.batch("verify", [pair.slots[r] for r in rows], [seq[r] for r in rows], draft_tokens=DRAFTS)
        sglang.init_forward_metadata(fb)
        theirs = [sglang.forward_extend(layer, fb, mixed, a, b) for layer in pair.layers]
        ours = graphs.replay([pair.slots[r] for r in rows], mixed, a, b)
        assert_close([theirs, ours], f"verify round {round_}")
        accepted = torch.randint(1, DRAFTS + 1, (len(rows),), generator=gen)
        steps = (accepted - 1).to(sc.DEVICE)
        _commit_sglang(pair, steps)
        hybrid.update_mamba_state_after_mtp_verify(steps, None, None, None)
        for r, n in zip(rows, accepted.tolist(), strict=True):
            seq[r] += n
        assert_close(pair.run("decode", rows, [seq[r] for r in rows]), f"decode after round {round_}")
        for r in rows:
            seq[r] += 1


def _pool_bytes(pool) -> int:
    """Bytes of a MambaPool's tensors: conv and state slots, per-draft states and conv windows (their buffers, which
    SGLang's overlapping window layout views)."""
    cache = pool.mamba_cache
    tensors = [*cache.conv, cache.temporal, cache.intermediate_ssm, *pool._intermediate_conv_window_phys]
    return sum(t.untyped_storage().nbytes() for t in tensors)


def _sglang_own(method):
    """`method` as SGLang ships it: the function a plugin hook wraps (HookRegistry keeps it as __wrapped__)."""
    return getattr(method, "__wrapped__", method)


def _pools(s: sc.Shapes, params, drafts: int, slots: int, requests: int) -> tuple:
    """SGLang's MambaPool on CUDA as the plugin builds it and as SGLang builds it (its constructor before the hook);
    FakeTensorMode stands in for the GPU this machine lacks: tensors with shapes, dtypes and strides, no memory."""
    from sglang.srt.mem_cache.memory_pool import MambaPool
    from torch._subclasses.fake_tensor import FakeTensorMode

    kw = dict(size=slots, spec_state_size=requests, cache_params=params, mamba_layer_ids=list(range(s.layers)),
              device="cuda", speculative_num_draft_tokens=drafts, speculative_eagle_topk=1)
    theirs = MambaPool.__new__(MambaPool)
    with FakeTensorMode():
        ours = MambaPool(**kw)
        _sglang_own(MambaPool.__init__)(theirs, **kw)
    return ours, theirs


def _random_shapes() -> tuple[sc.Shapes, int]:
    """Random small GDN shapes (requests, mamba slots) and a draft count."""
    H, groups, k, v, layers, requests, drafts = (int(x) for x in torch.randint(1, 4, (7,)))
    return sc.Shapes(H=H, HV=H * groups, K=8 * k, V=8 * v, layers=layers, requests=1 + requests,
                     mamba_slots=2 + requests), 1 + drafts


@pytest.mark.parametrize("dedup", [True, False], ids=["overlapping_windows", "window_per_step"])
def test_pool_keeps_one_state_per_request_and_no_draft_states(dedup: bool) -> None:
    s, drafts = _random_shapes()
    ours, theirs = _pools(s, sc.cache_params(s, torch.bfloat16, dedup), drafts, s.mamba_slots, s.requests)
    mine, sglang = ours.mamba_cache, theirs.mamba_cache
    assert mine.temporal.shape == sglang.temporal.shape == (s.layers, s.mamba_slots + 1, s.HV, s.V, s.K)
    assert sglang.intermediate_ssm.shape == (s.layers, s.requests + 1, drafts, s.HV, s.V, s.K)
    assert mine.intermediate_ssm.numel() == 0
    for window, theirs_window in zip(mine.intermediate_conv_window, sglang.intermediate_conv_window, strict=True):
        assert (window.shape, window.stride(), window.dtype) == (
            theirs_window.shape, theirs_window.stride(), theirs_window.dtype)
    draft_states = sglang.intermediate_ssm.untyped_storage().nbytes()
    assert _pool_bytes(theirs) - _pool_bytes(ours) == draft_states
    assert ours.mem_usage == pytest.approx(theirs.mem_usage - draft_states / 2**30, rel=1e-12)


@pytest.mark.parametrize("mamba_slots", [None, 5], ids=["slots_from_max_running_requests", "max_mamba_cache_size"])
def test_memory_accounting_frees_what_the_pool_no_longer_holds(mamba_slots: int | None) -> None:
    """SGLang's memory solve for the mamba pool (KVCacheConfigurator._handle_max_mamba_cache, NGRAM chain drafts,
    radix cache off as the plugin runs it) with and without the plugin: the KV pool gets exactly the bytes the
    pool SGLang then builds no longer holds, and the number of requests stays SGLang's."""
    from sglang.srt.mem_cache.kv_cache_configurator import KVCacheConfigurator
    from sglang.srt.runtime_context import get_schedule
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    s, drafts = _random_shapes()
    params = sc.cache_params(s, torch.bfloat16)
    args = dict(speculative_algorithm="NGRAM", speculative_num_draft_tokens=drafts, disable_radix_cache=True,
                max_running_requests=8, max_mamba_cache_size=mamba_slots)
    # stand-in for the configurator SGLang's model runner builds: the attributes this solve reads
    configurator = KVCacheConfigurator.__new__(KVCacheConfigurator)
    configurator.mambaish_config = SimpleNamespace(mamba2_cache_params=params)
    configurator.ps = SimpleNamespace(pp_size=1, attn_dp_size=1)
    configurator.spec_algorithm = SpeculativeAlgorithm.NGRAM
    configurator.model_config = SimpleNamespace(context_len=256)
    budget = 40.0  # GiB left after the weights
    configurator.server_args = sc.server_args(**args)
    theirs = _sglang_own(KVCacheConfigurator._handle_max_mamba_cache)(configurator, budget)
    configurator.server_args = sc.server_args(**args)  # a fresh context: SGLang's solve records its sizes in it
    ours = configurator._handle_max_mamba_cache(budget)
    slots, requests = get_schedule().max_mamba_cache_size, configurator.resolve_max_num_reqs(10**9)
    assert (slots, requests) == ((8, 8) if mamba_slots is None else (5, 5))
    pools = _pools(s, params, drafts, slots, requests)
    assert ours > theirs
    assert (ours - theirs) * 2**30 == pytest.approx(_pool_bytes(pools[1]) - _pool_bytes(pools[0]), rel=1e-9)


def test_counters_leave_the_process(tmp_path) -> None:
    """Counts made in another process (as in an SGLang scheduler) are read back from the multi-process directory."""
    import subprocess
    import sys

    code = ("from kvbuffer.service.sglang.plugin import counters as c\n"
            "c.count_decoded('buffered', 5); c.count_drafted(6)\n"
            "import torch; t = c.DeviceTally(torch.tensor([2, 4]))\nt.drain()\n")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    from kvbuffer.service.sglang.plugin.counters import read_counters

    got = read_counters(str(tmp_path))
    assert got == {"decoded_tokens": {"buffered": 5.0}, "flushes": 2.0, "drafted_tokens": 6.0,
                   "accepted_tokens": 4.0}, got


def _counted(name: str) -> float:
    from kvbuffer.service.sglang.plugin import counters

    return sum(sample.value for metric in counters._counters()[name].collect() for sample in metric.samples
               if sample.name.endswith("_total"))


def test_a_parallel_group_counts_its_tokens_once() -> None:
    """Every tensor-parallel rank runs the batch (its share of the heads): only the group's first rank counts, so
    the service's sum over ranks is the batch's tokens and flushes."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    s = sc.Shapes()
    layers = sc.new_layers(s, gen)
    tp = int(torch.randint(2, 5, ()))
    pools = [sc.new_pool(s, None, per_draft_states=False) for _ in range(tp)]
    backends = [sc.new_backend(pool, ranks={"tp_rank": rank, "tp_size": tp, "attn_tp_rank": rank,
                                            "attn_tp_size": tp}) for rank, pool in enumerate(pools)]
    requests = int(torch.randint(1, 4, ()))
    allocated = [pool.alloc([SimpleNamespace(req_pool_idx=None, mamba_pool_idx=None,
                                             mamba_ping_pong_track_buffer=None) for _ in range(requests)])
                 for pool in pools]  # every rank holds the same requests in the same slots
    slots = allocated[0]
    assert all(a == slots for a in allocated)
    steps = CHUNK + int(torch.randint(1, CHUNK, ()))
    before = _counted("kvbuffer_sglang_decoded_tokens"), _counted("kvbuffer_sglang_flushes")
    for step in range(steps):
        mixed, a, b = (torch.randn(requests, dim, generator=gen).to(sc.DEVICE) for dim in (s.conv_dim, s.HV, s.HV))
        for backend in backends:
            fb = sc.batch("decode", slots, [10 + step] * requests)
            backend.init_forward_metadata(fb)
            for layer in layers:
                backend.forward_decode(layer, fb, mixed, a, b)
    tallies = [backend._kvbuffer.tally for backend in backends if backend._kvbuffer.tally is not None]
    assert len(tallies) == 1
    tallies[0].drain(wait=True)
    after = _counted("kvbuffer_sglang_decoded_tokens"), _counted("kvbuffer_sglang_flushes")
    assert (after[0] - before[0], after[1] - before[1]) == (requests * steps, requests * (steps // CHUNK))
