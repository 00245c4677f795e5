"""The kernels at Qwen3-Next shapes on a GPU (H=16, HV=32, K=V=128, bf16 inputs, fp32 state)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
from gdn_cases import Shapes, fresh_generator, layer_params, random_pools, relative_error, tokens
from kvbuffer.kernels import (
    BufferPool,
    buffered_decode,
    fold,
    new_state_pool,
    prefill,
    recurrent_decode,
    reference,
    verify,
)
from kvbuffer.kernels.launches import LAUNCHES, Launch, use_launch

pytestmark = pytest.mark.gpu
QWEN3_NEXT = Shapes(H=16, HV=32, K=128, V=128)
BF16_TOL = 1e-2  # bf16 outputs round at a few 1e-3


def ints(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device="cuda")


@pytest.fixture(params=list(dict.fromkeys(LAUNCHES.values())), ids=lambda launch: next(
    gpu for gpu, table in LAUNCHES.items() if table == launch))
def gpu_table(request: pytest.FixtureRequest) -> Iterator[Launch]:
    """Every GPU's launch table, whichever GPU runs the test (each table's kernels must be right on any card)."""
    with use_launch(request.param) as launch:
        yield launch


def test_decode_and_verify_at_real_shapes(gpu_table: Launch) -> None:
    gen, seed = fresh_generator()
    layer = layer_params(gen, QWEN3_NEXT, "cuda")
    states, buffer = random_pools(gen, QWEN3_NEXT, 16, 16, 40, key_dtype=torch.bfloat16, device="cuda")
    B = 12
    buf_slots, buf_lens = list(range(B)), [i * 3 for i in range(B)]
    read_slots = [-1 if i % 3 == 0 else i for i in range(B)]
    write_slots = [i if i % 4 == 1 else -1 for i in range(B)]
    xs = tokens(gen, B, QWEN3_NEXT, torch.bfloat16, "cuda")
    ref_states = states.double()
    ref_buffer = BufferPool(buffer.keys.double(), buffer.values.double(), buffer.decay.double())
    expected = reference.buffered_decode(*(x.double() for x in xs), layer.A_log.double(), layer.dt_bias.double(),
                                         ref_states, ref_buffer, ints(buf_slots), ints(buf_lens), ints(read_slots),
                                         ints(write_slots))
    out = buffered_decode(*xs, layer.A_log, layer.dt_bias, states, buffer, ints(buf_slots), ints(buf_lens),
                          ints(read_slots), ints(write_slots))
    assert relative_error(out, expected) < BF16_TOL, f"seed {seed}"
    assert relative_error(states, ref_states) < 1e-5, f"seed {seed}"
    assert relative_error(buffer.values, ref_buffer.values) < 1e-5, f"seed {seed}"

    T = 4
    xs = tokens(gen, B * T, QWEN3_NEXT, torch.bfloat16, "cuda")
    lens = [n + 1 for n in buf_lens]
    expected = reference.verify(*(x.double() for x in xs), layer.A_log.double(), layer.dt_bias.double(),
                                ref_states, ref_buffer, ints(list(range(0, B * T + 1, T))), ints(buf_slots),
                                ints(lens), ints(read_slots))
    out = verify(*xs, layer.A_log, layer.dt_bias, states, buffer, ints(list(range(0, B * T + 1, T))),
                 ints(buf_slots), ints(lens), ints(read_slots))
    assert relative_error(out, expected) < BF16_TOL, f"seed {seed}"
    assert relative_error(buffer.values, ref_buffer.values) < 1e-5, f"seed {seed}"


def test_prefill_through_fla_matches_the_recurrence() -> None:
    gen, seed = fresh_generator()
    layer = layer_params(gen, QWEN3_NEXT, "cuda")
    lengths = [300, 17, 129]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    xs = tokens(gen, cu[-1], QWEN3_NEXT, torch.bfloat16, "cuda")
    states = new_state_pool(4, QWEN3_NEXT.HV, QWEN3_NEXT.K, QWEN3_NEXT.V, device="cuda")
    states[3] = torch.randn(states[3].shape, generator=gen).cuda() * 0.3
    start = states[3].clone()
    out = prefill(*xs, layer.A_log, layer.dt_bias, states, ints(cu), ints([-1, 3, -1]), ints([0, 1, 2]))
    for i, (s, e) in enumerate(itertools.pairwise(cu)):
        expected, final = reference.recurrence(*(x[s:e].double() for x in xs), layer.A_log.double(),
                                               layer.dt_bias.double(), start.double() if i == 1 else None)
        assert relative_error(out[s:e], expected) < BF16_TOL, f"seed {seed}, request {i}"
        assert relative_error(states[i], final) < 5e-3, f"seed {seed}, request {i}"


def test_long_run_error_stays_within_the_recurrent_baseline() -> None:
    """4096 steps with flushes every 32: output and state errors against an fp64 recurrence no more than 1.5x
    the recurrent kernel's own on the same inputs, and flat over the run (no drift)."""
    gen, seed = fresh_generator()
    shapes, steps, chunk, B = QWEN3_NEXT, 4096, 32, 2
    layer = layer_params(gen, shapes, "cuda")
    xs = tokens(gen, steps * B, shapes, torch.bfloat16, "cuda")
    rec_states = new_state_pool(B, shapes.HV, shapes.K, shapes.V, device="cuda")
    kv_states = new_state_pool(B, shapes.HV, shapes.K, shapes.V, device="cuda")
    buffer = BufferPool.allocate(B, chunk + 8, shapes.H, shapes.HV, shapes.K, shapes.V, device="cuda")
    slots = ints(list(range(B)))
    lens = torch.tensor([0, chunk // 2], dtype=torch.int32, device="cuda")  # staggered flushes
    kv_out, rec_out = [], []
    for t in range(steps):
        step = [x[t * B:(t + 1) * B] for x in xs]
        write = torch.where(lens + 1 == chunk, slots, -1)
        kv_out.append(buffered_decode(*step, layer.A_log, layer.dt_bias, kv_states, buffer, slots, lens, slots,
                                      write, check_values=False))
        lens = torch.where(write >= 0, 0, lens + 1)
        rec_out.append(recurrent_decode(*step, layer.A_log, layer.dt_bias, rec_states, slots, check_values=False))
    kv_out, rec_out = torch.stack(kv_out), torch.stack(rec_out)
    fold(kv_states, buffer, slots, lens, slots, slots)
    windows = 8
    for r in range(B):
        seq = [x[r::B].double() for x in xs]
        expected, final = reference.recurrence(*seq, layer.A_log.double(), layer.dt_bias.double())
        kv_state_err, rec_state_err = relative_error(kv_states[r], final), relative_error(rec_states[r], final)
        assert kv_state_err <= 1.5 * rec_state_err, f"seed {seed}: state {kv_state_err} vs {rec_state_err}"
        kv_err = [relative_error(w, e) for w, e in zip(kv_out[:, r].chunk(windows), expected.chunk(windows),
                                                        strict=True)]
        rec_err = [relative_error(w, e) for w, e in zip(rec_out[:, r].chunk(windows), expected.chunk(windows),
                                                         strict=True)]
        assert max(kv_err) <= 1.5 * max(rec_err), f"seed {seed}: kvbuffer {kv_err} vs recurrent {rec_err}"
        assert kv_err[-1] <= 1.5 * kv_err[0], f"seed {seed}: error drifts over the run: {kv_err}"
