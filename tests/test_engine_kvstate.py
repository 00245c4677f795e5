"""The per-request KVBuffer plan: stateless while the context fits, then a checkpoint folded every chunk_size
tokens, and always room in the buffer for what a step appends (checked over random step sequences)."""

from __future__ import annotations

import random

import pytest
from kvbuffer.service.engine.kvstate import buf_len_after, plan_step
from qwen3_next_cases import fresh_seed

B, C, D = 16, 8, 4  # buffer_size, chunk_size, draft tokens


def test_decode_is_stateless_until_the_buffer_fills_then_flushes_every_chunk():
    has_state, buf_len, paths, flush_at = False, 5, [], []
    for t in range(5, 5 + 40):  # t: context length before the token
        step = plan_step("kvbuffer", has_state, buf_len, 1, B, C)
        assert step.op == "decode" and not step.fold
        paths.append(step.path)
        if step.flush:
            flush_at.append(t + 1)
        has_state = has_state or step.takes_slot
        buf_len = buf_len_after(step, buf_len, 1)
    assert paths[:B - 5] == ["stateless"] * (B - 5) and set(paths[B - 5:]) == {"buffered"}
    assert flush_at == list(range(B, 5 + 40 + 1, C))  # slot taken at context B, then every C tokens


def test_prompts_that_fit_go_to_the_buffer_longer_ones_to_a_checkpoint():
    short = plan_step("kvbuffer", False, 0, B - 1, B, C)
    assert (short.op, short.read, short.takes_slot, short.path) == ("verify", False, False, "stateless")
    long = plan_step("kvbuffer", False, 0, B + 1, B, C)
    assert (long.op, long.read, long.takes_slot) == ("prefill", False, True)
    chunk = plan_step("kvbuffer", False, 10, 10, B, C)  # second prompt chunk overflows the buffer: fold first
    assert (chunk.fold, chunk.takes_slot, chunk.op, chunk.read) == (True, True, "verify", True)


def test_recurrent_mode_holds_a_state_from_the_first_token():
    first = plan_step("recurrent", False, 0, 3, B, C)
    assert (first.op, first.read, first.takes_slot, first.path) == ("prefill", False, True, "recurrent")
    step = plan_step("recurrent", True, 0, 1, B, C)
    assert (step.op, step.read, step.takes_slot) == ("decode", True, False)


def test_random_steps_never_overflow_the_buffer():
    seed = fresh_seed()
    rng = random.Random(seed)
    for _ in range(200):
        has_state, buf_len = False, 0
        for _ in range(60):
            n = rng.choice([1, 1, 1 + rng.randint(1, D), rng.randint(1, 3 * B)])
            step = plan_step("kvbuffer", has_state, buf_len, n, B, C)
            base = 0 if step.fold else buf_len
            assert step.fold <= (buf_len > 0)
            assert step.takes_slot == (not has_state and (step.fold or step.flush or step.op == "prefill")), seed
            if step.op != "prefill":
                assert base + n <= B, f"buffer overflow (seed {seed})"
            if has_state and step.op == "verify" and n <= 1 + D:
                assert base < C, f"a stateful request must fold at chunk_size before verifying (seed {seed})"
            accepted = rng.randint(1, n) if step.op == "verify" and n <= 1 + D else n
            has_state = has_state or step.takes_slot
            buf_len = buf_len_after(step, buf_len, accepted)
            assert 0 <= buf_len <= B


@pytest.mark.parametrize("has_state", [False, True])
def test_the_step_path_says_whether_a_checkpoint_is_read(has_state):
    step = plan_step("kvbuffer", has_state, 3, 1, B, C)
    assert step.read == has_state and step.path == ("buffered" if has_state else "stateless")
