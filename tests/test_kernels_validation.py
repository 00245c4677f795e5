"""Bad arguments raise a ValueError naming the argument, before anything is launched or written."""

from __future__ import annotations

import pytest
import torch
from gdn_cases import Shapes, fresh_generator, layer_params, random_pools, tokens
from kvbuffer.kernels import buffered_decode, check_settings, fold, verify


def decode_args():
    gen, _ = fresh_generator()
    shapes = Shapes()
    layer = layer_params(gen, shapes)
    states, buffer = random_pools(gen, shapes, state_slots=4, buffer_slots=3, capacity=8)
    q, k, v, a, b = tokens(gen, 2, shapes)
    return dict(q=q, k=k, v=v, a=a, b=b, A_log=layer.A_log, dt_bias=layer.dt_bias, states=states, buffer=buffer,
                buf_slots=torch.tensor([0, 1]), buf_lens=torch.tensor([3, 0]), read_slots=torch.tensor([-1, 2]),
                write_slots=torch.tensor([-1, -1]))


BAD_DECODE = [
    ("k", lambda d: d["k"][:, :, :8], "k has shape"),
    ("v heads", lambda d: d["v"][:, :3], "not a multiple"),
    ("a", lambda d: d["a"][:1], "a has shape"),
    ("A_log", lambda d: d["A_log"].to(torch.int64), "A_log has dtype"),
    ("states dtype", lambda d: d["states"].to(torch.bfloat16), "states has dtype"),
    ("states layout", lambda d: d["states"].transpose(2, 3), "states has shape"),
    ("buf_slots range", lambda d: torch.tensor([0, 3]), "buf_slots has values"),
    ("buf_slots dtype", lambda d: torch.tensor([0.0, 1.0]), "buf_slots has dtype"),
    ("read_slots range", lambda d: torch.tensor([-2, 0]), "read_slots has values"),
    ("write_slots range", lambda d: torch.tensor([-1, 4]), "write_slots has values"),
    ("buf_lens overflow", lambda d: torch.tensor([8, 0]), "buf_lens: appending would hold 9"),
    ("device", lambda d: d["q"].to("meta"), "on meta"),
    ("key dtype", lambda d: d["k"].to(torch.bfloat16), "k has dtype torch.bfloat16, q torch.float32"),
]
TARGET = {"v heads": "v", "states dtype": "states", "states layout": "states", "buf_slots range": "buf_slots",
          "buf_slots dtype": "buf_slots", "read_slots range": "read_slots", "write_slots range": "write_slots",
          "buf_lens overflow": "buf_lens", "device": "k", "key dtype": "k"}


@pytest.mark.parametrize("case,make,message", BAD_DECODE, ids=[c[0] for c in BAD_DECODE])
def test_buffered_decode_rejects(case: str, make, message: str) -> None:
    args = decode_args()
    args[TARGET.get(case, case)] = make(args)
    before = args["buffer"].values.clone()
    with pytest.raises(ValueError, match=message):
        buffered_decode(**args, backend="triton")
    assert torch.equal(args["buffer"].values, before), "nothing may be written before the checks pass"


def test_verify_rejects_overflow_and_bad_offsets() -> None:
    args = decode_args()
    del args["write_slots"]
    with pytest.raises(ValueError, match="buf_lens: appending would hold 10"):
        verify(**{**args, "buf_lens": torch.tensor([1, 8])}, cu_seqlens=torch.tensor([0, 0, 2]), backend="triton")
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0"):
        verify(**args, cu_seqlens=torch.tensor([0, 1, 3]), backend="triton")
    with pytest.raises(ValueError, match="max_tokens \\(1\\) is less than a request's token count \\(2\\)"):
        verify(**args, cu_seqlens=torch.tensor([0, 0, 2]), max_tokens=1, backend="triton")


def test_fold_rejects_write_slots_out_of_range() -> None:
    """-1 means "nothing due for this request" (test_kernels_triton.test_fold_matches_fp64); below it is an error."""
    args = decode_args()
    with pytest.raises(ValueError, match="write_slots has values"):
        fold(args["states"], args["buffer"], args["buf_slots"], args["buf_lens"], args["read_slots"],
             torch.tensor([-2, 0]), backend="triton")


@pytest.mark.parametrize("buffer_size,chunk_size,drafts,message", [
    (16, 16, 4, "chunk_size \\+ speculative_num_draft_tokens \\(16 \\+ 4\\) must be <= buffer_size \\(16\\)"),
    (0, 1, 0, "buffer_size must be >= 1"),
    (8, 0, 0, "chunk_size must be >= 1"),
    (8, 4, -1, "speculative_num_draft_tokens must be >= 0"),
])
def test_settings_leave_room_for_drafts(buffer_size: int, chunk_size: int, drafts: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_settings(buffer_size, chunk_size, drafts)
    check_settings(chunk_size + max(drafts, 0) + 1, max(chunk_size, 1), max(drafts, 0))


def test_triton_backend_refuses_float64() -> None:
    """fp64 is the oracle's dtype: `auto` sends it to the reference, an explicit `triton` is refused by name."""
    args = decode_args()
    for name in ("q", "k", "v", "a", "b"):
        args[name] = args[name].double()
    args["buffer"] = type(args["buffer"])(args["buffer"].keys.double(), args["buffer"].values.double(),
                                          args["buffer"].decay)
    with pytest.raises(ValueError, match="backend='triton' takes 16- and 32-bit"):
        buffered_decode(**args, backend="triton")
    out = buffered_decode(**args, backend="auto")
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


@pytest.mark.parametrize("tuning,message", [({"block_q": 8}, "tuning has no parameter 'block_q'"),
                                            ({"block_v": 12}, "tuning\\['block_v'\\] must be a power of two >= 1"),
                                            ({"block_l": 8}, "tuning\\['block_l'\\] must be a power of two >= 16")])
def test_bad_tuning_is_refused_by_name(tuning: dict, message: str) -> None:
    args = decode_args()
    before = args["buffer"].values.clone()
    with pytest.raises(ValueError, match=message):
        buffered_decode(**args, backend="triton", tuning=tuning)
    del args["write_slots"]
    with pytest.raises(ValueError, match=message):
        verify(**args, cu_seqlens=torch.tensor([0, 1, 2]), backend="triton", tuning=tuning)
    assert torch.equal(args["buffer"].values, before)
