"""The KVBuffer state manager's decision for one request and one step: which operation, whether to fold first.

A pure function of the request's state (holds a checkpoint or not, buffered entries) and the settings, so the
scheduler (to reserve a checkpoint slot) and the model runner (to build the calls) agree by construction.

    stateless   the whole context is in the buffer; no checkpoint is read (S0 = 0) and none is held
    buffered    checkpoint + buffer; the buffer is folded in every chunk_size tokens (also the prefill of a
                context past the buffer, which builds the checkpoint)
    recurrent   decode_mode=recurrent: the baseline, one state read and written per token
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .api import DecodePath

Op = Literal["decode", "verify", "prefill"]


@dataclass(frozen=True)
class GdnStep:
    op: Op  # decode: one token (buffered_decode / recurrent_decode); verify: tokens into the buffer; prefill
    fold: bool  # fold the buffer into the checkpoint before the op (ops.fold), emptying it
    read: bool  # the op starts from the request's checkpoint (else from S0 = 0)
    flush: bool  # decode only: fold the buffer and this token into the checkpoint in the same pass
    takes_slot: bool  # the request needs a checkpoint slot it does not hold yet
    path: DecodePath  # what tokens produced by this step count as


def plan_step(mode: str, has_state: bool, buf_len: int, n: int, buffer_size: int, chunk_size: int) -> GdnStep:
    """Plan for appending n tokens to a request holding buf_len buffered entries (and a checkpoint or not)."""
    if mode == "recurrent":
        if n == 1 and has_state:
            return GdnStep("decode", False, True, False, False, "recurrent")
        return GdnStep("prefill", False, has_state, False, not has_state, "recurrent")
    fold = buf_len > 0 and (buf_len + n > buffer_size or (has_state and buf_len >= chunk_size and n > 1))
    takes_slot = fold and not has_state
    has_state = has_state or fold
    base = 0 if fold else buf_len
    flush = False
    if base + n > buffer_size:
        op: Op = "prefill"
        takes_slot = takes_slot or not has_state
    elif n == 1:
        op = "decode"
        flush = base + 1 >= (chunk_size if has_state else buffer_size)
        takes_slot = takes_slot or (flush and not has_state)
    else:
        op = "verify"
    # stateless: the whole context fits the buffer; a prefill past it builds the checkpoint its token comes from
    path: DecodePath = "buffered" if has_state or op == "prefill" else "stateless"
    return GdnStep(op, fold, has_state, flush, takes_slot, path)


def buf_len_after(step: GdnStep, buf_len: int, accepted: int) -> int:
    """Buffered entries once `accepted` of the step's tokens are kept (the same for every GDN layer)."""
    if step.op == "prefill" or step.flush or step.path == "recurrent":
        return 0
    return (0 if step.fold else buf_len) + accepted
