"""Host work of a decode step: the tensor ops the engine dispatches around the KVBuffer kernels.

On a GPU the engine step is launch-bound at small batch, so every op the host dispatches costs time. The KVBuffer
decode path must add none over the recurrent baseline (its slots, lengths and flush targets travel with the step's
other indices, built once per step for every layer), a step must dispatch no op per request (greedy requests: the
sampler draws per request only when sampling), and nothing may read a tensor back to the host (a sync on a GPU);
the sampler's one copy of the chosen tokens, `tolist`, is not a dispatched op. The kernel calls are stubbed: what
they launch is the kernels' business, not the engine's.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from kvbuffer.kernels import ops
from qwen3_next_cases import make_core, request
from torch.utils._python_dispatch import TorchDispatchMode

READ_BACKS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2"}


class OpLog(TorchDispatchMode):
    """Counts the aten ops dispatched while active, by name, and lists those that read values back to the host
    (`item`, `nonzero`, masked selection, boolean-mask indexing)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.read_backs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if name in READ_BACKS or bool_index:
            self.read_backs.append(str(func))
        return func(*args, **(kwargs or {}))


def decode_step_ops(monkeypatch: pytest.MonkeyPatch, decode_mode: str, requests: int) -> OpLog:
    """The ops of one decode step of `requests` requests whose contexts are past buffer_size (the buffered path
    with decode_mode=kvbuffer), with the decode kernels replaced by stubs that leave the output as it is."""
    core = make_core(decode_mode=decode_mode, max_running_requests=requests)
    for i in range(requests):
        req = request(f"r{i}", [(7 * i + j) % 256 for j in range(20)], max_new_tokens=12, ignore_eos=True)
        core.add(req, core.validate(req))
    while not all(s.in_decode for s in core.scheduler.running) or core.scheduler.waiting:
        core.step()
    core.step()
    for name in ("buffered_decode", "recurrent_decode"):
        monkeypatch.setattr(ops, name, lambda *args, out, **kwargs: out)
    with OpLog() as log:
        core.step()
    core.step()  # reads back the logged step's tokens (decode steps overlap: core.py)
    assert core.tokens_by_path["buffered" if decode_mode == "kvbuffer" else "recurrent"] >= 2 * requests
    return log


def test_the_kvbuffer_decode_step_dispatches_exactly_the_recurrent_steps_ops(monkeypatch):
    for requests in (2, 8):
        kvbuffer = decode_step_ops(monkeypatch, "kvbuffer", requests)
        recurrent = decode_step_ops(monkeypatch, "recurrent", requests)
        assert kvbuffer.ops == recurrent.ops, f"{requests} requests"


def test_a_decode_step_dispatches_no_op_per_request_and_reads_nothing_back(monkeypatch):
    for mode in ("kvbuffer", "recurrent"):
        few, many = (decode_step_ops(monkeypatch, mode, n) for n in (2, 8))
        assert few.ops == many.ops, mode
        assert few.read_backs == many.read_backs == [], mode
