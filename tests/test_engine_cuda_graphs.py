"""Decode steps padded to fixed shapes (cuda_graphs.py), checked against the unpadded step.

Without CUDA the padded step runs eagerly on the static tensors a CUDA graph would read, so the padding is
checked on CPU: an engine with cuda_graph_max_batch > 0 runs side by side with one at 0 (the oracle) on fresh
random prompts, in lockstep. Every step must give the same logits, every request the same tokens, every pool
entry a request may hold the same contents (so padding rows wrote into no request's buffer, conv state,
checkpoint or KV rows), and the padding's writes must show in the scratch entries. Batches are not bucket sizes,
shrink as requests finish at different lengths, and new requests arrive mid-run (mixed steps run eagerly). On a
GPU (`gpu`) the same comparison runs with the steps replayed from captured CUDA graphs.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
from kvbuffer.service.engine.config import EngineConfig
from kvbuffer.service.engine.core import EngineCore
from kvbuffer.service.engine.cuda_graphs import batch_sizes, key_blocks
from kvbuffer.service.model import LoadedModel, ModelConfig, empty_model, tiny
from kvbuffer.service.model.tokenizer import ByteTokenizer
from qwen3_next_cases import fresh_seed, make_core, request

SETTINGS = {"buffer_size": 16, "chunk_size": 8, "max_context_length": 256}  # decodes cross buffer_size: flushes


def test_batch_sizes_are_nano_vllms_buckets_ending_at_the_max():
    assert batch_sizes(256) == [1, 2, 4, 8, *range(16, 257, 16)]
    assert batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert batch_sizes(5) == [1, 2, 4, 5]
    assert batch_sizes(1) == [1]


def test_key_blocks_are_the_next_power_of_two_within_the_longest_context():
    seed = fresh_seed()
    rng = random.Random(seed)
    for _ in range(200):
        most = rng.randint(1, 300)
        blocks = rng.randint(1, most)
        padded = key_blocks(blocks, most)
        assert blocks <= padded <= most, f"seed {seed}: {blocks} of {most} -> {padded}"
        assert padded == most or (padded & (padded - 1) == 0 and padded < 2 * blocks), f"seed {seed}"


def pools(core: EngineCore, entries: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """The first (request slots, checkpoint slots, KV blocks) `entries` of every pool, by name: entries requests
    hold (they take the lowest free ones first), never the scratch ones past them."""
    requests, states, blocks = entries
    model = core.loaded.model
    out = {}
    for i, layer in enumerate(model.gdn_layers()):
        out[f"conv_state {i}"] = layer.conv_state[:requests]
        out[f"states {i}"] = layer.states[:states]
        if layer.buffer is not None:
            for name in ("keys", "values", "decay"):
                out[f"buffer.{name} {i}"] = getattr(layer.buffer, name)[:requests]
    rows = blocks * core.plan.block_size
    for i, layer in enumerate(model.attention_layers()):
        out[f"k_cache {i}"], out[f"v_cache {i}"] = layer.k_cache[:rows], layer.v_cache[:rows]
    return out


def scratch_writes(core: EngineCore) -> dict[str, torch.Tensor]:
    """What padding rows write in each scratch entry: conv state, KV row of position 0, and the buffer's first
    entry (kvbuffer) or the checkpoint (recurrent)."""
    scratch, model = core.plan.scratch, core.loaded.model
    row = scratch.kv_block * core.plan.block_size
    out = {}
    for i, layer in enumerate(model.gdn_layers()):
        out[f"conv_state {i}"] = layer.conv_state[scratch.request_slot]
        out[f"buffered entry {i}" if layer.buffer is not None else f"states {i}"] = (
            layer.buffer.keys[scratch.request_slot, :, 0] if layer.buffer is not None
            else layer.states[scratch.state_slot])
    for i, layer in enumerate(model.attention_layers()):
        out[f"k_cache {i}"] = layer.k_cache[row]
    return out


def record_logits(core: EngineCore) -> list[torch.Tensor | None]:
    """Makes the core's runner append each step's logits to the returned list."""
    seen: list[torch.Tensor | None] = []
    run = core.runner.run

    def recorded(batch):
        logits, spans = run(batch)
        seen.append(logits)
        return logits, spans

    core.runner.run = recorded
    return seen


def random_arrivals(seed: int, count: int) -> dict[int, list]:
    """`count` requests with random prompts and lengths; all but two arrive at once, those two while the others
    decode. The first prompt has 40 tokens, so the first decodes span 3 KV blocks (padded to 4)."""
    rng = random.Random(seed)
    arrivals: dict[int, list] = {}
    for i in range(count):
        prompt = [rng.randrange(256) for _ in range(40 if i == 0 else rng.randint(3, 30))]
        at = 0 if i < count - 2 else rng.randint(3, 12)
        arrivals.setdefault(at, []).append(request(f"r{i}", prompt, max_new_tokens=rng.randint(44, 60),
                                                   ignore_eos=True))
    return arrivals


def record_padded_steps(core: EngineCore) -> list[tuple[int, int]]:
    """Makes the core's DecodeGraphs append (requests, KV blocks of the longest context) of each step it runs."""
    graphs, seen = core.runner.graphs, []
    run = graphs.run

    def recorded(batch):
        longest = max(s.seq.num_computed for s in batch) + 1
        seen.append((len(batch), -(-longest // core.plan.block_size)))
        return run(batch)

    graphs.run = recorded
    return seen


def side_by_side(oracle: EngineCore, padded: EngineCore, arrivals: dict[int, list], seed: int,
                 close: Callable[[torch.Tensor, torch.Tensor], bool], compare_pools: bool) -> list[tuple[int, int]]:
    """Runs both cores in lockstep; after every step the logits must be `close` and (if compare_pools) the pool
    entries requests may hold equal; at the end every request's tokens equal. Returns the padded core's graph
    steps as (requests, KV blocks) before padding."""
    a, b = oracle.plan, padded.plan
    entries = (min(a.request_slots, b.request_slots), min(a.state_slots, b.state_slots), min(a.kv_blocks, b.kv_blocks))
    logits = [record_logits(oracle), record_logits(padded)]
    padded_steps = record_padded_steps(padded)
    tokens: list[dict[str, list[int]]] = [{}, {}]
    step = 0
    while oracle.has_work() or padded.has_work() or any(at >= step for at in arrivals):
        for core, out in zip((oracle, padded), tokens, strict=True):
            for req in arrivals.get(step, []):
                core.add(req, core.validate(req))
            for rid, chunk in core.step():
                out.setdefault(rid, []).extend(chunk.token_ids)
        a, b = logits[0][-1], logits[1][-1]
        assert (a is None) == (b is None) and (a is None or close(a, b)), f"step {step} (seed {seed})"
        if compare_pools:
            theirs = pools(padded, entries)
            for name, t in pools(oracle, entries).items():
                # fp32 to 1e-4, as the logits: CPU matmuls of 8 padded rows and of 7 unpadded ones round differently
                # (seed 2110294089 wrote a key 1.7e-5 apart); a stray padding write differs by O(1)
                assert torch.allclose(t, theirs[name], rtol=1e-4, atol=1e-4), f"{name}, step {step} (seed {seed})"
        step += 1
    assert tokens[0] == tokens[1] and len(tokens[0]) == sum(map(len, arrivals.values())), f"seed {seed}"
    return padded_steps


def fp32_close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def assert_padded(steps: list[tuple[int, int]], sizes: list[int], seed: int) -> None:
    """Some step ran with padding requests and some with keys padded past the longest context."""
    assert any(n not in sizes for n, _ in steps), f"no batch was padded (seed {seed}): {steps}"
    assert any(blocks & (blocks - 1) for _, blocks in steps), f"no keys were padded (seed {seed}): {steps}"


@pytest.mark.parametrize("decode_mode", ["kvbuffer", "recurrent"])
@pytest.mark.parametrize("max_batch", [6, 16])
def test_padded_decode_steps_match_the_unpadded_ones(decode_mode, max_batch):
    """5 requests decode, then 7: with max 16 both pad to 8; with max 6, 5 pad to 6 and 7 run eagerly until
    requests finish. Padded and unpadded engines must not differ in a logit, a token or a request's pool entry.
    Over 40 decode steps each, with flushes (kvbuffer)."""
    seed = fresh_seed()
    oracle = make_core(decode_mode=decode_mode, cuda_graph_max_batch=0, **SETTINGS)
    padded = make_core(decode_mode=decode_mode, cuda_graph_max_batch=max_batch, **SETTINGS)
    assert oracle.plan.scratch is None and padded.plan.scratch is not None
    before = {name: t.clone() for name, t in scratch_writes(padded).items()}
    steps = side_by_side(oracle, padded, random_arrivals(seed, 7), seed, fp32_close, compare_pools=True)
    assert_padded(steps, padded.runner.graphs.sizes, seed)
    largest = max(n for n, _ in steps)  # 7 requests decode together for many steps: eagerly when max_batch < 7
    assert largest == 7 if max_batch >= 7 else largest <= max_batch, f"seed {seed}: {steps}"
    for name, t in scratch_writes(padded).items():
        assert not torch.equal(t, before[name]), f"padding never wrote {name} (seed {seed})"
    if decode_mode == "kvbuffer":
        assert oracle.flushes == padded.flushes > 0, f"seed {seed}"


def test_speculative_steps_run_eagerly_and_change_no_token():
    """Steps with drafts to verify are not single decodes: they run unpadded; the steps between them still pad."""
    seed = fresh_seed()
    settings = {**SETTINGS, "speculative_algorithm": "ngram", "speculative_num_draft_tokens": 4}
    oracle = make_core(cuda_graph_max_batch=0, **settings)
    padded = make_core(cuda_graph_max_batch=16, **settings)
    steps = side_by_side(oracle, padded, random_arrivals(seed, 5), seed, fp32_close, compare_pools=True)
    assert padded.drafted_tokens > 0 and steps, f"seed {seed}"


def test_a_negative_cuda_graph_max_batch_is_refused_by_name():
    with pytest.raises(ValueError, match="cuda_graph_max_batch must be >= 0"):
        EngineConfig(cuda_graph_max_batch=-1)


def test_the_scratch_entries_come_out_of_the_budget_and_no_request_gets_them():
    for mode in ("kvbuffer", "recurrent"):
        budget = 2**20
        without, core = (make_core(decode_mode=mode, cuda_graph_max_batch=m, memory_budget_bytes=budget,
                                   max_running_requests=1000) for m in (0, 8))
        plan, scratch = core.plan, core.plan.scratch
        assert plan.total_bytes <= budget and without.plan.total_bytes <= budget
        assert (plan.request_slots, plan.kv_blocks) < (without.plan.request_slots, without.plan.kv_blocks), mode
        assert (scratch.request_slot, scratch.kv_block) == (plan.request_slots, plan.kv_blocks)
        assert scratch.state_slot == (plan.state_slots if mode == "recurrent" else -1)
        assert plan.allocated == (plan.request_slots + 1, plan.state_slots + (mode == "recurrent"), plan.kv_blocks + 1)
        layer = core.loaded.model.gdn_layers()[0]
        assert (layer.conv_state.shape[0], layer.states.shape[0]) == plan.allocated[:2]
        memory = core.memory
        assert scratch.request_slot not in memory.free_request_slots and scratch.kv_block not in memory.free_blocks
        assert scratch.state_slot not in memory.free_state_slots


def dense_tiny(device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """The tiny model with dense MLPs only: its fp32 forward is sync-free on any GPU (the MoE's grouped GEMM
    needs bf16 on SM90), so graphs can be compared with the unpadded step at fp32 accuracy."""
    cfg = ModelConfig.from_dict({**tiny.CONFIG, "mlp_only_layers": list(range(tiny.CONFIG["num_hidden_layers"]))})
    model = empty_model(cfg, device, dtype)
    tiny.init_seeded(model, seed=0)
    return LoadedModel("dense-tiny", model, ByteTokenizer(), cfg)


def gpu_core(loaded: LoadedModel, **settings) -> EngineCore:
    defaults = {"device": "cuda", "memory_budget_bytes": 2**24, **SETTINGS}
    return EngineCore(EngineConfig(**{**defaults, **settings}), loaded)


@pytest.mark.gpu
@pytest.mark.parametrize("decode_mode", ["kvbuffer", "recurrent"])
def test_gpu_graph_replay_matches_the_unpadded_eager_step(decode_mode):
    """fp32 dense tiny model: replayed graphs against the unpadded eager engine over 40+ greedy steps."""
    seed = fresh_seed()
    cuda = torch.device("cuda")  # a model each: the memory manager binds its pools to the model's layers
    oracle = gpu_core(dense_tiny(cuda, torch.float32), dtype="float32", decode_mode=decode_mode,
                      cuda_graph_max_batch=0)
    graphs = gpu_core(dense_tiny(cuda, torch.float32), dtype="float32", decode_mode=decode_mode,
                      cuda_graph_max_batch=16)
    assert graphs.runner.graphs.capture
    steps = side_by_side(oracle, graphs, random_arrivals(seed, 7), seed, fp32_close, compare_pools=True)
    assert_padded(steps, graphs.runner.graphs.sizes, seed)
    assert len(steps) >= 40, f"seed {seed}: {len(steps)} graph steps"
    if decode_mode == "kvbuffer":
        assert graphs.flushes > 0


@pytest.mark.gpu
@pytest.mark.parametrize("decode_mode", ["kvbuffer", "recurrent"])
def test_gpu_graph_replay_matches_the_same_padded_step_run_eagerly(decode_mode):
    """The embedded tiny model (its MoE on the grouped GEMM), bf16: a replay runs exactly the kernels of the
    eager padded step, so logits and tokens must agree over 40+ greedy steps."""
    seed = fresh_seed()
    eager = make_core(device="cuda", decode_mode=decode_mode, cuda_graph_max_batch=16, **SETTINGS)
    eager.runner.graphs.capture = False
    graphs = make_core(device="cuda", decode_mode=decode_mode, cuda_graph_max_batch=16, **SETTINGS)
    assert graphs.dtype == torch.bfloat16 and graphs.runner.graphs.capture

    def bf16_close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=2e-2)

    steps = side_by_side(eager, graphs, random_arrivals(seed, 7), seed, bf16_close, compare_pools=False)
    assert_padded(steps, graphs.runner.graphs.sizes, seed)
    assert len(steps) >= 40, f"seed {seed}: {len(steps)} graph steps"
    if decode_mode == "kvbuffer":
        assert graphs.flushes > 0
