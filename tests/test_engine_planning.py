"""The step planner's vectorized index math: concatenated ranges, and the block tables it gathers from, which the
memory manager mirrors from each request's own list through admission, growth, rejected drafts and preemption."""

from __future__ import annotations

import random

import numpy as np
from kvbuffer.service.engine.model_runner import ranges
from qwen3_next_cases import fresh_seed, make_core, request, run_to_end


def test_ranges_concatenates_each_requests_range():
    seed = fresh_seed()
    rng = random.Random(seed)
    for _ in range(50):
        count = rng.randrange(0, 12)
        starts = [rng.randrange(-50, 500) for _ in range(count)]
        lengths = [rng.choice([0, 1, rng.randrange(2, 40)]) for _ in range(count)]
        want = [x for s, n in zip(starts, lengths, strict=True) for x in range(s, s + n)]
        got = ranges(np.array(starts, np.int64), np.array(lengths, np.int64))
        assert got.tolist() == want, f"seed {seed}"


def test_block_tables_mirror_every_running_requests_blocks():
    seed = fresh_seed()
    rng = random.Random(seed)
    # repetitive prompts, so n-gram drafts are proposed and some rejected (their blocks handed back); a small KV
    # cache, so requests are preempted and their slots and blocks reused by others
    prompts = [[rng.randrange(8) for _ in range(rng.randint(20, 40))] for _ in range(5)]
    core = make_core(max_context_length=96, memory_budget_bytes=96 * 2 * 2 * 16 * 4 + 5 * 160_000,
                     speculative_algorithm="ngram", speculative_num_draft_tokens=3)
    checked = []

    def check(core) -> None:
        for seq in core.scheduler.running:
            table = core.memory.block_tables[seq.req_slot, :len(seq.block_table)]
            assert table.tolist() == seq.block_table, f"seed {seed}: {seq.request_id}"
            checked.append(len(seq.block_table))

    run_to_end(core, {0: [request(f"r{i}", p, max_new_tokens=40, ignore_eos=True) for i, p in enumerate(prompts)]},
               on_step=check)
    assert core.scheduler.preemptions > 0 and core.drafted_tokens > core.accepted_tokens, f"seed {seed}"
    assert max(checked) > 1, f"seed {seed}"
