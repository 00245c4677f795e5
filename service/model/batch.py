"""What one forward pass needs besides token ids: positions, cache addresses and the KVBuffer calls.

The model runner builds a `ForwardBatch` per engine step; layers only read it (plus `conv_inputs`, where GDN
layers leave their conv inputs so that a speculative step can be rolled back to its accepted prefix). Whatever is
the same for every layer (cache addresses, attention masks, conv windows, KVBuffer slots and lengths) is built
here once per step, so a layer does no index arithmetic of its own: the host work a layer adds is its compute.
Requests are ordered by the GDN operation they take (decode, verify, prefill), so each call's tokens form one
contiguous range `[start, end)` of the flat token batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionGroup:
    """Requests whose full attention runs as one padded batch: queries `[B, Q]`, cached keys `[B, L]`."""

    q_rows: torch.Tensor  # [B, Q] token rows of the flat batch; padding repeats the request's last token
    kv_rows: torch.Tensor  # [B, L] KV-cache rows of positions 0..L-1 (L a whole number of blocks)
    mask: torch.Tensor  # [B, 1, Q, L] bool: a query sees the keys up to its own position (shared by all layers)


@dataclass
class FoldCall:
    """ops.fold before this step's operation (a buffer that must be emptied into its checkpoint first)."""

    buf_slots: torch.Tensor
    buf_lens: torch.Tensor
    read_slots: torch.Tensor
    write_slots: torch.Tensor


@dataclass
class DecodeCall:
    """ops.buffered_decode (kvbuffer) or ops.recurrent_decode (recurrent, which uses read_slots only)."""

    start: int
    end: int
    buf_slots: torch.Tensor
    buf_lens: torch.Tensor
    read_slots: torch.Tensor
    write_slots: torch.Tensor


@dataclass
class VerifyCall:
    """ops.verify: T tokens per request appended to its buffer (drafts or a short prompt chunk)."""

    start: int
    end: int
    cu_seqlens: torch.Tensor
    buf_slots: torch.Tensor
    buf_lens: torch.Tensor
    read_slots: torch.Tensor
    max_tokens: int  # known on the host: spares the kernel a read-back of cu_seqlens (a sync per layer)


@dataclass
class PrefillCall:
    """ops.prefill: prompt chunks straight into checkpoints."""

    start: int
    end: int
    cu_seqlens: torch.Tensor
    read_slots: torch.Tensor
    write_slots: torch.Tensor


@dataclass
class GdnBatch:
    """Conv-state addressing (see GatedDeltaNet.conv) and the KVBuffer calls of this step."""

    conv_slots: torch.Tensor  # [B] request slot of each request (its conv state)
    conv_state_rows: torch.Tensor  # [B * (kernel-1)] rows of the conv input buffer holding the old states
    conv_token_rows: torch.Tensor  # [N] rows holding the tokens' conv inputs
    conv_windows: torch.Tensor  # [N, kernel] each token's window: the kernel-1 rows before its row, then its row
    conv_last_rows: torch.Tensor  # [B * (kernel-1)] rows of the new conv state (all tokens accepted)
    fold: FoldCall | None = None
    decode: DecodeCall | None = None
    verify: VerifyCall | None = None
    prefill: PrefillCall | None = None
    keep_conv_inputs: bool = False
    conv_inputs: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class ForwardBatch:
    positions: torch.Tensor  # [N]
    kv_rows: torch.Tensor  # [N] KV-cache row each token's key and value are written to
    attention: list[AttentionGroup]
    gdn: GdnBatch
