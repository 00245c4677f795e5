"""One-copy staging of a step's index tensors: every part comes back with its own values, shape and dtype whatever
the mix of lengths (empty parts and rows included), 16-byte aligned like a tensor of its own; on CUDA through
pinned memory that is released while copies out of it may still be running."""

from __future__ import annotations

import random

import pytest
import torch
from kvbuffer.service.engine.staging import HostStaging, pack
from qwen3_next_cases import fresh_seed

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def random_parts(rng: random.Random, floats: bool) -> list:
    def value() -> float:
        return rng.uniform(-1e6, 1e6) if floats else rng.randrange(-2**40, 2**40)

    parts = []
    for _ in range(rng.randrange(1, 10)):
        if rng.random() < 0.3:
            parts.append([])
        elif rng.random() < 0.5:
            parts.append([value() for _ in range(rng.randrange(1, 40))])
        else:
            cols = rng.randrange(0, 7)
            parts.append([[value() for _ in range(cols)] for _ in range(rng.randrange(1, 6))])
    return parts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32])
def test_pack_round_trips_parts_of_any_length(device, dtype):
    seed = fresh_seed()
    rng = random.Random(seed)
    floats = dtype.is_floating_point
    for _ in range(40):
        parts = random_parts(rng, floats)
        if dtype == torch.int32:
            parts = [[[v % 2**31 for v in row] for row in p] if p and isinstance(p[0], list) else
                     [v % 2**31 for v in p] for p in parts]
        sent = pack(parts, torch.device(device), dtype)
        assert len(sent) == len(parts)
        for part, t in zip(parts, sent, strict=True):
            want = torch.tensor(part, dtype=dtype)
            assert t.device.type == device and t.dtype == dtype and t.shape == want.shape, f"seed {seed}"
            assert torch.equal(t.cpu(), want), f"seed {seed}: {part}"
            assert t.data_ptr() % 16 == 0, f"seed {seed}"


@pytest.mark.parametrize("device", DEVICES)
def test_staging_hands_back_each_part_by_its_index(device):
    seed = fresh_seed()
    rng = random.Random(seed)
    stage = HostStaging(torch.device(device))
    parts = random_parts(rng, floats=False)
    order = list(range(len(parts)))
    rng.shuffle(order)
    index = {i: stage.add(parts[i]) for i in order}
    sent = stage.send()
    for i, part in enumerate(parts):
        assert torch.equal(sent[index[i]].cpu(), torch.tensor(part, dtype=torch.int64)), f"seed {seed}"


@pytest.mark.parametrize("device", DEVICES)
def test_staging_into_a_kept_buffer_reuses_its_addresses(device):
    """What a CUDA graph needs: parts of the same shapes land at the same addresses of the caller's buffer."""
    seed = fresh_seed()
    rng = random.Random(seed)
    shapes = random_parts(rng, floats=False)
    into = None
    for _ in range(3):
        stage = HostStaging(torch.device(device))
        parts = [[[rng.randrange(2**40) for _ in row] for row in p] if p and isinstance(p[0], list) else
                 [rng.randrange(2**40) for _ in p] for p in shapes]
        for part in parts:
            stage.add(part)
        into = into if into is not None else torch.empty(stage.size(), dtype=torch.int64, device=device)
        sent = stage.send(into=into)
        for part, t in zip(parts, sent, strict=True):
            assert torch.equal(t.cpu(), torch.tensor(part, dtype=torch.int64)), f"seed {seed}"
            assert t.untyped_storage().data_ptr() == into.untyped_storage().data_ptr(), f"seed {seed}"
    stage.add([1])
    with pytest.raises(ValueError, match="shapes changed"):
        stage.send(into=into)


def test_nothing_but_empty_parts():
    sent = pack([[], [[]], []], torch.device("cpu"))
    assert [tuple(t.shape) for t in sent] == [(0,), (1, 0), (0,)]


def test_ragged_rows_are_refused():
    with pytest.raises(ValueError, match="different lengths"):
        pack([[1, 2], [[1, 2], [3]], [4]], torch.device("cpu"))


@pytest.mark.gpu
def test_pinned_buffers_are_not_reused_under_a_running_copy():
    """Many packs queued behind a long kernel, their host tensors dropped at once: each must still arrive intact."""
    seed = fresh_seed()
    rng = random.Random(seed)
    device = torch.device("cuda")
    busy = torch.randn(4096, 4096, device=device)
    for _ in range(4):
        busy = busy @ busy / 64  # keeps the stream busy while the host packs on
    expected, sent = [], []
    for _ in range(200):
        part = [rng.randrange(2**40) for _ in range(rng.randrange(1, 300))]
        expected.append(part)
        sent += pack([part], device)
    torch.cuda.synchronize()
    for part, t in zip(expected, sent, strict=True):
        assert t.tolist() == part, f"seed {seed}"
