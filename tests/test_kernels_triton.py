"""The Triton kernels against the fp64 PyTorch reference and the fp64 recurrence.

On CPU they run under TRITON_INTERPRET=1 (set in conftest) at small shapes; on a GPU machine the same tests
run compiled. Every output, appended buffer entry and written state is poisoned with NaN before the call.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from gdn_cases import Shapes, as_fp64, fresh_generator, layer_params, random_pools, relative_error, tokens
from kvbuffer.kernels import (
    BufferPool,
    buffered_decode,
    fold,
    new_state_pool,
    recurrent_decode,
    reference,
    step,
    verify,
)
from kvbuffer.kernels.launches import ANY_BATCH, H100, DecodeLaunch, Launch, use_launch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 2e-5  # fp32 kernels against fp64

# every kind of decode launch, each at any batch size: small batches weigh the buffer inside the apply launch,
# larger ones use a scores launch first, per value head or shared by the value heads of a key head (wider tiles,
# deeper flush pipelining and the launch overlap change nothing the interpreter can see, but run compiled on a GPU)
DECODE_LAUNCHES = {
    "one launch": Launch(decode=(DecodeLaunch(ANY_BATCH, 16, 2, inline=True),)),
    "two launches": Launch(decode=(DecodeLaunch(ANY_BATCH, 8, 1),)),
    "two launches, scores per key head": Launch(decode=(DecodeLaunch(ANY_BATCH, 32, 1, programmatic=True),),
                                                decode_scores_heads=2, flush_stages=16),
}
# the block apply in whole value tiles and in tiles of 16 rows
VERIFY_LAUNCHES = {"whole value tiles": H100, "16-row value tiles": Launch(decode=H100.decode, verify=(16, 1))}


def ints(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def poison_entries(buffer: BufferPool, slots: list[int], starts: list[int], counts: list[int]) -> None:
    for slot, start, count in zip(slots, starts, counts, strict=True):
        for t in (buffer.keys, buffer.values, buffer.decay):
            t[slot, :, start:start + count] = float("nan")


@pytest.mark.parametrize("launch", list(DECODE_LAUNCHES))
@pytest.mark.parametrize("shapes,tuning", [(Shapes(), None),
                                           (Shapes(H=1, HV=2, K=32, V=64), {"block_v": 16, "block_l": 32})],
                         ids=["default tiles", "tuned tiles"])
def test_buffered_decode_mixed_batch_matches_fp64(shapes: Shapes, tuning: dict | None, launch: str) -> None:
    gen, seed = fresh_generator()
    layer = layer_params(gen, shapes, DEVICE)
    states, buffer = random_pools(gen, shapes, state_slots=8, buffer_slots=6, capacity=24, device=DEVICE)
    # stateless, stateful, flush, stateless -> stateful, empty buffer, buffer one short of full
    buf_slots, buf_lens = [0, 3, 1, 5, 2, 4], [7, 0, 11, 23, 0, 23]
    read_slots, write_slots = [-1, 2, 4, -1, 6, 1], [-1, -1, 4, 7, -1, 1]
    q, k, v, a, b = tokens(gen, len(buf_slots), shapes, device=DEVICE)
    ref_states, ref_buffer = as_fp64(states, buffer)
    expected = reference.buffered_decode(q.double(), k.double(), v.double(), a.double(), b.double(),
                                         layer.A_log.double(), layer.dt_bias.double(), ref_states, ref_buffer,
                                         ints(buf_slots), ints(buf_lens), ints(read_slots), ints(write_slots))
    untouched = [s for s in range(8) if s not in write_slots]
    before = states[untouched].clone()
    poison_entries(buffer, buf_slots, buf_lens, [1] * len(buf_slots))
    states[[w for w in write_slots if w >= 0 and w not in read_slots]] = float("nan")
    out = torch.full_like(v, float("nan"))
    with use_launch(DECODE_LAUNCHES[launch]):
        buffered_decode(q, k, v, a, b, layer.A_log, layer.dt_bias, states, buffer, ints(buf_slots), ints(buf_lens),
                        ints(read_slots), ints(write_slots), backend="triton", out=out, tuning=tuning)
    assert relative_error(out, expected) < TOL, f"seed {seed}"
    assert torch.equal(states[untouched], before), f"seed {seed}: a slot nobody writes changed"
    assert relative_error(states, ref_states) < TOL, f"seed {seed}"
    for name in ("keys", "values", "decay"):
        assert relative_error(getattr(buffer, name), getattr(ref_buffer, name)) < TOL, f"seed {seed}: {name}"


def test_recurrent_decode_matches_fp64_recurrence() -> None:
    gen, seed = fresh_generator()
    shapes = Shapes(H=2, HV=4, K=16, V=64)
    layer = layer_params(gen, shapes, DEVICE)
    states, _ = random_pools(gen, shapes, state_slots=5, buffer_slots=1, capacity=1, device=DEVICE)
    slots = [4, 0, 2]
    expected_states = states.double()
    q, k, v, a, b = tokens(gen, 3, shapes, device=DEVICE)
    expected = reference.recurrent_decode(q.double(), k.double(), v.double(), a.double(), b.double(),
                                          layer.A_log.double(), layer.dt_bias.double(), expected_states, ints(slots))
    out = torch.full_like(v, float("nan"))
    recurrent_decode(q, k, v, a, b, layer.A_log, layer.dt_bias, states, ints(slots), backend="triton", out=out)
    assert relative_error(out, expected) < TOL, f"seed {seed}"
    assert relative_error(states, expected_states) < TOL, f"seed {seed}"


@pytest.mark.parametrize("launch", list(VERIFY_LAUNCHES))
def test_verify_variable_lengths_matches_fp64(launch: str) -> None:
    """Requests of 0, 1, 5 and 40 tokens (40 takes two rounds), with and without a checkpoint."""
    gen, seed = fresh_generator()
    shapes = Shapes()
    layer = layer_params(gen, shapes, DEVICE)
    states, buffer = random_pools(gen, shapes, state_slots=4, buffer_slots=5, capacity=64, device=DEVICE)
    counts = [5, 0, 1, 40]
    cu = [0]
    for c in counts:
        cu.append(cu[-1] + c)
    buf_slots, buf_lens, read_slots = [4, 0, 2, 1], [3, 9, 0, 17], [1, -1, -1, 3]
    q, k, v, a, b = tokens(gen, cu[-1], shapes, device=DEVICE)
    ref_states, ref_buffer = as_fp64(states, buffer)
    expected = reference.verify(q.double(), k.double(), v.double(), a.double(), b.double(), layer.A_log.double(),
                                layer.dt_bias.double(), ref_states, ref_buffer, ints(cu), ints(buf_slots),
                                ints(buf_lens), ints(read_slots))
    states_before = states.clone()
    poison_entries(buffer, buf_slots, buf_lens, counts)
    out = torch.full_like(v, float("nan"))
    with use_launch(VERIFY_LAUNCHES[launch]):
        verify(q, k, v, a, b, layer.A_log, layer.dt_bias, states, buffer, ints(cu), ints(buf_slots), ints(buf_lens),
               ints(read_slots), backend="triton", out=out)
    assert relative_error(out, expected) < TOL, f"seed {seed}"
    assert torch.equal(states, states_before), "verify must never write a state"
    for name in ("keys", "values", "decay"):
        assert relative_error(getattr(buffer, name), getattr(ref_buffer, name)) < TOL, f"seed {seed}: {name}"


def test_fold_matches_fp64() -> None:
    gen, seed = fresh_generator()
    shapes = Shapes(H=1, HV=2, K=32, V=64)
    states, buffer = random_pools(gen, shapes, state_slots=6, buffer_slots=4, capacity=40, device=DEVICE)
    # the last request is not due (write -1): its slot 3 must keep its checkpoint
    buf_slots, buf_lens, read_slots, write_slots = [3, 0, 1, 2], [40, 0, 17, 5], [2, 5, -1, 3], [2, 4, 0, -1]
    ref_states, ref_buffer = as_fp64(states, buffer)
    untouched = states[3].clone()
    reference.fold(ref_states, ref_buffer, ints(buf_slots), ints(buf_lens), ints(read_slots), ints(write_slots))
    fold(states, buffer, ints(buf_slots), ints(buf_lens), ints(read_slots), ints(write_slots), backend="triton")
    assert relative_error(states, ref_states) < TOL, f"seed {seed}"
    assert torch.equal(states[3], untouched), "a request with write slot -1 must not be folded"


@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_commit_every_accepted_length_then_decode_matches_recurrence(with_checkpoint: bool) -> None:
    """Verify T drafts, keep `accepted` of them by advancing the length, decode the next token: for every
    accepted in 0..T the output is the recurrence's over the kept history."""
    gen, seed = fresh_generator()
    shapes = Shapes()
    T, prefix = 4, 6
    layer = layer_params(gen, shapes, DEVICE)
    history = tokens(gen, prefix + T + 1, shapes, device=DEVICE)
    start = (torch.randn(shapes.HV, shapes.V, shapes.K, generator=gen) * 0.3).to(DEVICE)
    for accepted in range(T + 1):
        states = new_state_pool(1, shapes.HV, shapes.K, shapes.V, device=DEVICE)
        states[0] = start
        buffer = BufferPool.allocate(1, prefix + T + 1, shapes.H, shapes.HV, shapes.K, shapes.V,
                                     key_dtype=torch.float32, device=DEVICE)
        read = ints([0 if with_checkpoint else -1])
        part = [t[:prefix + T] for t in history]
        verify(*(t[:prefix] for t in part), layer.A_log, layer.dt_bias, states, buffer, ints([0, prefix]),
               ints([0]), ints([0]), read, backend="triton")
        verify(*(t[prefix:] for t in part), layer.A_log, layer.dt_bias, states, buffer, ints([0, T]), ints([0]),
               ints([prefix]), read, backend="triton")
        committed = prefix + accepted
        nxt = [t[prefix + T:] for t in history]
        out = buffered_decode(*nxt, layer.A_log, layer.dt_bias, states, buffer, ints([0]), ints([committed]), read,
                              ints([-1]), backend="triton")
        kept = [torch.cat([t[:committed], t[prefix + T:]]).double() for t in history]
        expected, _ = reference.recurrence(*kept, layer.A_log.double(), layer.dt_bias.double(),
                                           start.double() if with_checkpoint else None)
        assert relative_error(out[0], expected[-1]) < TOL, f"seed {seed}, accepted {accepted}"


@pytest.mark.parametrize("launch", ["one launch", "two launches, scores per key head"])
def test_long_decode_with_flushes_matches_recurrence(launch: str) -> None:
    """300 steps for two requests: one from a checkpoint, one stateless until its buffer fills, then folded
    into a fresh slot; flushes every chunk_size steps. Outputs, and the states after a final fold of what
    is left in the buffers, follow the recurrence."""
    gen, seed = fresh_generator()
    shapes = Shapes(H=1, HV=2, K=16, V=16)
    steps, chunk, capacity = 300, 8, 12
    layer = layer_params(gen, shapes, DEVICE)
    xs = tokens(gen, 2 * steps, shapes, device=DEVICE)
    states = new_state_pool(2, shapes.HV, shapes.K, shapes.V, device=DEVICE)
    start = (torch.randn(shapes.HV, shapes.V, shapes.K, generator=gen) * 0.3).to(DEVICE)
    states[0] = start
    buffer = BufferPool.allocate(2, capacity, shapes.H, shapes.HV, shapes.K, shapes.V, key_dtype=torch.float32,
                                 device=DEVICE)
    lens, has_state, outs = [0, 0], [True, False], []
    for t in range(steps):
        limit = [chunk if has_state[r] else capacity for r in range(2)]
        flush = [lens[r] + 1 == limit[r] for r in range(2)]
        step = [x[2 * t:2 * t + 2] for x in xs]
        with use_launch(DECODE_LAUNCHES[launch]):
            outs.append(buffered_decode(*step, layer.A_log, layer.dt_bias, states, buffer, ints([0, 1]), ints(lens),
                                        ints([r if has_state[r] else -1 for r in range(2)]),
                                        ints([r if flush[r] else -1 for r in range(2)]), backend="triton"))
        lens = [0 if flush[r] else lens[r] + 1 for r in range(2)]
        has_state = [has_state[r] or flush[r] for r in range(2)]
    out = torch.stack(outs)  # [steps, 2, HV, V]
    fold(states, buffer, ints([0, 1]), ints(lens), ints([0, 1]), ints([0, 1]), backend="triton")
    for r in range(2):
        seq = [x[r::2].double() for x in xs]
        expected, final = reference.recurrence(*seq, layer.A_log.double(), layer.dt_bias.double(),
                                               start.double() if r == 0 else None)
        assert relative_error(out[:, r], expected) < TOL, f"seed {seed}, request {r}"
        assert relative_error(states[r], final) < TOL, f"seed {seed}, request {r}"


@triton.jit
def _split_kernel(x, hi, lo, N: tl.constexpr):
    offs = tl.arange(0, N)
    h, low = step._split_tf32(tl.load(x + offs))
    tl.store(hi + offs, h)
    tl.store(lo + offs, low)


def test_tf32_split_is_exact_and_tf32_representable() -> None:
    """The block kernel's fp32-accurate tensor-core products rest on x = hi + lo with hi exact in tf32 (10
    mantissa bits) and lo a small remainder; the interpreter's fp32 products cannot see a wrong split."""
    gen, seed = fresh_generator()
    x = (torch.randn(256, generator=gen) * torch.logspace(-6, 6, 256)).to(DEVICE)
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    _split_kernel[(1,)](x, hi, lo, N=256)
    assert torch.equal(hi + lo, x), f"seed {seed}"
    assert not (hi.view(torch.int32) & 0x1FFF).any(), f"seed {seed}: hi keeps bits tf32 drops"
    assert (lo.abs() <= x.abs() * 2.0**-10).all(), f"seed {seed}: hi is not the truncated x"
